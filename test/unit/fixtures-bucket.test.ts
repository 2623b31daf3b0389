import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createReadStream, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { validateLayer } from "../../agent/layers/validate.ts";
import { applyLayer } from "../../privhelper/apply/oci-apply.ts";
import { diffManifests, walkTree } from "../fixtures/tree.ts";
import { makeBucket, type BucketSummary } from "../fixtures/make-bucket.ts";
import type { ManifestEntry } from "../fixtures/manifest.ts";

const IMAGES = ["golang", "node", "python"];
let out: string;
let summary: BucketSummary;
const made: string[] = [];
const tempDir = (prefix: string) => {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
};
after(() => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

const layerBytes = (image: string, n: number) => readFileSync(join(out, "bucket/images", image, `${n}.tar`));
const sha = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
const expected = (image: string): Map<string, ManifestEntry> =>
  new Map((JSON.parse(readFileSync(join(out, "expected", `${image}.json`), "utf8")) as ManifestEntry[]).map((e) => [e.path, e]));

before(async () => {
  out = tempDir("imgd-bucket-");
  summary = await makeBucket(out);
});

test("the bucket has the real one's structure: 3 images x 5 layers, 1-3 shared, 4 shared by node and python", () => {
  for (const image of IMAGES) assert.deepEqual(readdirSync(join(out, "bucket/images", image)).sort(), ["1.tar", "2.tar", "3.tar", "4.tar", "5.tar"]);
  for (const n of [1, 2, 3]) {
    assert.ok(layerBytes("golang", n).equals(layerBytes("node", n)) && layerBytes("node", n).equals(layerBytes("python", n)), `layer ${n} shared`);
  }
  assert.ok(layerBytes("node", 4).equals(layerBytes("python", 4)));
  assert.ok(!layerBytes("golang", 4).equals(layerBytes("node", 4)));
  const fives = IMAGES.map((image) => sha(layerBytes(image, 5)));
  assert.equal(new Set(fives).size, 3);
  assert.ok(layerBytes("node", 5).length < 100_000 && layerBytes("python", 5).length < 1_000_000, "node's and python's 5 are small");
  const base = layerBytes("golang", 1).length;
  assert.ok(base > 8e6 && base < 12e6, `layer 1 is ${base} bytes`);
  let total = 0;
  for (const image of IMAGES) for (const n of [1, 2, 3, 4, 5]) total += layerBytes(image, n).length;
  assert.ok(total > 20e6 && total < 100e6, `${total} bytes in all`);
});

test("summary.json lists sizes, digests and OCI chain ids", () => {
  assert.deepEqual(JSON.parse(readFileSync(join(out, "summary.json"), "utf8")), summary);
  for (const image of IMAGES) {
    const layers = summary.images[image]!;
    layers.forEach((l, i) => {
      const bytes = layerBytes(image, i + 1);
      assert.equal(l.digest, `sha256:${sha(bytes)}`);
      assert.equal(l.size, bytes.length);
      assert.equal(l.size % 512, 0);
      assert.equal(l.chainId, i === 0 ? l.digest : `sha256:${sha(`${layers[i - 1]!.chainId} ${l.digest}`)}`);
    });
  }
  assert.equal(summary.images.node![2]!.chainId, summary.images.golang![2]!.chainId);
  assert.equal(summary.images.node![3]!.chainId, summary.images.python![3]!.chainId);
});

test("the bucket is deterministic: a second run writes the same bytes", async () => {
  const again = tempDir("imgd-bucket-");
  assert.deepEqual(await makeBucket(again), summary);
  for (const image of IMAGES) {
    assert.equal(sha(readFileSync(join(again, "expected", `${image}.json`))), sha(readFileSync(join(out, "expected", `${image}.json`))));
  }
});

test("every layer passes the agent's validator", async () => {
  for (const image of IMAGES) {
    for (const n of [1, 2, 3, 4, 5]) {
      const result = await validateLayer(createReadStream(join(out, "bucket/images", image, `${n}.tar`)));
      assert.equal(result.tarBytes, layerBytes(image, n).length);
      assert.equal(result.lowerLayerLinks, 0, "fixtures only link within a layer");
    }
  }
});

test("the expected trees show each exercised case", () => {
  const node = expected("node");
  const golang = expected("golang");
  const python = expected("python");
  for (const tree of [node, golang, python]) {
    const at = (p: string) => tree.get(p) ?? assert.fail(`${p} missing`);
    assert.ok(![...tree.keys()].some((p) => p.includes(".wh.")), "no whiteout is visible");
    assert.deepEqual([at("/tmp").mode, at("/root").mode, at("/var/mail").mode, at("/var/mail").gid], [0o1777, 0o700, 0o2775, 8]);
    assert.deepEqual([at("/usr/bin/su").mode, at("/usr/bin/su").uid, at("/usr/bin/chage").mode], [0o4755, 0, 0o2755]);
    assert.deepEqual([at("/bin").type, at("/bin").target], ["symlink", "usr/bin"]);
    assert.equal(at("/etc/os-release").target, "../usr/lib/os-release");
    assert.match(readFileSync(join(out, "bucket/images/golang/1.tar")).toString("latin1"), /VERSION_CODENAME=bookworm/);
    assert.equal(at("/run/initctl").type, "fifo");
    assert.equal(at("/etc/subuid").size, 0);
    assert.deepEqual(at("/etc/debian_version").xattrs, { "user.origin": "debian" });
    assert.deepEqual(at("/usr/share/doc/libc6").xattrs, { "user.comment": "glibc documentation" });
    assert.deepEqual([at("/var/www/html/index.html").uid, at("/var/spool/nobody/queue").uid, at("/home/dev").uid], [33, 65534, 1000]);
    assert.ok([...tree.keys()].some((p) => p.split("/").some((c) => c.length > 100)), "a name component > 100 bytes");
    // Layer 2: deletions, a replaced file hardlinked twice in its own layer.
    for (const gone of ["/etc/cron.daily/dpkg", "/usr/share/doc/libgdbm-compat4", "/var/cache/debconf/templates.dat-old"]) assert.ok(!tree.has(gone), gone);
    assert.ok(tree.has("/etc/cron.daily/apt-compat"));
    assert.deepEqual(["/usr/bin/gzip", "/usr/bin/gunzip", "/usr/bin/zcat"].map((p) => at(p).linkGroup), Array(3).fill("/usr/bin/gunzip"));
    assert.equal(at("/srv").mode, 0o750);
    // Layer 3: the opaque directory.
    assert.deepEqual([...tree.keys()].filter((p) => p.startsWith("/etc/apt/sources.list.d/")), ["/etc/apt/sources.list.d/a-early.list", "/etc/apt/sources.list.d/z-late.list"]);
    assert.equal(at("/usr/lib/git-core/git").linkGroup, "/usr/bin/git");
    // Exactly one implied directory, in python.
    const unknownTimes = [...tree.values()].filter((e) => e.mtime === null).map((e) => e.path);
    assert.deepEqual(unknownTimes, tree === python ? ["/opt/venv"] : []);
  }
  // Layer 4 (node, python): perl5.36.0 replaced, splitting it from perl; magic back to a file.
  for (const tree of [node, python]) {
    assert.equal(tree.get("/usr/bin/perl")!.linkGroup, null);
    assert.notEqual(tree.get("/usr/bin/perl")!.sha256, tree.get("/usr/bin/perl5.36.0")!.sha256);
    assert.equal(tree.get("/usr/share/misc/magic")!.type, "file");
    assert.ok(!tree.has("/usr/lib/git-core/git-shell"));
    assert.equal(tree.get("/usr/bin/cc")!.target, "/etc/alternatives/cc");
  }
  assert.equal(golang.get("/usr/bin/perl")!.linkGroup, "/usr/bin/perl");
  assert.equal(golang.get("/usr/share/misc/magic")!.type, "symlink");
  assert.ok(golang.has("/usr/lib/git-core/git-shell"));
  assert.equal(python.get("/usr/bin/python3")!.target, "/usr/bin/python3.11");
  assert.deepEqual([python.get("/opt/venv")!.mode, python.get("/opt/venv")!.uid], [0o755, 0]);
  assert.equal(node.get("/usr/local/bin/npm")!.target, "../lib/node_modules/npm/bin/npm-cli.js");
  assert.ok(!node.has("/etc/motd") && python.has("/etc/motd"));
});

test("the helper's applier, on a real filesystem, produces exactly the expected trees", { skip: process.getuid?.() !== 0 && "needs root (chown)" }, async () => {
  // Not chrooted here: the applier resolves every path inside the root by itself.
  for (const image of IMAGES) {
    const root = tempDir(`imgd-apply-${image}-`);
    for (const n of [1, 2, 3, 4, 5]) await applyLayer(root, createReadStream(join(out, "bucket/images", image, `${n}.tar`)));
    const want = JSON.parse(readFileSync(join(out, "expected", `${image}.json`), "utf8")) as ManifestEntry[];
    assert.deepEqual(diffManifests(want, await walkTree(root)), [], image);
  }
});
