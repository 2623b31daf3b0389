// imgd-privhelper: the root side of imgd. Serves the allow-listed operations in protocol.ts on a
// Unix socket that only root and the imgd group can reach.
import { lstat, mkdir } from "node:fs/promises";
import { loadConfig, resolveGroupId, resolveUserId } from "./config.ts";
import { formatLogLine } from "./log.ts";
import { perform } from "./operations.ts";
import { abortAllRuns } from "./run.ts";
import { notifyReady } from "./sd-notify.ts";
import { HelperServer, type LogLine } from "./server.ts";

const SHUTDOWN_GRACE_MS = 10_000;

function log({ level, msg, ...fields }: LogLine): void {
  process.stderr.write(formatLogLine("imgd-privhelper", level, msg, fields));
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error("must run as root");
  const config = loadConfig();
  const socketGid = resolveGroupId(config.socketGroup);
  // Root's alone: created 0700 when missing, otherwise left as its unit made it (StateDirectory=,
  // 0700): never chmod. Nothing in it is for the agent: the helper mounts nothing in the host's namespace.
  await mkdir(config.stateDir, { recursive: true, mode: 0o700 });
  const state = await lstat(config.stateDir);
  if (!state.isDirectory() || state.uid !== 0 || (state.mode & 0o022) !== 0) {
    throw new Error(`${config.stateDir} must be a directory owned by root and not writable by group or others`);
  }
  resolveUserId(config.agentUser); // fail at start-up, not at the first layer.apply

  const server = new HelperServer({ socketPath: config.socketPath, socketGid, handler: (request) => perform(config, request), log });
  await server.start();
  log({ level: "info", msg: "imgd-privhelper listening", socket: config.socketPath, gid: socketGid, agentUser: config.agentUser, stateDir: config.stateDir, pool: config.poolName, limits: server.limits });
  notifyReady(`listening on ${config.socketPath}`);

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log({ level: "info", msg: "shutting down", signal });
    const finished = await server.stop(SHUTDOWN_GRACE_MS);
    if (!finished) {
      // A layer.apply still running is killed; its mount dies with its namespace.
      log({ level: "warn", msg: "operation still running after grace period; killing child processes" });
      abortAllRuns();
    }
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));
}

main().catch((err: unknown) => {
  log({ level: "error", msg: "imgd-privhelper failed to start", error: err instanceof Error ? err.message : String(err) });
  process.exit(1);
});
