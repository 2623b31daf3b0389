// Assembles the agent: state directory, catalog, blob store, S3, helper client, FSMs, gRPC.
// main.ts runs it as a service; tests start it in-process.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { BlobStore } from "./blobs/store.ts";
import { Catalog } from "./catalog.ts";
import type { AgentConfig } from "./config.ts";
import { openDatabase } from "./db.ts";
import { FsmEngine } from "./fsm/engine.ts";
import { startGrpcServer } from "./grpc/server.ts";
import { describeError } from "./grpc/errors.ts";
import { HelperClient } from "./helper-client.ts";
import { registerActivateFsm } from "./images/activate.ts";
import { registerDeactivateFsm } from "./images/deactivate.ts";
import { registerDeleteFsm } from "./images/delete.ts";
import { registerPullFsm } from "./images/pull.ts";
import { PullProgressBoard } from "./images/pull-progress.ts";
import { DownloadGate } from "./images/download-gate.ts";
import { lockStateDir } from "./instance-lock.ts";
import { matchPool, PoolGate } from "./pool-identity.ts";
import { reconcile } from "./reconcile.ts";
import { startRunHistoryPruning } from "./run-history.ts";
import { KeyedLock } from "./keyed-lock.ts";
import type { Logger } from "./log.ts";
import { AgentMetrics, startMetricsServer } from "./metrics.ts";
import { createS3Client } from "./s3/client.ts";
import type { PoolStatus } from "../privhelper/protocol.ts";

export interface RunningAgent {
  port: number;
  /** The /metrics port (IMGD_METRICS_LISTEN; 0 when not served). */
  metricsPort: number;
  catalog: Catalog;
  stop(): Promise<void>;
}

export async function startAgent(config: AgentConfig, log: Logger, options: { poolWaitAttempts?: number } = {}): Promise<RunningAgent> {
  mkdirSync(config.stateDir, { recursive: true, mode: 0o750 });
  const lock = lockStateDir(config.stateDir);
  const db = openDatabase(join(config.stateDir, "imgd.db"));
  const catalog = new Catalog(db);
  // Always collected (cheap); served only when IMGD_METRICS_LISTEN is set.
  const metrics = new AgentMetrics();
  const blobs = new BlobStore(config.stateDir, { observeDownload: metrics.download });
  await blobs.init();
  const s3Config = config.s3;
  const layerLimits = config.layerLimits;
  const s3 = createS3Client(s3Config);
  const helper = new HelperClient(config.helperSocket, { observer: metrics.helper });
  metrics.readPoolWith((signal) => helper.call("pool.status", {}, { signal }));
  // Served from the start: a wait for the helper shows in it (helper requests by outcome).
  const metricsServer = config.metricsListen ? await startMetricsServer(metrics, config.metricsListen, log) : undefined;
  if (metricsServer) log("info", "metrics served", { listen: config.values.IMGD_METRICS_LISTEN, port: metricsServer.port, path: "/metrics" });
  const fsmSettings = config.fsm;
  // One set of keyed locks: steps take them through the engine (so waiting is not work), GC,
  // delete and reconcile take the same keys directly.
  const locks = new KeyedLock();
  const engine = new FsmEngine(db, {
    log: (level, msg, fields) => log(level, msg, { sys: "fsm", ...fields }),
    queues: { download: config.downloadConcurrency, apply: config.applyConcurrency },
    locks,
    interruptions: fsmSettings.interruptions,
    observer: metrics.engine,
    describeError, // a failed run keeps its API error reason (agent/grpc/errors.ts)
  });

  const pool = await waitForPool(helper, log, options.poolWaitAttempts ?? 60);
  // Does this catalog describe this pool? If it describes another one, nothing changes the pool
  // (no repair, no mutating RPC, no resumed run) until an operator decides.
  const poolGate = new PoolGate();
  poolGate.observe(matchPool(catalog, pool));
  if (poolGate.mismatch) {
    const { id, recorded } = poolGate.mismatch;
    log("error", "POOL_MISMATCH: this database describes another thin pool; the pool is left untouched until an operator decides (imgctl doctor)", { poolId: id, recordedPoolId: recorded.id });
  }
  const downloads = new DownloadGate();
  const progress = new PullProgressBoard();
  const pull = registerPullFsm({ engine, catalog, blobs, s3, s3Config, helper, locks, layerLimits, downloads, progress });
  const activate = registerActivateFsm({ engine, catalog, helper, pull, log, s3, s3Config });
  const deactivate = registerDeactivateFsm({ engine, catalog, helper, locks });
  const remove = registerDeleteFsm({ engine, catalog, helper, locks, pull, deactivate, log });
  const lifecycle = { catalog, helper, blobs, pull, activate, deactivate, remove, locks, downloads, tmpDir: blobs.tmpDir, poolGate };
  // Before any run resumes: what a crash (or a power loss, or someone else) left in the pool is
  // repaired while nothing else moves. Subjects of unfinished runs are left to those runs.
  await reconcileAtStart({ ...lifecycle, log: (level, msg, fields) => log(level, msg, { sys: "reconcile", ...fields }) });
  if (!poolGate.mismatch) await engine.resumeAll();
  else {
    // A resumed run would create, snapshot or delete thin ids in a pool it knows nothing of.
    log("warn", "unfinished runs wait for the operator's decision about the pool (imgctl doctor --adopt-pool or --wipe-pool)", { sys: "fsm" });
    poolGate.whenAllowed(() => {
      engine.resumeAll().then(
        () => log("info", "the pool was accepted: unfinished runs resumed", { sys: "fsm" }),
        (err: unknown) => log("error", "could not resume unfinished runs", { sys: "fsm", error: err instanceof Error ? err.message : String(err) }),
      );
    });
  }
  const stopPruning = startRunHistoryPruning(engine, { maxRuns: config.runHistoryMax, maxAgeDays: config.runHistoryDays }, (level, msg, fields) => log(level, msg, { sys: "fsm", ...fields }));

  const { server, port } = await startGrpcServer(config.api, { ...lifecycle, progress, log }, { countRpc: (method, code, seconds) => metrics.rpc(method, code, seconds) });

  log("info", "imgd serving", { listen: config.listen, port, stateDir: config.stateDir, bucket: s3Config.bucket, endpoint: s3Config.endpoint ?? "aws" });

  return {
    port,
    metricsPort: metricsServer?.port ?? 0,
    catalog,
    async stop() {
      // Graceful close waits for every client connection to go away; a control plane keeping
      // its channel open must not hold a restart hostage: give calls a few seconds, then cut.
      const graceful = server.shutdown();
      const timedOut = await Promise.race([graceful.then(() => false), sleep(5000).then(() => true)]);
      if (timedOut) {
        log("warn", "gRPC clients still connected after 5 s: closing their connections");
        server.forceShutdown();
      }
      log("info", "gRPC server closed");
      await metricsServer?.close();
      stopPruning();
      // Steps get their abort signal; those still working are recorded as interrupted at once
      // (not as failed attempts), so a step that outlives the timeout is simply abandoned.
      await engine.shutdown(fsmSettings.stopTimeoutMs);
      log("info", "FSM engine stopped");
      helper.close();
      s3.destroy();
      db.close();
      lock.release();
    },
  };
}

async function reconcileAtStart(deps: Parameters<typeof reconcile>[0]): Promise<void> {
  try {
    const { outcomes, after } = await reconcile(deps);
    const count = (result: string) => outcomes.filter((o) => o.result === result).length;
    deps.log(after.clean ? "info" : "warn", "startup reconciliation done", {
      repaired: count("repaired"),
      skipped: count("skipped"),
      failed: count("failed"),
      remaining: after.findings.map((f) => `${f.kind} ${f.subject}`),
    });
  } catch (err) {
    // The agent still serves: doctor shows what is left, and `imgctl doctor --repair` retries.
    deps.log("error", "startup reconciliation failed", { error: err instanceof Error ? err.message : String(err) });
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

/** The helper may start after the agent (or restart): wait for it and make sure the pool exists. */
async function waitForPool(helper: HelperClient, log: Logger, attempts: number): Promise<PoolStatus> {
  for (let attempt = 1; ; attempt++) {
    try {
      const pool = await helper.call("pool.ensure", {});
      log("info", "thin pool ready", { ...pool });
      return pool;
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err);
      if (attempt >= attempts) throw new Error(`the root helper did not provide the thin pool: ${reason}`);
      log("warn", "waiting for the root helper", { attempt, error: reason });
      await new Promise((resolve) => setTimeout(resolve, Math.min(500 * attempt, 5000)));
    }
  }
}
