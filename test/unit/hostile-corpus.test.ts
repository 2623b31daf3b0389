// The hostile corpus (test/fixtures/hostile-corpus.ts) against both guards on the host:
// the agent's validator judges every case as the corpus expects, and (as root) the helper's
// applier child, chrooted into a temporary root, applies the accepted ones with the expected
// result inside that root, or refuses them with the expected rule.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { fileURLToPath } from "node:url";
import { LayerValidationError, validateLayer } from "../../agent/layers/validate.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import { checkImage, CORPUS_LIMITS, expectationsDocument, hostileCorpus, imageOf, LIMIT_ENV, type CorpusCase } from "../fixtures/hostile-corpus.ts";

const CHILD = fileURLToPath(new URL("../../privhelper/apply/child.ts", import.meta.url));
const CORPUS_CLI = fileURLToPath(new URL("../fixtures/hostile-corpus.ts", import.meta.url));
const isRoot = process.getuid?.() === 0;

const cases = await hostileCorpus();
const digestOf = (bytes: Buffer) => `sha256:${createHash("sha256").update(bytes).digest("hex")}`;

test("the corpus is deterministic: the same bytes and expectations twice", async () => {
  const again = await hostileCorpus();
  assert.deepEqual(again.map((c) => c.layers.map(digestOf)), cases.map((c) => c.layers.map(digestOf)));
  assert.deepEqual(expectationsDocument(again), expectationsDocument(cases));
});

test("the corpus covers every kind of outcome and the issue's families of cases", () => {
  const outcomes = new Set(cases.map((c) => (c.expect.outcome === "refused" ? `refused/${c.expect.stage}` : "applied")));
  assert.deepEqual([...outcomes].sort(), ["applied", "refused/apply", "refused/validate"]);
  for (const family of ["name-", "symlink-", "hardlink-", "whiteout-", "gzip-", "zstd-"]) {
    assert.ok(cases.filter((c) => c.name.startsWith(family)).length >= 2, `${family} cases`);
  }
  const rules = new Set(cases.flatMap((c) => (c.expect.outcome === "refused" && c.expect.stage === "validate" ? [c.expect.rule] : [])));
  for (const rule of ["DOTDOT", "ABSOLUTE_PATH", "EMPTY_NAME", "BAD_ENCODING", "PATH_TOO_LONG", "TOO_DEEP", "UNKNOWN_TYPE", "BAD_SPARSE_MAP", "HEADER_TOO_LARGE", "NOT_A_TAR", "TRUNCATED", "TRAILING_GARBAGE", "DECOMPRESSION_LIMIT", "TOO_MANY_ENTRIES", "BAD_WHITEOUT", "THROUGH_SYMLINK", "BAD_XATTR", "BAD_PAX", "HARDLINK_TARGET_INVALID", "HARDLINK_TO_MISSING"] as const) {
    assert.ok(rules.has(rule), `a case refused by ${rule}`);
  }
});

/** The first layer the validator refuses (1-based) and its error, or null when all pass. */
async function validateImage(c: CorpusCase): Promise<{ layer: number; error: LayerValidationError } | null> {
  for (let i = 0; i < c.layers.length; i++) {
    // Fed in 64 KiB chunks, as a download would arrive.
    const bytes = c.layers[i]!;
    const chunks = Array.from({ length: Math.ceil(bytes.length / 65536) }, (_, k) => bytes.subarray(k * 65536, (k + 1) * 65536));
    try {
      await validateLayer(Readable.from(chunks), CORPUS_LIMITS);
    } catch (err) {
      if (!(err instanceof LayerValidationError)) throw err;
      return { layer: i + 1, error: err };
    }
  }
  return null;
}

for (const c of cases) {
  const expect = c.expect;
  const label = expect.outcome === "refused" ? `${expect.stage === "validate" ? expect.rule : `accepted, left to the applier (${expect.rule})`}` : "accepted";
  test(`validator: ${c.name}: ${label}`, async () => {
    const result = await validateImage(c);
    if (expect.outcome === "refused" && expect.stage === "validate") {
      assert.ok(result, `${c.name} (${c.about}) was accepted; expected ${expect.rule} on layer ${expect.layer}`);
      assert.deepEqual(
        { layer: result.layer, rule: result.error.rule, entry: result.error.entry },
        { layer: expect.layer, rule: expect.rule, entry: expect.entry },
        result.error.message,
      );
      assert.ok(result.error.message.length > 10, "a sentence for humans");
    } else {
      assert.equal(result, null, result ? `${c.name} refused on layer ${result.layer}: ${result.error.rule}: ${result.error.message}` : "");
    }
  });
}

type Report = { ok: boolean; code?: string; message?: string; entry?: string; rule?: string };

function applyWithChild(root: string, blob: string, digest: string): Promise<Report> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CHILD, "--root", root, "--blob", blob, "--digest", digest], (_error, stdout, stderr) => {
      try {
        resolve(JSON.parse(stdout.trim().split("\n").at(-1) ?? "") as Report);
      } catch {
        resolve({ ok: false, code: "NO_REPORT", message: `${stdout}\n${stderr}` });
      }
    });
  });
}

const applierOpts = { skip: isRoot ? false : "needs root (the applier chroots)" };

/** Applies a case's only layer with the chrooted child into a fresh root: base/{root,1.tar}, removed after the test. */
async function applyFirstLayer(t: TestContext, c: CorpusCase): Promise<{ base: string; root: string; report: Report }> {
  const base = mkdtempSync(join(tmpdir(), "imgd-hostile-one-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const root = join(base, "root");
  mkdirSync(root);
  const blob = join(base, "1.tar");
  writeFileSync(blob, c.layers[0]!);
  return { base, root, report: await applyWithChild(root, blob, digestOf(c.layers[0]!)) };
}

for (const c of cases.filter((x) => x.expect.outcome === "applied" || x.expect.stage === "apply")) {
  test(`applier (chrooted): ${c.name}`, applierOpts, async (t) => {
    const base = mkdtempSync(join(tmpdir(), "imgd-hostile-"));
    t.after(() => rmSync(base, { recursive: true, force: true }));
    const root = join(base, "root");
    mkdirSync(root);
    // Next to the root, where an escape would land: must stay exactly as it is.
    writeFileSync(join(base, "imgd-sentinel"), "sentinel");
    let refusal: { layer: number; report: Report } | null = null;
    for (let i = 0; i < c.layers.length && !refusal; i++) {
      const blob = join(base, `${i + 1}.tar`);
      writeFileSync(blob, c.layers[i]!);
      const report = await applyWithChild(root, blob, digestOf(c.layers[i]!));
      if (!report.ok) refusal = { layer: i + 1, report };
    }
    assert.deepEqual(readdirSync(base).sort(), [...c.layers.map((_, i) => `${i + 1}.tar`), "imgd-sentinel", "root"].sort());
    assert.equal(readFileSync(join(base, "imgd-sentinel"), "utf8"), "sentinel");
    const expect = c.expect;
    if (expect.outcome === "applied") {
      assert.equal(refusal, null, JSON.stringify(refusal));
      assert.deepEqual(checkImage(root, expect.checks), []);
    } else {
      assert.ok(refusal, `${c.name} was applied; expected ${expect.rule}`);
      assert.deepEqual({ layer: refusal.layer, code: refusal.report.code, rule: refusal.report.rule, entry: refusal.report.entry }, { layer: expect.layer, code: "LAYER_REFUSED", rule: expect.rule, entry: expect.entry }, refusal.report.message);
    }
  });
}

test("checkImage walks without following symlinks, and reports what differs", (t) => {
  const root = mkdtempSync(join(tmpdir(), "imgd-check-"));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  mkdirSync(join(root, "etc"));
  writeFileSync(join(root, "etc/f"), "x");
  symlinkSync("/etc", join(root, "link"));
  assert.deepEqual(checkImage(root, [{ path: "etc/f", type: "file", content: "x" }, { path: "link", type: "symlink", target: "/etc" }, { path: "nope", type: "absent" }]), []);
  const problems = checkImage(root, [{ path: "link/passwd", type: "file" }, { path: "etc/f", type: "file", content: "y" }, { path: "etc", type: "absent" }]);
  assert.equal(problems.length, 3, problems.join("\n"));
  assert.match(problems[0]!, /link is not a directory/);
});

test("layer limits from the agent's settings (its one schema): the corpus's variables, and bad values refused", () => {
  const limits = (env: Record<string, string>) => loadAgentConfig([], { IMGD_STATE_DIR: "/tmp/x", ...env }).layerLimits;
  assert.deepEqual({ ...limits(LIMIT_ENV) }, { ...limits({}), ...CORPUS_LIMITS });
  assert.equal(limits({ IMGD_LAYER_MAX_BYTES: "1024" }).maxLayerBytes, 1024);
  for (const bad of ["0", "-1", "1e9", "12abc", "99999999999999999999"]) {
    assert.throws(() => limits({ IMGD_LAYER_MAX_ENTRIES: bad }), /IMGD_LAYER_MAX_ENTRIES/);
  }
});

test("the CLI writes a bucket-like tree and the expectations", async (t) => {
  const out = mkdtempSync(join(tmpdir(), "imgd-corpus-"));
  t.after(() => rmSync(out, { recursive: true, force: true }));
  await new Promise<void>((resolve, reject) => execFile(process.execPath, [CORPUS_CLI, "--out", out], (err) => (err ? reject(err) : resolve())));
  const doc = JSON.parse(readFileSync(join(out, "expectations.json"), "utf8"));
  assert.equal(doc.cases.length, cases.length);
  assert.deepEqual(doc.agentEnv, LIMIT_ENV);
  for (const c of cases) {
    const folder = join(out, "images", imageOf(c));
    assert.deepEqual(readdirSync(folder).sort(), c.layers.map((_, i) => `${i + 1}.tar`).sort());
    c.layers.forEach((bytes, i) => assert.equal(digestOf(readFileSync(join(folder, `${i + 1}.tar`))), digestOf(bytes)));
  }
});

// Device nodes are what every debootstrap root filesystem holds (/dev/null, /dev/console...): the
// applier creates them as the layer says (host mounts of images are nodev), whatever the
// validator's expectation in the corpus says about them.
for (const [name, want] of [["char-device", { path: "dev/mem", char: true, rdev: 0x101 }], ["block-device", { path: "dev/vda", char: false, rdev: 0xfd00 }]] as const) {
  test(`applier (chrooted): ${name} is created inside the root with its type, numbers, mode and owner`, applierOpts, async (t) => {
    const c = cases.find((x) => x.name === name)!;
    const { base, root, report } = await applyFirstLayer(t, c);
    assert.equal(report.ok, true, JSON.stringify(report));
    const node = lstatSync(join(root, want.path));
    assert.deepEqual([node.isCharacterDevice(), node.isBlockDevice(), node.rdev, node.mode & 0o7777, node.uid, node.gid], [want.char, !want.char, want.rdev, 0o666, 0, 0]);
    assert.deepEqual(readdirSync(base).sort(), ["1.tar", "root"]);
  });
}

// Hostile sparse maps are refused by BOTH guards, by the same rule and naming the same entry: the
// validator refuses them first, but the applier is a guard by itself.
for (const c of cases.filter((x) => x.expect.outcome === "refused" && x.expect.stage === "validate" && x.expect.rule === "BAD_SPARSE_MAP")) {
  test(`applier (chrooted) refuses ${c.name} as the validator does`, applierOpts, async (t) => {
    const expect = c.expect as Extract<CorpusCase["expect"], { stage: "validate" }>;
    const { root, report } = await applyFirstLayer(t, c);
    assert.deepEqual({ code: report.code, rule: report.rule, entry: report.entry }, { code: "LAYER_REFUSED", rule: expect.rule, entry: expect.entry }, report.message);
    assert.deepEqual(readdirSync(root), [], "nothing of the refused member is left");
  });
}

// The sparse cases keep their holes: each file's allocated blocks are far below its length.
for (const c of cases.filter((x) => x.name.startsWith("sparse-") && x.expect.outcome === "applied")) {
  test(`applier (chrooted): ${c.name} keeps the holes`, applierOpts, async (t) => {
    const { root, report } = await applyFirstLayer(t, c);
    assert.equal(report.ok, true, JSON.stringify(report));
    const allocated = (path: string) => lstatSync(join(root, path)).blocks * 512;
    assert.equal(allocated("var/empty"), 0, "an all-hole file has no block");
    assert.ok(allocated("var/db") <= 3 * 4096, `var/db: ${allocated("var/db")} bytes allocated for 3 regions of 20,004 bytes`);
    assert.ok(allocated("var/log") <= 4096, `var/log: ${allocated("var/log")} bytes allocated`);
  });
}
