import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AGENT_SETTINGS, loadAgentConfig, UsageError } from "../../agent/config.ts";
import { renderConfigTable, README, replaceBetweenMarkers } from "../../agent/config-doc.ts";
import { DEFAULT_LAYER_LIMITS } from "../../agent/layers/validate.ts";
import { DOWNLOAD_DEFAULTS, DEFAULT_TIMEOUTS, MAX_LAYERS_DEFAULT } from "../../agent/s3/config.ts";
import { HELPER_SETTINGS, loadConfig } from "../../privhelper/config.ts";

const repo = join(import.meta.dirname, "../..");
const tmpFile = (name: string, content: string) => {
  const file = join(mkdtempSync(join(tmpdir(), "imgd-config-")), name);
  writeFileSync(file, content);
  return file;
};

test("defaults: the agent listens on its Unix socket", () => {
  const c = loadAgentConfig([], {});
  assert.equal(c.stateDir, "/var/lib/imgd");
  assert.equal(c.listen, "unix:/run/imgd/agent/imgd.sock");
  assert.deepEqual(c.api, { kind: "unix", path: "/run/imgd/agent/imgd.sock", group: undefined });
  assert.equal(c.helperSocket, "/run/imgd/privhelper.sock");
  assert.equal(c.logLevel, "info");
  assert.deepEqual(c.s3, { bucket: "flyio-platform-hiring-challenge", prefix: "images/", region: "us-east-1" });
  assert.deepEqual(c.layerLimits, {
    maxEntries: DEFAULT_LAYER_LIMITS.maxEntries,
    maxEntryBytes: DEFAULT_LAYER_LIMITS.maxEntryBytes,
    maxLayerBytes: DEFAULT_LAYER_LIMITS.maxLayerBytes,
    maxDecompressedBytes: DEFAULT_LAYER_LIMITS.maxDecompressedBytes,
  });
});

test("the schema's defaults are the ones the modules use", () => {
  assert.deepEqual(DOWNLOAD_DEFAULTS, { attempts: 6, backoffMs: 200, backoffMaxMs: 10_000, retryAfterMaxMs: 30_000, maxObjectChanges: 3, parallelThreshold: 64 * 1024 * 1024, partSize: 16 * 1024 * 1024, partConcurrency: 4 });
  assert.deepEqual(DEFAULT_TIMEOUTS, { connectMs: 10_000, requestMs: 60_000, idleMs: 30_000 });
  assert.equal(MAX_LAYERS_DEFAULT, 1000);
});

test("flags override the environment, which overrides the config file; every setting has its flag", () => {
  const file = tmpFile("imgd.env", '# comment\nIMGD_STATE_DIR=/srv/file\nIMGD_S3_BUCKET="from-file"\nIMGD_LISTEN=unix:/srv/file.sock\nIMGD_LAYER_MAX_BYTES=1048576\nAWS_ACCESS_KEY_ID=AKID\nAWS_SECRET_ACCESS_KEY=s3cr3t\n');
  const c = loadAgentConfig(["--config", file, "--listen", "unix:/srv/flag.sock", "--download-concurrency", "7"], { IMGD_STATE_DIR: "/srv/env", IMGD_DOWNLOAD_CONCURRENCY: "3" });
  assert.equal(c.stateDir, "/srv/env");
  assert.equal(c.listen, "unix:/srv/flag.sock");
  assert.equal(c.downloadConcurrency, 7);
  assert.equal(c.s3.bucket, "from-file");
  assert.deepEqual(c.s3.credentials, { accessKeyId: "AKID", secretAccessKey: "s3cr3t" });
  // The validator's limits: from the file, typed and raw (agent/layers/validate.ts reads `settings`).
  assert.equal(c.layerLimits.maxLayerBytes, 1048576);
  assert.equal(c.settings.IMGD_LAYER_MAX_BYTES, "1048576");
  // IMGD_CONFIG in the environment means the same as --config.
  assert.equal(loadAgentConfig([], { IMGD_CONFIG: file }).values.IMGD_LAYER_MAX_BYTES, 1048576);
  assert.equal(loadAgentConfig(["--layer-max-entries", "12"], {}).layerLimits.maxEntries, 12);
});

test("unknown keys are refused with their name: any in the file, IMGD_* in the environment", () => {
  const file = tmpFile("typo.env", "IMGD_STATE_DIR=/srv/x\nIMGD_LAYER_MAX_BYTE=5\nAWS_REGION=eu-west-1\n");
  assert.throws(() => loadAgentConfig(["--config", file], {}), (err: Error) => /unknown setting IMGD_LAYER_MAX_BYTE\b/.test(err.message) && /unknown setting AWS_REGION/.test(err.message));
  assert.throws(() => loadAgentConfig([], { IMGD_DOWNLOAD_CONCURENCY: "4" }), /unknown setting IMGD_DOWNLOAD_CONCURENCY in the environment/);
  // Other programs' settings and test harness names share environments with the agent.
  const shared = { PATH: "/usr/bin", IMGD_ADDR: "unix:/x", IMGD_POOL_DATA_SIZE: "1G", IMGD_VM_REPO: "/r", IMGD_TEST_CRASH_AT: "", AWS_PROFILE: "x" };
  assert.equal(loadAgentConfig([], shared).stateDir, "/var/lib/imgd");
  const nested = tmpFile("nested.env", "IMGD_CONFIG=/etc/other.env\n");
  assert.throws(() => loadAgentConfig(["--config", nested], {}), /IMGD_CONFIG cannot be set inside the file/);
  assert.throws(() => loadAgentConfig(["--config", tmpFile("bad.env", "IMGD_STATE_DIR /srv\n")], {}), /bad.env:1: expected KEY=value/);
});

test("bad values are refused with the setting's name; secrets are never echoed", () => {
  assert.throws(() => loadAgentConfig([], { IMGD_STATE_DIR: "relative/dir" }), /IMGD_STATE_DIR="relative\/dir": must be a normalized absolute path/);
  assert.throws(() => loadAgentConfig([], { IMGD_DOWNLOAD_CONCURRENCY: "0" }), /IMGD_DOWNLOAD_CONCURRENCY="0": expected an integer from 1 to 9999/);
  assert.throws(() => loadAgentConfig([], { IMGD_LOG_LEVEL: "loud" }), /IMGD_LOG_LEVEL="loud": expected one of debug, info, warn, error/);
  assert.throws(() => loadAgentConfig([], { IMGD_LAYER_MAX_ENTRIES: "1e6" }), /IMGD_LAYER_MAX_ENTRIES/);
  assert.throws(() => loadAgentConfig([], { IMGD_S3_BUCKET: "Bad_Bucket" }), /IMGD_S3_BUCKET="Bad_Bucket"/);
  assert.throws(() => loadAgentConfig([], { AWS_SECRET_ACCESS_KEY: "has space" }), (err: Error) => /AWS_SECRET_ACCESS_KEY=\(secret\)/.test(err.message) && !err.message.includes("has space"));
  assert.throws(() => loadAgentConfig(["--no-such-flag"], {}), (err: unknown) => err instanceof UsageError && /Unknown option '--no-such-flag'/.test(err.message));
  assert.throws(() => loadAgentConfig(["stray"], {}), UsageError);
});

test("the API's listen rules: Unix socket, TCP with mutual TLS, or plain loopback only when asked", () => {
  assert.deepEqual(loadAgentConfig([], { IMGD_LISTEN: "unix:/tmp/a.sock", IMGD_SOCKET_GROUP: "wheel" }).api, { kind: "unix", path: "/tmp/a.sock", group: "wheel" });
  assert.throws(() => loadAgentConfig([], { IMGD_LISTEN: "0.0.0.0:50051" }), /is a TCP address.*IMGD_TLS_CERT, IMGD_TLS_KEY and IMGD_TLS_CLIENT_CA.*IMGD_LISTEN_INSECURE_LOOPBACK=1/);
  assert.throws(() => loadAgentConfig([], { IMGD_LISTEN: "127.0.0.1:50051" }), /is a TCP address/);
  for (const host of ["0.0.0.0:1", "10.0.0.1:1", "[::]:1", "localhost:1"]) {
    assert.throws(() => loadAgentConfig([], { IMGD_LISTEN: host, IMGD_LISTEN_INSECURE_LOOPBACK: "1" }), /allows only a loopback address/, host);
  }
  assert.deepEqual(loadAgentConfig([], { IMGD_LISTEN: "127.0.0.1:0", IMGD_LISTEN_INSECURE_LOOPBACK: "1" }).api, { kind: "tcp", host: "127.0.0.1", port: 0, tls: undefined });
  assert.deepEqual(loadAgentConfig([], { IMGD_LISTEN: "[::1]:9", IMGD_LISTEN_INSECURE_LOOPBACK: "1" }).api, { kind: "tcp", host: "::1", port: 9, tls: undefined });
  const tls = { IMGD_TLS_CERT: "/etc/imgd/cert.pem", IMGD_TLS_KEY: "/etc/imgd/key.pem", IMGD_TLS_CLIENT_CA: "/etc/imgd/ca.pem" };
  assert.deepEqual(loadAgentConfig([], { IMGD_LISTEN: "0.0.0.0:50051", ...tls }).api, { kind: "tcp", host: "0.0.0.0", port: 50051, tls: { certFile: tls.IMGD_TLS_CERT, keyFile: tls.IMGD_TLS_KEY, clientCaFile: tls.IMGD_TLS_CLIENT_CA } });
  assert.throws(() => loadAgentConfig([], { IMGD_LISTEN: "0.0.0.0:50051", IMGD_TLS_CERT: tls.IMGD_TLS_CERT, IMGD_TLS_KEY: tls.IMGD_TLS_KEY }), /missing IMGD_TLS_CLIENT_CA/);
  assert.throws(() => loadAgentConfig([], { ...tls }), /TLS applies to a TCP IMGD_LISTEN only/);
  assert.throws(() => loadAgentConfig([], { IMGD_LISTEN: "0.0.0.0:70000", ...tls }), /port out of range/);
});

test("the helper's schema: defaults, bad values, unknown names in its own namespaces", () => {
  const c = loadConfig({});
  assert.equal(c.socketGroup, "imgd");
  assert.equal(c.poolDataBytes, 2 * 1024 ** 3);
  assert.throws(() => loadConfig({ IMGD_POOL_DATA_SIZ: "1G" }), /unknown setting IMGD_POOL_DATA_SIZ in the environment/);
  assert.throws(() => loadConfig({ IMGD_HELPER_SOKET: "/x" }), /unknown setting IMGD_HELPER_SOKET/);
  // The agent's settings in the same environment are the agent's business.
  assert.equal(loadConfig({ IMGD_S3_BUCKET: "x", IMGD_LISTEN: "unix:/x" }).poolName, "imgd-pool");
  assert.throws(() => loadConfig({ IMGD_HELPER_GROUP: "bad group" }), /IMGD_HELPER_GROUP="bad group": is not a group name or gid/);
  assert.throws(() => loadConfig({ IMGD_THIN_SIZE: "1000K" }), /IMGD_THIN_SIZE must be a multiple of the pool block size/);
  assert.ok(Object.keys(HELPER_SETTINGS).every((k) => !(k in AGENT_SETTINGS) || k === "IMGD_HELPER_SOCKET"), "one meaning per name");
});

test("README.md's configuration table is the one generated from the schemas (node agent/config-doc.ts)", () => {
  const readme = readFileSync(README, "utf8");
  assert.equal(replaceBetweenMarkers(readme, renderConfigTable()), readme, "README.md is out of date: run `node agent/config-doc.ts`");
  for (const name of [...Object.keys(AGENT_SETTINGS), ...Object.keys(HELPER_SETTINGS), "IMGD_ADDR", "--helper-socket", "unix:/"]) assert.ok(readme.includes(name), name);
});

test("imgd --version prints the package version; an unknown flag exits 2 with the usage line", () => {
  const { version } = JSON.parse(readFileSync(join(repo, "package.json"), "utf8")) as { version: string };
  const run = (...args: string[]) => spawnSync(process.execPath, [join(repo, "agent/main.ts"), ...args], { encoding: "utf8", env: { PATH: process.env.PATH } });
  const v = run("--version");
  assert.equal(v.status, 0);
  assert.match(v.stdout, new RegExp(`^imgd ${version.replaceAll(".", "\\.")}( \\([0-9a-f]{12}\\))?\\n$`));
  const bad = run("--bogus");
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /Unknown option '--bogus'/);
  assert.match(bad.stderr, /^usage: imgd /m);
  const ctl = (...args: string[]) => spawnSync(process.execPath, [join(repo, "client/imgctl.ts"), ...args], { encoding: "utf8", env: { PATH: process.env.PATH } });
  assert.match(ctl("version").stdout, new RegExp(`^imgctl ${version.replaceAll(".", "\\.")}`));
  // No agent listens here: imgctl's own version, and the agent's reported as not reachable (exit 0).
  const both = JSON.parse(ctl("--addr", "unix:/nonexistent/imgd.sock", "--json", "version").stdout) as { imgctl: object; agent: { error?: string } };
  assert.deepEqual(Object.keys(both.imgctl), ["version", "commit"]);
  assert.match(both.agent.error ?? "", /UNAVAILABLE/);
  const ctlBad = ctl("--bogus", "images");
  assert.equal(ctlBad.status, 2);
  assert.match(ctlBad.stderr, /^usage: imgctl /m);
  assert.equal(ctl("runs", "--limit", "abc").status, 2);
});
