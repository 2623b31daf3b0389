// Wait until a Unix socket and/or a TCP port accepts connections (used inside the test VM).
//
//   node test/vm/wait-for.ts [--unix PATH] [--tcp HOST:PORT] [--pid PID] [--timeout SECONDS]
//
// Exits 0 once every target accepts a connection, 1 on timeout, 2 when --pid (the process that
// should be listening) has exited first. A socket file alone proves nothing: a killed server
// leaves its socket file behind, so only a completed connect counts.

import { connect } from "node:net";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

const POLL_MS = 100;

function canConnect(options: { path: string } | { host: string; port: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(options);
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => {
      socket.destroy();
      resolve(false);
    });
  });
}

function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

function parseTcp(spec: string): { host: string; port: number } {
  const colon = spec.lastIndexOf(":");
  const port = Number(spec.slice(colon + 1));
  if (colon <= 0 || !Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`bad --tcp ${spec}`);
  return { host: spec.slice(0, colon), port };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      unix: { type: "string" },
      tcp: { type: "string" },
      pid: { type: "string" },
      timeout: { type: "string", default: "60" },
    },
    strict: true,
  });
  const targets: Array<{ label: string; options: { path: string } | { host: string; port: number } }> = [];
  if (values.unix) targets.push({ label: `unix socket ${values.unix}`, options: { path: values.unix } });
  if (values.tcp) targets.push({ label: `tcp ${values.tcp}`, options: parseTcp(values.tcp) });
  const pid = values.pid ? Number(values.pid) : undefined;
  const deadline = Date.now() + Number(values.timeout) * 1000;

  let pending = targets;
  for (;;) {
    const results = await Promise.all(pending.map((target) => canConnect(target.options)));
    pending = pending.filter((_, index) => !results[index]);
    if (pending.length === 0) return 0;
    if (pid !== undefined && !processAlive(pid)) {
      console.error(`wait-for: process ${pid} exited before ${pending.map((t) => t.label).join(", ")} accepted connections`);
      return 2;
    }
    if (Date.now() > deadline) {
      console.error(`wait-for: ${pending.map((t) => t.label).join(", ")} not accepting connections after ${values.timeout}s`);
      return 1;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

process.exitCode = await main();
