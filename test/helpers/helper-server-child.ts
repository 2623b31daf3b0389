// The REAL helper server and operations table in a process of its own, with only the program
// spawner swapped for a recorder that fails every command (nothing real runs). Tests that need
// to measure the server (its RSS, its event loop) without sharing a process with their clients
// start this:  node test/helpers/helper-server-child.ts SOCKET STATE_DIR LOG_FILE '<limits json>'
// It prints "ready" on stdout once listening and appends one JSON log line per event to LOG_FILE
// (a file, not a pipe: a pipe's reader busy with the test's own clients would slow the helper).
import { appendFileSync } from "node:fs";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { loadConfig } from "../../privhelper/config.ts";
import { perform } from "../../privhelper/operations.ts";
import { replaceSpawnerForTests } from "../../privhelper/run.ts";
import { HelperServer, type ServerLimits } from "../../privhelper/server.ts";

const [socketPath, stateDir, logFile, limitsJson] = process.argv.slice(2);
if (!socketPath || !stateDir || !logFile) throw new Error("usage: helper-server-child.ts SOCKET STATE_DIR LOG_FILE [LIMITS_JSON]");
const config = loadConfig({ IMGD_HELPER_SOCKET: socketPath, IMGD_HELPER_STATE_DIR: stateDir, IMGD_BLOB_DIR: `${stateDir}/blobs`, IMGD_HELPER_GROUP: "0", IMGD_AGENT_USER: "65534" });
replaceSpawnerForTests(async () => ({ exitCode: 1, stdout: "", stderr: "recorder: not run", timedOut: false, isCanceled: false }));
const server = new HelperServer({
  socketPath,
  socketGid: 0,
  handler: (request) => perform(config, request),
  log: (line) => appendFileSync(logFile, JSON.stringify({ t: Math.round(performance.now()), ...line }) + "\n"),
  limits: JSON.parse(limitsJson ?? "{}") as Partial<ServerLimits>,
});
await server.start();
// How long the helper's own event loop was blocked, logged each second: a starved loop is what a
// flood does to every other client.
const delay = monitorEventLoopDelay({ resolution: 5 });
delay.enable();
setInterval(() => {
  appendFileSync(logFile, JSON.stringify({ t: Math.round(performance.now()), msg: "event loop", maxDelayMs: Math.round(delay.max / 1e6), rssKiB: Math.round(process.memoryUsage().rss / 1024) }) + "\n");
  delay.reset();
}, 1000).unref();
process.stdout.write("ready\n");
process.on("SIGTERM", () => void server.stop(100).then(() => process.exit(0)));
