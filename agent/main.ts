#!/usr/bin/env node
// imgd: the unprivileged host agent. It owns the state directory (SQLite, blobs), talks to S3,
// runs the FSMs and serves gRPC; every privileged step goes through the root helper's socket.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { BlobStore } from "./blobs/store.ts";
import { Catalog } from "./catalog.ts";
import { loadAgentConfig } from "./config.ts";
import { openDatabase } from "./db.ts";
import { FsmEngine } from "./fsm/engine.ts";
import { startGrpcServer } from "./grpc/server.ts";
import { HelperClient } from "./helper-client.ts";
import { registerActivateFsm } from "./images/activate.ts";
import { registerPullFsm } from "./images/pull.ts";
import { KeyedLock } from "./keyed-lock.ts";
import { createLogger } from "./log.ts";
import { createS3Client, loadS3Config } from "./s3/client.ts";

async function main(): Promise<void> {
  const config = loadAgentConfig(process.argv.slice(2), process.env);
  const log = createLogger("imgd", config.logLevel);
  if (process.getuid?.() === 0) throw new Error("imgd must not run as root: privileged steps belong to imgd-privhelper");

  mkdirSync(config.stateDir, { recursive: true, mode: 0o750 });
  const db = openDatabase(join(config.stateDir, "imgd.db"));
  const catalog = new Catalog(db);
  const blobs = new BlobStore(config.stateDir);
  await blobs.init();
  const s3Config = loadS3Config(config.settings);
  const s3 = createS3Client(s3Config);
  const helper = new HelperClient(config.helperSocket);
  const engine = new FsmEngine(db, {
    log: (level, msg, fields) => log(level, msg, { sys: "fsm", ...fields }),
    queues: { download: config.downloadConcurrency, apply: config.applyConcurrency },
  });

  await waitForPool(helper, log);
  const locks = new KeyedLock();
  const pull = registerPullFsm({ engine, catalog, blobs, s3, s3Config, helper, locks });
  const activate = registerActivateFsm({ engine, catalog, helper, pull, log });
  await engine.resumeAll();

  const { server, port } = await startGrpcServer(config.listen, { catalog, helper, pull, activate });
  log("info", "imgd serving", { listen: config.listen, port, stateDir: config.stateDir, bucket: s3Config.bucket, endpoint: s3Config.endpoint ?? "aws" });

  const stop = async (signal: string) => {
    log("info", "shutting down", { signal });
    await server.shutdown();
    await engine.shutdown();
    helper.close();
    db.close();
    process.exit(0);
  };
  process.once("SIGTERM", () => void stop("SIGTERM"));
  process.once("SIGINT", () => void stop("SIGINT"));
}

/** The helper may start after the agent (or restart): wait for it and make sure the pool exists. */
async function waitForPool(helper: HelperClient, log: ReturnType<typeof createLogger>): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      const pool = await helper.call("pool.ensure", {});
      log("info", "thin pool ready", { ...pool });
      return;
    } catch (err) {
      if (attempt >= 60) throw new Error(`the root helper did not provide the thin pool: ${err instanceof Error ? err.message : err}`);
      log("warn", "waiting for the root helper", { attempt, error: err instanceof Error ? err.message : String(err) });
      await new Promise((resolve) => setTimeout(resolve, Math.min(500 * attempt, 5000)));
    }
  }
}

main().catch((err) => {
  process.stderr.write(`imgd: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
