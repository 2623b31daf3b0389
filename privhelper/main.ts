// imgd-privhelper: the root side of imgd. Serves the allow-listed operations in protocol.ts on a
// Unix socket that only root and the imgd group can reach.
import { chmod, chown, mkdir } from "node:fs/promises";
import { loadConfig, resolveGroupId } from "./config.ts";
import { perform } from "./operations.ts";
import { abortAllRuns } from "./run.ts";
import { HelperServer, type LogLine } from "./server.ts";

const SHUTDOWN_GRACE_MS = 10_000;

function log(line: LogLine): void {
  process.stderr.write(JSON.stringify({ time: new Date().toISOString(), ...line }) + "\n");
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error("must run as root");
  const config = loadConfig();
  const socketGid = resolveGroupId(config.socketGroup);
  // Root-owned and traversable: mnt/ below it holds the inspection mounts the agent reads;
  // pool/ (0700) and its files (0600) stay private.
  await mkdir(config.stateDir, { recursive: true, mode: 0o755 });
  await chown(config.stateDir, 0, 0);
  await chmod(config.stateDir, 0o755);

  const server = new HelperServer({ socketPath: config.socketPath, socketGid, handler: (request) => perform(config, request), log });
  await server.start();
  log({ msg: "imgd-privhelper listening", socket: config.socketPath, gid: socketGid, stateDir: config.stateDir, pool: config.poolName });

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log({ msg: "shutting down", signal });
    const finished = await server.stop(SHUTDOWN_GRACE_MS);
    if (!finished) {
      // A layer.apply still running is killed; its mount dies with its namespace.
      log({ msg: "operation still running after grace period; killing child processes" });
      abortAllRuns();
    }
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));
}

main().catch((err: unknown) => {
  log({ msg: "imgd-privhelper failed to start", error: err instanceof Error ? err.message : String(err) });
  process.exit(1);
});
