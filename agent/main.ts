#!/usr/bin/env node
// imgd: the unprivileged host agent. It owns the state directory (SQLite, blobs), talks to S3,
// runs the FSMs and serves gRPC; every privileged step goes through the root helper's socket.
import { versionLine } from "../client/version.ts";
import { AGENT_USAGE, loadAgentConfig, parseAgentArgs, UsageError } from "./config.ts";
import { formatLogLine } from "../privhelper/log.ts";
import { notifyReady } from "../privhelper/sd-notify.ts";
import { createLogger } from "./log.ts";

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const { version, help } = parseAgentArgs(argv);
  if (version) return void console.log(versionLine("imgd"));
  if (help) return void console.log(AGENT_USAGE);
  const config = loadAgentConfig(argv, process.env);
  const log = createLogger("imgd", config.logLevel);
  if (process.getuid?.() === 0) throw new Error("imgd must not run as root: privileged steps belong to imgd-privhelper");
  // Loaded only now: --version and a usage error answer without loading the whole agent.
  const { startAgent } = await import("./app.ts");
  const agent = await startAgent(config, log);
  // Type=notify: systemd starts what depends on imgd only now that the API answers.
  notifyReady(`serving ${config.listen}`);
  const stop = async (signal: string) => {
    log("info", "shutting down", { signal });
    // Every run is durable and resumes at the next start, so a stop that hangs may be cut short.
    setTimeout(() => {
      log("error", "shutdown did not finish within 20 s; exiting anyway");
      process.exit(1);
    }, 20_000).unref();
    await agent.stop();
    log("info", "stopped");
    process.exit(0);
  };
  process.once("SIGTERM", () => void stop("SIGTERM"));
  process.once("SIGINT", () => void stop("SIGINT"));
}

// A command line it does not understand is the caller's mistake: plain text and the usage, exit 2.
// Anything else that stops the start is a fatal error, logged as a JSON line like the rest, exit 1.
main().catch((err) => {
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof UsageError) {
    process.stderr.write(`imgd: ${message}\n${AGENT_USAGE}\n`);
    process.exit(2);
  }
  process.stderr.write(formatLogLine("imgd", "error", "imgd failed to start", { error: message }));
  process.exit(1);
});
