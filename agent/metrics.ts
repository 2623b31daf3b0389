// The agent's Prometheus metrics, served at /metrics when IMGD_METRICS_LISTEN is set. They are
// fed at the few chokepoints everything passes through, never from the steps themselves:
//   the FSM engine's step runner (EngineObserver): step durations, runs by outcome and reason;
//   the helper client's requests (HelperCallObserver): helper latencies, applied bytes, pool use;
//   the blob store's downloads (DownloadObserver): layer download durations and bytes;
//   the gRPC server's middleware (grpc/rpc-observer.ts): RPCs by method and code.
// Pulls and activations are runs: imgd_runs_finished_total{fsm="pull"} and {fsm="activate"}.
import { createServer, type Server } from "node:http";
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { PoolStatus } from "../privhelper/protocol.ts";
import type { EngineObserver } from "./fsm/types.ts";
import type { HelperCallObserver } from "./helper-client.ts";
import type { DownloadObserver } from "./blobs/store.ts";
import type { Logger } from "./log.ts";

/** A scrape older than this re-reads the pool once (one helper call at most per this interval). */
const POOL_MAX_AGE_MS = 15_000;
/** ...and waits at most this long for it, then shows the last figures (their age says so). */
const POOL_REFRESH_TIMEOUT_MS = 2_000;

// Seconds: steps and helper operations run from milliseconds (queries) to many minutes (layer.apply).
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800];
const RPC_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800];

export type PoolReader = (signal: AbortSignal) => Promise<PoolStatus>;

export class AgentMetrics {
  readonly registry = new Registry();
  #pool: { status: PoolStatus; at: number } | undefined;
  #readPool: PoolReader | undefined;
  #refreshing: Promise<unknown> | undefined;

  readonly #runs = new Counter({
    name: "imgd_runs_finished_total",
    help: "FSM runs finished (pull, activate, deactivate, delete), by status and reason: completed, step_error (a step gave up after its attempts), aborted (a step failed for good at once), poison (a step interrupted too often, too soon), not_resumable, internal_error",
    labelNames: ["fsm", "status", "reason"] as const,
    registers: [this.registry],
  });
  readonly #steps = new Histogram({
    name: "imgd_fsm_step_duration_seconds",
    help: "FSM step attempts (waits for queues and locks included), by outcome: completed, failed, interrupted (runs again), stopped (by shutdown)",
    labelNames: ["fsm", "step", "outcome"] as const,
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  readonly #helperOps = new Histogram({
    name: "imgd_helper_operation_duration_seconds",
    help: "requests to the root helper by operation and outcome (ok or the error code); op=\"layer.apply\" is the layer apply duration",
    labelNames: ["op", "outcome"] as const,
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  readonly #downloads = new Histogram({
    name: "imgd_layer_download_duration_seconds",
    help: "layer downloads from S3 into the blob store (validation while downloading included), by outcome",
    labelNames: ["outcome"] as const,
    buckets: DURATION_BUCKETS,
    registers: [this.registry],
  });
  readonly #downloadedBytes = new Counter({
    name: "imgd_layer_downloaded_bytes_total",
    help: "layer bytes received from S3 (failed and repeated downloads included)",
    registers: [this.registry],
  });
  readonly #appliedBytes = new Counter({
    name: "imgd_layer_applied_bytes_total",
    help: "layer blob bytes applied onto thin devices by the root helper",
    registers: [this.registry],
  });
  readonly #rpcs = new Counter({
    name: "imgd_grpc_requests_total",
    help: "gRPC calls handled, by method and status code",
    labelNames: ["method", "code"] as const,
    registers: [this.registry],
  });
  readonly #rpcDurations = new Histogram({
    name: "imgd_grpc_request_duration_seconds",
    help: "gRPC calls handled, by method (a PullImage stream lasts as long as its pull)",
    labelNames: ["method"] as const,
    buckets: RPC_BUCKETS,
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry });
    // Read at scrape time; concurrent collects share one refresh of the status.
    const pool = (name: string, help: string, pick: (p: PoolStatus) => number) => {
      const gauge: Gauge<"pool"> = new Gauge({
        name,
        help,
        labelNames: ["pool"] as const,
        registers: [this.registry],
        collect: async () => {
          const status = await this.#currentPool();
          gauge.reset();
          if (status) gauge.set({ pool: status.name }, pick(status));
        },
      });
    };
    pool("imgd_pool_data_used_bytes", "thin pool data in use", (p) => p.dataUsedBytes);
    pool("imgd_pool_data_total_bytes", "thin pool data size", (p) => p.dataTotalBytes);
    pool("imgd_pool_metadata_used_bytes", "thin pool metadata in use", (p) => p.metaUsedBytes);
    pool("imgd_pool_metadata_total_bytes", "thin pool metadata size", (p) => p.metaTotalBytes);
    const age = new Gauge({
      name: "imgd_pool_status_age_seconds",
      help: "age of the pool figures above (read from the helper's last pool status)",
      registers: [this.registry],
      collect: () => {
        if (this.#pool) age.set((Date.now() - this.#pool.at) / 1000);
      },
    });
  }

  /** How the pool is read when a scrape finds the last status too old (helper.call("pool.status")). */
  readPoolWith(reader: PoolReader): void {
    this.#readPool = reader;
  }

  readonly engine: EngineObserver = {
    stepEnded: (fsm, step, outcome, seconds) => this.#steps.observe({ fsm, step, outcome }, seconds),
    runFinished: (fsm, status, reason) => this.#runs.inc({ fsm, status, reason }),
  };

  readonly helper: HelperCallObserver = (op, outcome, seconds, result) => {
    this.#helperOps.observe({ op, outcome }, seconds);
    if (result === undefined) return;
    if (op === "pool.status" || op === "pool.ensure") this.#pool = { status: result as PoolStatus, at: Date.now() };
    if (op === "layer.apply") this.#appliedBytes.inc((result as { bytes: number }).bytes);
  };

  readonly download: DownloadObserver = (outcome, bytes, seconds) => {
    this.#downloads.observe({ outcome }, seconds);
    this.#downloadedBytes.inc(bytes);
  };

  rpc(method: string, code: string, seconds: number): void {
    this.#rpcs.inc({ method, code });
    this.#rpcDurations.observe({ method }, seconds);
  }

  /** The last pool status, re-read first (one call shared by concurrent scrapes, bounded) when too old. */
  async #currentPool(): Promise<PoolStatus | undefined> {
    const stale = !this.#pool || Date.now() - this.#pool.at > POOL_MAX_AGE_MS;
    if (stale && this.#readPool) {
      // The helper's answer updates #pool through the helper observer; a failure keeps the old figures.
      this.#refreshing ??= this.#readPool(AbortSignal.timeout(POOL_REFRESH_TIMEOUT_MS))
        .catch(() => undefined)
        .finally(() => (this.#refreshing = undefined));
      await this.#refreshing;
    }
    return this.#pool?.status;
  }
}

export interface MetricsServer {
  port: number;
  close(): Promise<void>;
}

/** Serves GET /metrics over plain HTTP (read-only; bind it where only the scraper reaches). */
export async function startMetricsServer(metrics: AgentMetrics, listen: { host: string; port: number }, log: Logger): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (path !== "/metrics") return void res.writeHead(404, { "content-type": "text/plain" }).end("not found: the metrics are at /metrics\n");
    if (req.method !== "GET" && req.method !== "HEAD") return void res.writeHead(405, { allow: "GET, HEAD" }).end();
    metrics.registry.metrics().then(
      (text) => res.writeHead(200, { "content-type": metrics.registry.contentType }).end(req.method === "HEAD" ? undefined : text),
      (err: unknown) => {
        log("error", "metrics scrape failed", { error: err instanceof Error ? err.message : String(err) });
        res.writeHead(500, { "content-type": "text/plain" }).end("metrics collection failed\n");
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err) => reject(new Error(`IMGD_METRICS_LISTEN=${listen.host}:${listen.port}: cannot listen: ${err.message}`)));
    server.listen(listen.port, listen.host, () => resolve());
  });
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : listen.port;
  return {
    port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
