import { test } from "node:test";
import assert from "node:assert/strict";
import { imageManifest, type LayerEntry } from "../fixtures/layer-model.ts";
import type { ManifestEntry } from "../fixtures/manifest.ts";

const T = 1_700_000_000;
const d = (name: string, extra: Partial<LayerEntry> = {}): LayerEntry => ({ name, type: "directory", mode: 0o755, uid: 0, gid: 0, mtime: T, ...extra });
const f = (name: string, body = "x", extra: Partial<LayerEntry> = {}): LayerEntry => ({ name, type: "file", mode: 0o644, uid: 0, gid: 0, mtime: T, content: Buffer.from(body), ...extra });
const l = (name: string, target: string): LayerEntry => ({ name, type: "link", mode: 0o644, uid: 0, gid: 0, mtime: T, linkname: target });
const s = (name: string, target: string): LayerEntry => ({ name, type: "symlink", mode: 0o777, uid: 0, gid: 0, mtime: T, linkname: target });
const wh = (name: string): LayerEntry => f(name, "");

function byPath(manifest: ManifestEntry[]): Map<string, ManifestEntry> {
  return new Map(manifest.map((e) => [e.path, e]));
}
const paths = (manifest: ManifestEntry[]) => manifest.map((e) => e.path);

test("a later layer replaces files; a directory over a directory only updates its metadata", () => {
  const m = byPath(imageManifest([
    [d("etc/"), f("etc/a", "old"), f("etc/b")],
    [d("etc/", { mode: 0o750, uid: 5, mtime: T + 9 }), f("etc/a", "new", { mode: 0o600 })],
  ]));
  assert.equal(m.get("/etc/a")!.size, 3);
  assert.equal(m.get("/etc/a")!.mode, 0o600);
  assert.ok(m.has("/etc/b"), "the directory keeps its content");
  assert.deepEqual([m.get("/etc")!.mode, m.get("/etc")!.uid, m.get("/etc")!.mtime], [0o750, 5, T + 9]);
});

test("replacing a directory by a file removes the subtree, and back again", () => {
  const layers = [[d("x/"), d("x/y/"), f("x/y/z")], [f("x", "now a file")]];
  assert.deepEqual(paths(imageManifest(layers)), ["/x"]);
  assert.deepEqual(paths(imageManifest([...layers, [d("x/"), f("x/new")]])), ["/x", "/x/new"]);
});

test("whiteouts delete lower files and directories, never this layer's entries", () => {
  const lower = [d("a/"), f("a/file"), d("a/dir/"), f("a/dir/inner"), f("a/kept")];
  assert.deepEqual(paths(imageManifest([lower, [d("a/"), wh("a/.wh.file"), wh("a/.wh.dir")]])), ["/a", "/a/kept"]);
  // The same-layer entry survives its whiteout, before or after it in archive order.
  for (const upper of [[d("a/"), wh("a/.wh.file"), f("a/file", "new")], [d("a/"), f("a/file", "new"), wh("a/.wh.file")]]) {
    assert.equal(byPath(imageManifest([lower, upper])).get("/a/file")!.size, 3);
  }
});

test("an opaque directory hides lower content but keeps this layer's entries on both sides of the marker", () => {
  const lower = [d("o/"), f("o/lower"), d("o/sub/"), f("o/sub/deep"), f("o/before", "lower version")];
  const upper = [d("o/"), f("o/before", "B"), wh("o/.wh..wh..opq"), f("o/after", "A")];
  const m = imageManifest([lower, upper]);
  assert.deepEqual(paths(m), ["/o", "/o/after", "/o/before"]);
  assert.equal(byPath(m).get("/o/before")!.size, 1);
  assert.ok(!paths(m).some((p) => p.includes(".wh.")), "whiteouts never appear");
});

test("missing parents are implied: 0755 root:root with an unknown mtime", () => {
  const m = byPath(imageManifest([[f("a/b/c")]]));
  for (const dir of ["/a", "/a/b"]) assert.deepEqual([m.get(dir)!.type, m.get(dir)!.mode, m.get(dir)!.uid, m.get(dir)!.gid, m.get(dir)!.mtime], ["dir", 0o755, 0, 0, null]);
});

test("directory mtimes: the layer's entry wins; a changed directory without an entry becomes unknown", () => {
  const base = [d("a/", { mtime: T }), f("a/x")];
  assert.equal(byPath(imageManifest([base, [d("a/", { mtime: T + 5 }), f("a/y")]])).get("/a")!.mtime, T + 5);
  assert.equal(byPath(imageManifest([base, [f("a/y")]])).get("/a")!.mtime, null);
  assert.equal(byPath(imageManifest([base, [f("b")]])).get("/a")!.mtime, T, "untouched");
});

test("hardlinks share an inode (one linkGroup); replacing one name splits the group", () => {
  const first = [d("bin/"), f("bin/perl", "perl", { mode: 0o755, xattrs: { "user.k": "v" } }), l("bin/perl5", "bin/perl"), l("bin/perl6", "bin/perl")];
  const m = byPath(imageManifest([first]));
  for (const p of ["/bin/perl", "/bin/perl5", "/bin/perl6"]) {
    assert.equal(m.get(p)!.linkGroup, "/bin/perl");
    assert.equal(m.get(p)!.mode, 0o755);
    assert.deepEqual(m.get(p)!.xattrs, { "user.k": "v" });
  }
  const split = byPath(imageManifest([first, [d("bin/"), f("bin/perl5", "new")]]));
  assert.equal(split.get("/bin/perl5")!.linkGroup, null);
  assert.equal(split.get("/bin/perl")!.linkGroup, "/bin/perl");
  assert.equal(split.get("/bin/perl")!.size, 4);
});

test("a hardlink binds to the file as it is when the link is applied", () => {
  const m = byPath(imageManifest([[f("g", "old")], [f("g", "newer"), l("h", "g")]]));
  assert.equal(m.get("/h")!.sha256, m.get("/g")!.sha256);
  assert.equal(m.get("/h")!.size, 5);
  assert.throws(() => imageManifest([[l("h", "missing")]]), /missing/);
  assert.throws(() => imageManifest([[d("dir/"), l("h", "dir")]]), /directory/);
});

test("symlinks: mode 0777, size is the target length, no xattrs; fifos keep their mode", () => {
  const m = byPath(imageManifest([[{ ...s("s", "../lib/x"), mode: 0o700 }, { name: "p", type: "fifo", mode: 0o600, uid: 3, gid: 4, mtime: T }]]));
  assert.deepEqual([m.get("/s")!.mode, m.get("/s")!.size, m.get("/s")!.target], [0o777, 8, "../lib/x"]);
  assert.deepEqual([m.get("/p")!.type, m.get("/p")!.mode, m.get("/p")!.uid], ["fifo", 0o600, 3]);
});

test("the manifest is sorted by path bytes and never lists the root", () => {
  const m = imageManifest([[d("./"), f("b"), f("a-"), d("a/"), f("a/z"), f("B")]]);
  assert.deepEqual(paths(m), ["/B", "/a", "/a-", "/a/z", "/b"]);
});
