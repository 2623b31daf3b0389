import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, chownSync, linkSync, lutimesSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { diffManifests, walkTree, type ManifestEntry } from "../fixtures/tree.ts";
import { writeXattr } from "../fixtures/xattrs.ts";

const T = 1_700_000_000;
const made: string[] = [];
const tempDir = () => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-tree-"));
  made.push(dir);
  return dir;
};
after(() => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});
const isRoot = process.getuid?.() === 0;
const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

function entry(path: string, extra: Partial<ManifestEntry> = {}): ManifestEntry {
  return { path, type: "file", mode: 0o644, uid: 0, gid: 0, size: 0, sha256: null, target: null, mtime: T, xattrs: {}, linkGroup: null, ...extra };
}

test("walkTree reads types, modes, owners, content hashes, targets, times, user xattrs and hardlinks", { skip: !isRoot && "needs root (chown)" }, async () => {
  const root = tempDir();
  mkdirSync(join(root, "lost+found"));
  mkdirSync(join(root, "etc/sub/lost+found"), { recursive: true });
  writeFileSync(join(root, "etc/hello"), "hello\n");
  linkSync(join(root, "etc/hello"), join(root, "hello-link"));
  writeFileSync(join(root, "su"), "");
  chownSync(join(root, "su"), 1000, 33);
  chmodSync(join(root, "su"), 0o4755);
  mkdirSync(join(root, "tmp"));
  chmodSync(join(root, "tmp"), 0o1777);
  symlinkSync("/usr/bin/python3.11", join(root, "python3"));
  execFileSync("mkfifo", ["-m", "600", join(root, "fifo")]);
  writeXattr(join(root, "etc/hello"), "user.origin", "test");
  writeXattr(join(root, "etc/hello"), "trusted.ignored", "x");
  writeXattr(join(root, "etc"), "user.empty", "");
  for (const p of ["etc/hello", "su", "fifo", "tmp", "etc/sub/lost+found", "etc/sub", "etc", "lost+found"]) utimesSync(join(root, p), T, T);
  lutimesSync(join(root, "python3"), T + 1, T + 1);

  const tree = await walkTree(root);
  const hello = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
  assert.deepEqual(tree, [
    entry("/etc", { type: "dir", mode: 0o755, xattrs: { "user.empty": "" } }),
    entry("/etc/hello", { size: 6, sha256: hello, xattrs: { "user.origin": "test" }, linkGroup: "/etc/hello" }),
    entry("/etc/sub", { type: "dir", mode: 0o755 }),
    entry("/etc/sub/lost+found", { type: "dir", mode: 0o755 }),
    entry("/fifo", { type: "fifo", mode: 0o600 }),
    entry("/hello-link", { size: 6, sha256: hello, xattrs: { "user.origin": "test" }, linkGroup: "/etc/hello" }),
    entry("/python3", { type: "symlink", mode: 0o777, size: 19, target: "/usr/bin/python3.11", mtime: T + 1 }),
    entry("/su", { mode: 0o4755, uid: 1000, gid: 33, sha256: EMPTY_SHA256 }),
    entry("/tmp", { type: "dir", mode: 0o1777 }),
  ]);
});

test("walkTree output matches itself through diffManifests", async () => {
  const root = tempDir();
  writeFileSync(join(root, "a"), "x");
  const tree = await walkTree(root);
  assert.deepEqual(diffManifests(tree, tree), []);
  assert.deepEqual(diffManifests(JSON.parse(JSON.stringify(tree)), await walkTree(root)), []);
});

test("diffManifests explains each difference on one line", () => {
  const expected = [
    entry("/bin", { type: "symlink", mode: 0o777, target: "usr/bin", size: 7 }),
    entry("/etc", { type: "dir", mode: 0o755, mtime: null }),
    entry("/etc/motd", { size: 3, sha256: "aa", xattrs: { "user.a": "1", "user.b": "2" } }),
    entry("/gone"),
    entry("/su", { mode: 0o4755, linkGroup: "/su" }),
  ];
  const actual = [
    entry("/bin", { type: "dir", mode: 0o755 }),
    entry("/etc", { type: "dir", mode: 0o755, mtime: 12345 }),
    entry("/etc/motd", { size: 4, sha256: "bb", xattrs: { "user.b": "2", "user.a": "1" }, mtime: T + 60 }),
    entry("/extra", { type: "fifo" }),
    entry("/su", { mode: 0o755, uid: 1 }),
  ];
  assert.deepEqual(diffManifests(expected, actual), [
    "/bin: type expected symlink, got dir",
    `/etc/motd: mtime expected ${T} (2023-11-14T22:13:20.000Z), got ${T + 60} (2023-11-14T22:14:20.000Z)`,
    '/etc/motd: sha256 expected "aa", got "bb"',
    "/etc/motd: size expected 3, got 4",
    "/extra: unexpected fifo",
    "/gone: missing (expected file)",
    '/su: linkGroup expected "/su", got null',
    "/su: mode expected 04755, got 0755",
    "/su: uid expected 0, got 1",
  ]);
});

test("walkTree records content, not allocation: a sparse file and a dense copy of it are the same entry", async () => {
  const [sparse, dense] = [tempDir(), tempDir()];
  writeFileSync(join(sparse, "f"), "head");
  execFileSync("truncate", ["-s", "1M", join(sparse, "f")]);
  writeFileSync(join(dense, "f"), Buffer.concat([Buffer.from("head"), Buffer.alloc(1024 * 1024 - 4)]));
  for (const dir of [sparse, dense]) utimesSync(join(dir, "f"), T, T);
  const [a, b] = [await walkTree(sparse), await walkTree(dense)];
  assert.equal(a[0]!.size, 1024 * 1024);
  assert.deepEqual(diffManifests(a, b), []);
});
