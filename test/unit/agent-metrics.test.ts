// /metrics and the access log, on a real agent on the host (test/helpers/test-agent.ts: real
// s3rver, real SQLite, real gRPC client; the root helper is the test double). The endpoint is
// scraped over real HTTP after a real pull, its text checked by Prometheus' promtool.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { loadAgentConfig } from "../../agent/config.ts";
import type { LogLevel } from "../../agent/log.ts";
import { promtool, promtoolLint, sampleValue, samples, type Sample } from "../helpers/prometheus.ts";
import { pullReady } from "../helpers/pull.ts";
import { TestAgent, tarOf } from "../helpers/test-agent.ts";

type Line = { level: LogLevel; msg: string } & Record<string, unknown>;
const lines: Line[] = [];
const layers: Record<string, string>[] = [{ "bin/tool": "tool\n" }, { "etc/tool.conf": "answer=42\n" }];
const harness = new TestAgent({
  name: "metrics",
  env: { IMGD_METRICS_LISTEN: "127.0.0.1:0" },
  log: (level, msg, fields) => lines.push({ level, msg, ...fields }),
  images: { tool: layers },
});

before(() => harness.setUp());
after(() => harness.tearDown());

const scrape = async (path = "/metrics") => fetch(`http://127.0.0.1:${harness.agent.metricsPort}${path}`);

const value = (all: Sample[], name: string, labels: Record<string, string> = {}) => sampleValue(all, name, labels);
const count = (all: Sample[], name: string, labels: Record<string, string>) => sampleValue(all, `${name}_count`, labels);

test("after a pull, /metrics counts it: runs, steps, downloads, applies, helper calls, RPCs and the pool", { skip: promtool ? false : "promtool is missing (Debian package prometheus; installed automatically when the tests run as root)" }, async () => {
  await pullReady(harness.client, "tool");
  const missing = "01JD5X7K3M9Q2W8E4R6T0Y1U3I";
  const refused = await harness.client.deactivateImage({ activationId: missing }).then(() => "OK", (err: { code: number }) => err.code);
  assert.notEqual(refused, "OK", "deactivating an activation that does not exist is refused");

  const pool = await harness.client.getPool({});
  const response = await scrape();
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  const text = await response.text();
  // Ours lint clean; prom-client's own nodejs_active_*_total gauges break a naming rule (not ours to rename).
  assert.deepEqual(promtoolLint(text).filter((problem) => !problem.startsWith("nodejs_")), [], "promtool check metrics");
  const families = samples(text);

  assert.equal(value(families, "imgd_runs_finished_total", { fsm: "pull", status: "succeeded", reason: "completed" }), 1);
  for (const step of ["list", "layers", "finish"]) {
    assert.equal(count(families, "imgd_fsm_step_duration_seconds", { fsm: "pull", step, outcome: "completed" }), 1, step);
  }
  const tarBytes = (await Promise.all(layers.map((files) => tarOf(files)))).reduce((n, t) => n + t.byteLength, 0);
  assert.equal(count(families, "imgd_layer_download_duration_seconds", { outcome: "ok" }), layers.length);
  assert.equal(value(families, "imgd_layer_downloaded_bytes_total"), tarBytes);
  assert.equal(count(families, "imgd_helper_operation_duration_seconds", { op: "layer.apply", outcome: "ok" }), layers.length);
  assert.equal(value(families, "imgd_layer_applied_bytes_total"), layers.length, "the helper double reports 1 byte per apply");
  assert.equal(value(families, "imgd_grpc_requests_total", { method: "/imgd.v1.ImageService/PullImage", code: "OK" }), 1);
  const refusedCalls = families.filter((s) => s.name === "imgd_grpc_requests_total" && s.labels.method === "/imgd.v1.ImageService/DeactivateImage");
  assert.deepEqual(refusedCalls.map((s) => [s.labels.code !== "OK", s.value]), [[true, 1]], "the refused call is counted under its code");
  assert.equal(count(families, "imgd_grpc_request_duration_seconds", { method: "/imgd.v1.ImageService/PullImage" }), 1);

  // Pool figures: the helper's last pool status (at most 15 s old), here the one GetPool just read.
  assert.ok(pool.dataUsedBytes > 0n, "the pull used pool space");
  assert.equal(value(families, "imgd_pool_data_used_bytes", { pool: pool.name }), Number(pool.dataUsedBytes));
  assert.equal(value(families, "imgd_pool_data_total_bytes", { pool: pool.name }), Number(pool.dataTotalBytes));
  assert.equal(value(families, "imgd_pool_metadata_used_bytes", { pool: pool.name }), Number(pool.metadataUsedBytes));
  assert.equal(value(families, "imgd_pool_metadata_total_bytes", { pool: pool.name }), Number(pool.metadataTotalBytes));
  assert.ok(value(families, "imgd_pool_status_age_seconds") < 15);
  assert.ok(value(families, "process_resident_memory_bytes") > 0, "Node's process metrics too");

  assert.equal((await scrape("/")).status, 404);
  assert.equal((await fetch(`http://127.0.0.1:${harness.agent.metricsPort}/metrics`, { method: "POST" })).status, 405);
});

test("one access log line per RPC: method, peer, code, duration, and the image or activation named", async () => {
  const rpcs = lines.filter((l) => l.msg === "rpc");
  const pull = rpcs.find((l) => l.method === "/imgd.v1.ImageService/PullImage");
  assert.ok(pull, "PullImage logged");
  assert.equal(pull.level, "info");
  assert.equal(pull.code, "OK");
  assert.equal(pull.image, "tool");
  assert.match(String(pull.peer), /127\.0\.0\.1/);
  assert.ok(typeof pull.ms === "number" && pull.ms >= 0);
  const deactivate = rpcs.find((l) => l.method === "/imgd.v1.ImageService/DeactivateImage");
  assert.ok(deactivate && deactivate.code !== "OK");
  assert.equal(deactivate.activationId, "01JD5X7K3M9Q2W8E4R6T0Y1U3I");
});

test("IMGD_METRICS_LISTEN: off by default; a host:port; anything else refused with the setting's name", () => {
  const base = { IMGD_S3_BUCKET: "bucket" };
  assert.equal(loadAgentConfig([], base).metricsListen, undefined);
  assert.deepEqual(loadAgentConfig([], { ...base, IMGD_METRICS_LISTEN: "127.0.0.1:9464" }).metricsListen, { host: "127.0.0.1", port: 9464 });
  assert.deepEqual(loadAgentConfig(["--metrics-listen", "[::1]:9464"], base).metricsListen, { host: "::1", port: 9464 });
  assert.throws(() => loadAgentConfig([], { ...base, IMGD_METRICS_LISTEN: "9464" }), /IMGD_METRICS_LISTEN/);
  assert.throws(() => loadAgentConfig([], { ...base, IMGD_METRICS_LISTEN: "127.0.0.1:99999" }), /IMGD_METRICS_LISTEN=127\.0\.0\.1:99999: port out of range/);
});
