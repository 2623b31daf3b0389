import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadAgentConfig } from "../../agent/config.ts";

test("defaults", () => {
  const c = loadAgentConfig([], {});
  assert.equal(c.stateDir, "/var/lib/imgd");
  assert.equal(c.listen, "127.0.0.1:50051");
  assert.equal(c.helperSocket, "/run/imgd/privhelper.sock");
});

test("flags override the environment, which overrides the config file", () => {
  const file = join(mkdtempSync(join(tmpdir(), "imgd-config-")), "imgd.env");
  writeFileSync(file, "# comment\nIMGD_STATE_DIR=/srv/file\nIMGD_S3_BUCKET=\"from-file\"\nIMGD_LISTEN=file:1\n");
  const c = loadAgentConfig(["--config", file, "--listen", "flag:2"], { IMGD_STATE_DIR: "/srv/env" });
  assert.equal(c.stateDir, "/srv/env");
  assert.equal(c.listen, "flag:2");
  assert.equal(c.settings.IMGD_S3_BUCKET, "from-file");
});

test("bad values are refused with the setting's name", () => {
  assert.throws(() => loadAgentConfig([], { IMGD_STATE_DIR: "relative/dir" }), /IMGD_STATE_DIR must be an absolute path/);
  assert.throws(() => loadAgentConfig([], { IMGD_DOWNLOAD_CONCURRENCY: "0" }), /IMGD_DOWNLOAD_CONCURRENCY/);
  assert.throws(() => loadAgentConfig([], { IMGD_LOG_LEVEL: "loud" }), /IMGD_LOG_LEVEL/);
  assert.throws(() => loadAgentConfig(["--no-such-flag"], {}), /Unknown option/);
  const file = join(mkdtempSync(join(tmpdir(), "imgd-config-")), "bad.env");
  writeFileSync(file, "PATH=/tmp\n");
  assert.throws(() => loadAgentConfig(["--config", file], {}), /bad.env:1: expected IMGD_\*=value/);
});
