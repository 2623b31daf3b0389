// The bundle `npm run build` writes (dist/, scripts/bundle.ts), run as the deployed units and the
// test VM run it: every program is there, starts, and the applier (with its hashing thread, whose
// code a bundler must not rewrite) applies a layer and checks its digest. npm test builds it
// before the unit tests.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tar from "tar-stream";
import { ENTRY_POINTS } from "../../privhelper/entry-points.ts";

const repo = join(import.meta.dirname, "../..");
const bundle = (name: string) => join(repo, "dist", `${name}.mjs`);
const built = existsSync(join(repo, "dist"));
const opts = { skip: built ? false : "dist/ is missing: npm run build (npm test runs it first)" };
const { version } = JSON.parse(readFileSync(join(repo, "package.json"), "utf8")) as { version: string };

test("every program has its bundle", opts, () => {
  for (const name of Object.keys(ENTRY_POINTS)) assert.ok(existsSync(bundle(name)), `dist/${name}.mjs is missing`);
});

test("imgd and imgctl start from the bundle and print their version", opts, () => {
  const imgd = spawnSync(process.execPath, [bundle("imgd"), "--version"], { encoding: "utf8" });
  assert.equal(imgd.status, 0, imgd.stderr);
  assert.ok(imgd.stdout.startsWith(`imgd ${version}`), imgd.stdout);
  // imgctl version prints its own first, then asks the agent (none here: the answer says so).
  const socket = join(tmpdir(), `imgd-bundle-none-${process.pid}.sock`);
  const imgctl = spawnSync(process.execPath, [bundle("imgctl"), "--addr", `unix:${socket}`, "version"], { encoding: "utf8" });
  assert.ok(imgctl.stdout.startsWith(`imgctl ${version}`), `${imgctl.stdout}${imgctl.stderr}`);
  assert.match(imgctl.stdout, /agent: not reachable/);
});

test("the bundled applier applies a layer and checks its digest on its hashing thread", { skip: opts.skip || (process.getuid?.() === 0 ? false : "needs root (chroot)") }, async (t) => {
  const base = mkdtempSync(join(tmpdir(), "imgd-bundle-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const root = join(base, "root");
  mkdirSync(root);
  const pack = tar.pack();
  const body = Buffer.alloc(20 * 1024 * 1024, 7); // more than two of the applier's 8 MiB slices
  pack.entry({ name: "etc/", type: "directory", mode: 0o755 });
  pack.entry({ name: "etc/hostname", mode: 0o644 }, "imgd\n");
  pack.entry({ name: "big", mode: 0o600 }, body);
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const chunk of pack) chunks.push(chunk as Buffer);
  const blob = Buffer.concat(chunks);
  const path = join(base, "layer.tar");
  writeFileSync(path, blob);
  const digest = `sha256:${createHash("sha256").update(blob).digest("hex")}`;
  const apply = (d: string) => {
    const r = spawnSync(process.execPath, [bundle("imgd-applier"), "--root", root, "--blob", path, "--digest", d], { encoding: "utf8" });
    return { status: r.status, report: JSON.parse(r.stdout.trim().split("\n").at(-1) || "{}") as { ok: boolean; code?: string; entries?: number } };
  };
  const good = apply(digest);
  assert.deepEqual([good.status, good.report.ok, good.report.entries], [0, true, 3], JSON.stringify(good.report));
  assert.equal(readFileSync(join(root, "etc/hostname"), "utf8"), "imgd\n");
  assert.equal(statSync(join(root, "big")).size, body.length);
  const bad = apply(`sha256:${"0".repeat(64)}`);
  assert.deepEqual([bad.status, bad.report.code], [1, "BLOB_MISMATCH"], JSON.stringify(bad.report));
});
