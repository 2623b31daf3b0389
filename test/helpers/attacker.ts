// A compromised agent: run with the agent's uid and groups (setpriv --reuid imgd --regid imgd
// --init-groups) by test/e2e/compromised-agent.test.ts. It talks to the real helper the way an
// exploited agent would and prints one JSON line per attack: {"attack", "code", "message"}
// ("code": "ACCEPTED" when the helper did what it was asked: the test fails on that).
//   node attacker.ts ATTACK [ARGS...]
import { mkdirSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { createConnection, type Socket } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { HelperClient, HelperError } from "../../agent/helper-client.ts";

const SOCKET = process.env.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock";
const [attack, ...args] = process.argv.slice(2);
const helper = new HelperClient(SOCKET);

async function attempt(name: string, call: () => Promise<unknown>): Promise<void> {
  try {
    const result = await call();
    console.log(JSON.stringify({ attack: name, code: "ACCEPTED", message: JSON.stringify(result) }));
  } catch (err) {
    const code = err instanceof HelperError ? err.code : "CLIENT_ERROR";
    console.log(JSON.stringify({ attack: name, code, message: (err as Error).message }));
  }
}

/** Builds a layer device of our own to apply to (all allowed: the agent does this for every pull). */
async function ownLayer(thinId: number): Promise<string> {
  const name = `imgd-layer-${thinId.toString(16).padStart(32, "a")}`;
  await helper.call("thin.create", { thinId });
  await helper.call("device.activate", { name, thinId });
  await helper.call("fs.mkfs", { name });
  return name;
}

switch (attack) {
  case "blob-symlink": {
    // blobs (or blobs/sha256) replaced by a symlink into a root-only content store.
    const [stateDir, secretStore, digest, thinId] = args as [string, string, string, string];
    const blobs = join(stateDir, "blobs");
    const name = await ownLayer(Number(thinId));
    renameSync(blobs, `${blobs}.real`);
    try {
      symlinkSync(secretStore, blobs);
      await attempt("apply a root-only blob through a symlinked blobs/", () => helper.call("layer.apply", { name, digest }));
      rmSync(blobs);
      mkdirSync(blobs);
      symlinkSync(join(secretStore, "sha256"), join(blobs, "sha256"));
      await attempt("apply a root-only blob through a symlinked blobs/sha256/", () => helper.call("layer.apply", { name, digest }));
      rmSync(blobs, { recursive: true });
    } finally {
      renameSync(`${blobs}.real`, blobs);
    }
    break;
  }
  case "activation": {
    const [act, actThinId, layerDigest] = args as [string, string, string];
    await attempt("mount an activation (fs.mount)", () => helper.call("fs.mount" as "fs.mkfs", { name: act, readOnly: false } as never));
    await attempt("format an activation", () => helper.call("fs.mkfs", { name: act }));
    await attempt("apply a layer to an activation", () => helper.call("layer.apply", { name: act, digest: layerDigest }));
    await attempt("activate an activation's thin id under a layer name", () => helper.call("device.activate", { name: `imgd-layer-${"b".repeat(32)}`, thinId: Number(actThinId) }));
    break;
  }
  case "foreign": {
    const [foreign, layerDigest] = args as [string, string];
    await attempt("apply a layer to a foreign device named like a layer", () => helper.call("layer.apply", { name: foreign, digest: layerDigest }));
    await attempt("format a foreign device", () => helper.call("fs.mkfs", { name: foreign }));
    await attempt("deactivate a foreign device", () => helper.call("device.deactivate", { name: foreign }));
    await attempt("activate over a foreign device's name", () => helper.call("device.activate", { name: foreign, thinId: 1 }));
    break;
  }
  case "flood": {
    // For `seconds`: 4 connections writing 64 KiB of `{}\n` and never reading, and 100 more each
    // holding half a request (past the per-uid cap of 32); reconnecting whenever one is cut off.
    const seconds = Number(args[0] ?? 20);
    const end = performance.now() + seconds * 1000;
    const stats = { floodConnections: 0, idleConnections: 0, refusedOrClosed: 0 };
    const chunk = Buffer.from("{}\n".repeat(21845));
    const open = (): Promise<Socket | null> => new Promise((resolve) => {
      const socket = createConnection(SOCKET);
      socket.once("connect", () => resolve(socket));
      socket.on("error", () => resolve(null));
    });
    const flooder = async () => {
      while (performance.now() < end) {
        const socket = await open();
        if (!socket) { await sleep(50); continue; }
        stats.floodConnections++;
        socket.pause();
        let closed = false;
        socket.once("close", () => { closed = true; stats.refusedOrClosed++; });
        while (!closed && performance.now() < end) {
          if (!socket.write(chunk)) await Promise.race([new Promise((r) => socket.once("drain", r)), sleep(200)]);
        }
        socket.destroy();
      }
    };
    const idler = async () => {
      while (performance.now() < end) {
        const socket = await open();
        if (!socket) { await sleep(50); continue; }
        stats.idleConnections++;
        socket.write('{"id":1,"op":"pool.st');
        await new Promise((r) => { socket.once("close", r); setTimeout(r, Math.max(0, end - performance.now())); });
        if (socket.destroyed) stats.refusedOrClosed++;
        socket.destroy();
        await sleep(200); // a storm of reconnects would measure the VM's emulated CPU, not the helper
      }
    };
    await Promise.all([...Array.from({ length: 4 }, flooder), ...Array.from({ length: 100 }, idler)]);
    console.log(JSON.stringify({ attack: "flood", code: "DONE", message: JSON.stringify(stats) }));
    break;
  }
  default:
    throw new Error(`unknown attack ${attack}`);
}
helper.close();
