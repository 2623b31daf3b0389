// The layer applier child, run for real (as root, chrooted) against temporary directories:
// OCI layer semantics, and that nothing a layer says can touch the host.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, lstatSync, openSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { Readable } from "node:stream";
import { gzipSync, zstdCompressSync } from "node:zlib";
import { fileURLToPath } from "node:url";
import koffi from "koffi";
import tar from "tar-stream";
import { decompressed } from "../../privhelper/apply/decompress.ts";
import { applyLayer, LayerRefused } from "../../privhelper/apply/oci-apply.ts";
import { MAX_REGIONS } from "../../privhelper/apply/sparse.ts";
import { debianTool } from "../helpers/debian-tool.ts";
import { contentOf, gnuSparseArchives, SPARSE_FILES } from "../fixtures/gnu-sparse.ts";
import { END_OF_ARCHIVE, paxRecords, rawTar, SPARSE_FORMATS, sparseFile, sparseMember } from "../fixtures/tar-bytes.ts";

const CHILD = fileURLToPath(new URL("../../privhelper/apply/child.ts", import.meta.url));
const isRoot = process.getuid?.() === 0;

type HeaderInput = Partial<Omit<tar.Header, "pax">> & { name: string; pax?: Record<string, string> };
type Entry = { header: HeaderInput; body?: string | Buffer };

async function buildTar(entries: Entry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = (async () => {
    for await (const chunk of pack) chunks.push(chunk as Buffer);
  })();
  for (const { header, body } of entries) {
    await new Promise<void>((resolve, reject) =>
      body === undefined ? pack.entry(header as tar.Header, (err) => (err ? reject(err) : resolve()))
        : pack.entry(header as tar.Header, body, (err) => (err ? reject(err) : resolve())));
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const file = (name: string, body: string, extra: Omit<HeaderInput, "name"> = {}): Entry => ({ header: { name, type: "file", mode: 0o644, ...extra }, body });
const dir = (name: string, extra: Omit<HeaderInput, "name"> = {}): Entry => ({ header: { name, type: "directory", mode: 0o755, ...extra } });
const symlink = (name: string, linkname: string): Entry => ({ header: { name, type: "symlink", linkname } });
const hardlink = (name: string, linkname: string): Entry => ({ header: { name, type: "link", linkname } });

type Report = { ok: boolean; entries?: number; bytes?: number; code?: string; message?: string; entry?: string; rule?: string };

function runChild(args: string[], env?: NodeJS.ProcessEnv): Promise<{ report: Report; exitCode: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CHILD, ...args], { env: env ?? process.env }, (error, stdout, stderr) => {
      const last = stdout.trim().split("\n").at(-1) ?? "";
      let report: Report;
      try {
        report = JSON.parse(last) as Report;
      } catch {
        report = { ok: false, code: "NO_REPORT", message: `${stdout}\n${stderr}` };
      }
      resolve({ report, exitCode: error ? Number(error.code ?? 1) : 0, stderr });
    });
  });
}

type Sandbox = { base: string; root: string; apply(entries: Entry[] | Buffer, digest?: string): Promise<Report> };

function sandbox(t: TestContext): Sandbox {
  const base = mkdtempSync(join(tmpdir(), "imgd-apply-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const root = join(base, "root");
  mkdirSync(root);
  let layer = 0;
  return {
    base,
    root,
    async apply(entries, digest) {
      const blob = Buffer.isBuffer(entries) ? entries : await buildTar(entries);
      const path = join(base, `layer${++layer}.tar`);
      writeFileSync(path, blob);
      const actual = `sha256:${createHash("sha256").update(blob).digest("hex")}`;
      const { report, exitCode, stderr } = await runChild(["--root", root, "--blob", path, "--digest", digest ?? actual]);
      assert.equal(exitCode === 0, report.ok, `exit code ${exitCode} disagrees with report ${JSON.stringify(report)} ${stderr}`);
      return report;
    },
  };
}

const libc = koffi.load("libc.so.6");
const lgetxattr = libc.func("long lgetxattr(const char *path, const char *name, void *value, size_t size)");
function getXattr(path: string, name: string): Buffer | null {
  const buffer = Buffer.alloc(256);
  const length = Number(lgetxattr(path, name, buffer, buffer.length));
  return length < 0 ? null : buffer.subarray(0, length);
}

const T1 = new Date("2020-01-02T03:04:05Z");
const T2 = new Date("2021-06-07T08:09:10Z");
const T3 = new Date("2019-12-31T23:59:59Z");
const opts = { skip: isRoot ? false : "needs root (chroot, chown)" };

test("with Node's compile cache on (as the helper runs it), nothing but the layer is written into the image", opts, async (t) => {
  // Every thread writes its compile cache when it ends: one that ends inside the chroot (the
  // hashing thread did) would create the cache's path in the image. The 20-cut power soak found it.
  const box = sandbox(t);
  const blob = await buildTar([file("f", "x")]);
  const path = join(box.base, "layer.tar");
  writeFileSync(path, blob);
  const digest = `sha256:${createHash("sha256").update(blob).digest("hex")}`;
  const cache = join(box.base, "compile-cache");
  for (const run of ["cold cache", "warm cache"]) {
    const { report, stderr } = await runChild(["--root", box.root, "--blob", path, "--digest", digest], { ...process.env, NODE_COMPILE_CACHE: cache });
    assert.equal(report.ok, true, `${run}: ${JSON.stringify(report)} ${stderr}`);
    assert.deepEqual(readdirSync(box.root), ["f"], `${run}: the image holds only the layer's file`);
  }
  assert.ok(readdirSync(cache).length > 0, "the cache is written on the host");
});

test("owners, modes (setuid/setgid/sticky), mtimes, xattrs, links, fifos", opts, async (t) => {
  const box = sandbox(t);
  // A v2 file capability (cap_net_raw), all bytes < 0x80 so it survives tar-stream's UTF-8 decoding.
  const capability = Buffer.from([0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  const report = await box.apply([
    dir("etc/", { mtime: T1 }),
    file("etc/conf", "secret=1\n", { uid: 1234, gid: 5678, mode: 0o640, mtime: T2, pax: { "SCHILY.xattr.user.origin": "layer-one" } }),
    file("usr/bin/su", "#!su", { mode: 0o4755, mtime: T2 }),
    file("usr/bin/wall", "#!wall", { mode: 0o2755, gid: 5 }),
    file("usr/bin/ping", "#!ping", { mode: 0o755, pax: { "SCHILY.xattr.security.capability": capability.toString("latin1") } }),
    dir("tmp/", { mode: 0o1777, mtime: T3 }),
    { header: { name: "run/initctl", type: "fifo", mode: 0o600, uid: 7, gid: 8 } },
    symlink("bin/sh", "/usr/bin/dash"),
    symlink("lib", "usr/lib"),
    hardlink("usr/bin/su-again", "usr/bin/su"),
    file("etc/zz-late", "added after etc's own entry"),
  ]);
  assert.deepEqual(report.ok, true, JSON.stringify(report));
  assert.equal(report.entries, 11);

  const conf = statSync(join(box.root, "etc/conf"));
  assert.equal(readFileSync(join(box.root, "etc/conf"), "utf8"), "secret=1\n");
  assert.deepEqual([conf.uid, conf.gid, conf.mode & 0o7777], [1234, 5678, 0o640]);
  assert.equal(conf.mtime.getTime(), T2.getTime());
  assert.equal(getXattr(join(box.root, "etc/conf"), "user.origin")?.toString(), "layer-one");
  assert.deepEqual(getXattr(join(box.root, "usr/bin/ping"), "security.capability"), capability);

  assert.equal(statSync(join(box.root, "usr/bin/su")).mode & 0o7777, 0o4755);
  assert.equal(statSync(join(box.root, "usr/bin/wall")).mode & 0o7777, 0o2755);
  assert.equal(statSync(join(box.root, "usr/bin/wall")).gid, 5);
  assert.equal(statSync(join(box.root, "tmp")).mode & 0o7777, 0o1777);
  // Directory mtimes are set last, after their children were added.
  assert.equal(statSync(join(box.root, "etc")).mtime.getTime(), T1.getTime());
  assert.equal(statSync(join(box.root, "tmp")).mtime.getTime(), T3.getTime());
  // Parents missing from the tar are created 0755 root.
  const usr = statSync(join(box.root, "usr"));
  assert.deepEqual([usr.isDirectory(), usr.mode & 0o7777, usr.uid, usr.gid], [true, 0o755, 0, 0]);

  const fifo = lstatSync(join(box.root, "run/initctl"));
  assert.deepEqual([fifo.isFIFO(), fifo.mode & 0o7777, fifo.uid, fifo.gid], [true, 0o600, 7, 8]);
  assert.equal(readlinkSync(join(box.root, "bin/sh")), "/usr/bin/dash");
  assert.equal(readlinkSync(join(box.root, "lib")), "usr/lib");
  const su = statSync(join(box.root, "usr/bin/su"));
  const again = statSync(join(box.root, "usr/bin/su-again"));
  assert.deepEqual([again.ino, again.nlink], [su.ino, 2]);
});

test("overwrite: files replaced, directories merged with updated metadata", opts, async (t) => {
  const box = sandbox(t);
  assert.ok((await box.apply([file("a", "old"), dir("d/", { mode: 0o755 }), file("d/keep", "lower")])).ok);
  assert.ok((await box.apply([file("a", "new"), dir("d/", { mode: 0o700, uid: 42 })])).ok);
  assert.equal(readFileSync(join(box.root, "a"), "utf8"), "new");
  assert.equal(readFileSync(join(box.root, "d/keep"), "utf8"), "lower");
  const d = statSync(join(box.root, "d"));
  assert.deepEqual([d.mode & 0o7777, d.uid], [0o700, 42]);
});

test("whiteouts delete lower entries recursively and are never created", opts, async (t) => {
  const box = sandbox(t);
  assert.ok((await box.apply([file("f", "x"), file("x/y/z", "deep"), file("x/other", "o")])).ok);
  assert.ok((await box.apply([file(".wh.f", ""), file("x/.wh.y", ""), file("x/.wh.missing", "")])).ok);
  assert.equal(existsSync(join(box.root, "f")), false);
  assert.equal(existsSync(join(box.root, "x/y")), false);
  assert.deepEqual(readdirSync(join(box.root, "x")), ["other"]);
  assert.deepEqual(readdirSync(box.root).sort(), ["x"]);
});

test("opaque directory: hides lower content, keeps this layer's entries before and after the marker", opts, async (t) => {
  const box = sandbox(t);
  assert.ok((await box.apply([file("o/old1", "1"), file("o/sub/old2", "2"), file("o/sub/old3", "3"), file("outside", "x")])).ok);
  assert.ok((await box.apply([
    dir("o/"),
    file("o/new1", "before marker"),
    file("o/sub/fresh", "same layer, in a lower directory"),
    file("o/.wh..wh..opq", ""),
    file("o/new2", "after marker"),
  ])).ok);
  assert.deepEqual(readdirSync(join(box.root, "o")).sort(), ["new1", "new2", "sub"]);
  assert.deepEqual(readdirSync(join(box.root, "o/sub")), ["fresh"]);
  assert.equal(readFileSync(join(box.root, "o/new1"), "utf8"), "before marker");
  assert.equal(existsSync(join(box.root, "outside")), true);
});

test("file -> directory -> file replacement, across layers and within one", opts, async (t) => {
  const box = sandbox(t);
  assert.ok((await box.apply([file("p", "file"), symlink("q", "p")])).ok);
  assert.ok((await box.apply([dir("p/"), file("p/child", "c"), dir("q/")])).ok);
  assert.ok(statSync(join(box.root, "p")).isDirectory());
  assert.ok(lstatSync(join(box.root, "q")).isDirectory(), "a directory entry replaces a lower symlink");
  assert.equal(readFileSync(join(box.root, "p/child"), "utf8"), "c");
  assert.ok((await box.apply([file("p", "file again"), file("r", "1"), dir("r/"), file("r/in", "2"), file("r", "3")])).ok);
  assert.equal(readFileSync(join(box.root, "p"), "utf8"), "file again");
  assert.equal(readFileSync(join(box.root, "r"), "utf8"), "3");
});

test("a file over a lower symlink to a host path replaces the link; the host file is untouched", opts, async (t) => {
  const box = sandbox(t);
  const hostDir = join(box.base, "host");
  mkdirSync(hostDir);
  const hostFile = join(hostDir, "precious");
  writeFileSync(hostFile, "original");
  assert.ok((await box.apply([
    symlink("evil", hostFile),
    symlink("evildir", hostDir),
    symlink("up", `../../../../../../../../..${hostDir}`),
  ])).ok);
  assert.ok((await box.apply([file("evil", "pwned")])).ok);
  assert.equal(readFileSync(hostFile, "utf8"), "original");
  assert.ok(lstatSync(join(box.root, "evil")).isFile());
  assert.equal(readFileSync(join(box.root, "evil"), "utf8"), "pwned");

  // Writing *through* such links: confined to the image by the chroot (the links dangle there).
  for (const name of ["evildir/planted", "up/planted"]) {
    const report = await box.apply([file(name, "pwned")]);
    assert.equal(report.ok, false, name);
    assert.equal(report.rule, "PARENT_NOT_DIR", JSON.stringify(report));
  }
  // A hard link cannot name a host file either.
  const hard = await box.apply([hardlink("stolen", hostFile)]);
  assert.equal(hard.rule, "HARDLINK_TO_MISSING", JSON.stringify(hard));
  assert.deepEqual(readdirSync(hostDir), ["precious"]);
  assert.equal(readFileSync(hostFile, "utf8"), "original");
});

test("symlink loops: entries under one are refused (PARENT_NOT_DIR), whiteouts under one delete nothing", opts, async (t) => {
  const box = sandbox(t);
  // root -> /root names itself inside the chroot; a -> b -> a is a loop of two.
  assert.ok((await box.apply([symlink("root", "/root"), symlink("a", "b"), symlink("b", "a")])).ok);
  for (const name of ["root/.ssh/authorized_keys", "root/x", "a/x", "b/c/d/"]) {
    const report = await box.apply([name.endsWith("/") ? dir(name) : file(name, "x")]);
    assert.deepEqual({ code: report.code, rule: report.rule, entry: report.entry }, { code: "LAYER_REFUSED", rule: "PARENT_NOT_DIR", entry: name }, report.message);
  }
  const whiteouts = await box.apply([file("root/.wh..ssh", ""), file("a/x/.wh..wh..opq", ""), file("b/.wh.c", "")]);
  assert.ok(whiteouts.ok, JSON.stringify(whiteouts));
  const hard = await box.apply([hardlink("stolen", "a/x")]);
  assert.equal(hard.rule, "HARDLINK_TO_MISSING", JSON.stringify(hard));
  // A directory this layer dated, then made unreachable by a loop over its parent: no failure.
  assert.ok((await box.apply([dir("d/", { mtime: T1 }), dir("d/e/", { mtime: T1 }), symlink("d", "/d")])).ok);
  assert.deepEqual(readdirSync(box.root).sort(), ["a", "b", "d", "root"]);
  assert.equal(readlinkSync(join(box.root, "root")), "/root");
});

test("a directory replaced by a non-directory takes this layer's symlinks under it along; hard links to symlinks are symlinks", opts, async (t) => {
  const box = sandbox(t);
  const refusal = async (tar: Buffer) => {
    const report = await box.apply(tar);
    return [report.ok, report.rule, report.entry];
  };
  // The fifo replaced "a" and the link under it: the fifo is the parent, as the validator says.
  assert.deepEqual(await refusal(rawTar([[{ name: "a/a", typeflag: "2", linkname: "/etc" }], [{ name: "a", typeflag: "6" }], [{ name: "a/a/a/", typeflag: "5" }]])), [false, "PARENT_NOT_DIR", "a/a/a/"]);
  // A new directory there is empty: the member makes its parents afresh.
  const fresh = await box.apply(rawTar([[{ name: "b/b", typeflag: "2", linkname: "/etc" }], [{ name: "b", typeflag: "6" }], [{ name: "b/", typeflag: "5" }], [{ name: "b/b/x" }, "x"]]));
  assert.ok(fresh.ok, JSON.stringify(fresh));
  assert.ok(lstatSync(join(box.root, "b/b")).isDirectory());
  assert.equal(readFileSync(join(box.root, "b/b/x"), "utf8"), "x");
  // A hard link to this layer's symlink is that symlink: nothing is written through it.
  const through = rawTar([[{ name: "d/", typeflag: "5" }], [{ name: "s", typeflag: "2", linkname: "d" }], [{ name: "h", typeflag: "1", linkname: "s" }], [{ name: "h/x" }, "x"]]);
  assert.deepEqual(await refusal(through), [false, "THROUGH_SYMLINK", "h/x"]);
  // A hard link under its own path would replace the directory its target is in.
  assert.deepEqual(await refusal(rawTar([[{ name: "c/b/b", typeflag: "6" }], [{ name: "c", typeflag: "1", linkname: "c/b/b" }]])), [false, "HARDLINK_TARGET_INVALID", "c"]);
  // A whiteout under a non-directory deletes nothing there: refused as any member under one.
  assert.deepEqual(await refusal(rawTar([[{ name: "f", typeflag: "6" }], [{ name: "f/.wh.b" }]])), [false, "PARENT_NOT_DIR", "f/.wh.b"]);
});

test("PAX: one extended header per member, no empty path or linkpath, numbers and global headers as the validator reads them", opts, async (t) => {
  const box = sandbox(t);
  const x = (records: [string, string][]) => [{ name: "PaxHeaders/f", typeflag: "x" }, paxRecords(records)] as const;
  const cases: [Buffer, string, string][] = [
    [rawTar([x([["comment", "first"]]), x([["mtime", "1"]]), [{ name: "f" }, "x"]]), "BAD_PAX", "(archive)"],
    [rawTar([x([["path", ""]]), [{ name: "f" }, "x"]]), "BAD_PAX", "f"],
    [rawTar([x([["linkpath", ""]]), [{ name: "l", typeflag: "2", linkname: "t" }]]), "BAD_PAX", "l"],
    [rawTar([x([["uid", "99999999999999999999"]]), [{ name: "f" }, "x"]]), "BAD_PAX", "f"],
    [rawTar([x([["mtime", "12345678901234567890"]]), [{ name: "f" }, "x"]]), "BAD_PAX", "f"],
    [rawTar([x([["ctime", "soon"]]), [{ name: "f" }, "x"]]), "BAD_PAX", "f"],
    [rawTar([x([["uid", "4294967295"], ["mtime", "x"]]), [{ name: "f" }, "x"]]), "BAD_PAX", "f"],
    [rawTar([x([["uid", "4294967295"]]), [{ name: "f" }, "x"]]), "BAD_OWNER", "f"],
    [rawTar([x([["path", "p"]]), [{ name: "f" }, "x"], [{ name: "q", typeflag: "1", linkname: "p" }]]), "", ""], // renamed, then linked
    [rawTar([[{ name: "pax_global_header", typeflag: "g" }, paxRecords([["uid", "5"]])], [{ name: "f" }, "x"]]), "BAD_PAX", "(archive)"],
    // An extended header no member follows: TRUNCATED (the validator's), even with the end marker.
    [rawTar([x([["comment", "c"]])]), "TRUNCATED", "(archive)"],
    [rawTar([[{ name: "f" }, "x"]]).subarray(0, -100), "TRUNCATED", "(archive)"], // part of the second zero block
  ];
  for (const [tar, rule, entry] of cases) {
    const report = await box.apply(tar);
    if (rule === "") assert.ok(report.ok, JSON.stringify(report));
    else assert.deepEqual([report.ok, report.rule, report.entry], [false, rule, entry], JSON.stringify(report));
  }
  // A global comment (git archive) is fine; an empty xattr value is a value.
  const fine = await box.apply(rawTar([[{ name: "pax_global_header", typeflag: "g" }, paxRecords([["comment", "abc"]])], x([["SCHILY.xattr.user.empty", ""], ["gid", "007"], ["mtime", "-1.5"]]), [{ name: "g" }, "x"]]));
  assert.ok(fine.ok, JSON.stringify(fine));
  assert.equal(statSync(join(box.root, "g")).gid, 7);
  assert.deepEqual(getXattr(join(box.root, "g"), "user.empty"), Buffer.alloc(0));
});

test("names with '..' are refused; absolute names land inside the root", opts, async (t) => {
  const box = sandbox(t);
  for (const name of ["../escape", "a/../../escape", "a/b/../../../escape", ".."]) {
    const report = await box.apply([file(name, "x")]);
    assert.deepEqual([report.ok, report.code, report.rule, report.entry], [false, "LAYER_REFUSED", "DOTDOT", name]);
  }
  const link = await box.apply([file("target", "t"), hardlink("l", "../target")]);
  assert.equal(link.rule, "HARDLINK_TARGET_INVALID");
  assert.equal(existsSync(join(box.base, "escape")), false);

  const absolute = `${box.base}/absolute-escape`;
  assert.ok((await box.apply([file(absolute, "inside"), file("/etc/abs", "inside too")])).ok);
  assert.equal(existsSync(absolute), false, "not written on the host");
  assert.equal(readFileSync(join(box.root, absolute), "utf8"), "inside");
  assert.equal(readFileSync(join(box.root, "etc/abs"), "utf8"), "inside too");
});

test("foreign xattrs, unknown whiteouts and broken tars are refused with the validator's rule names", opts, async (t) => {
  const box = sandbox(t);
  const whole = await buildTar([file("big", "y".repeat(5000))]);
  const cases: [Entry[] | Buffer, string][] = [
    [[file("x", "", { pax: { "SCHILY.xattr.trusted.overlay.opaque": "y" } })], "BAD_XATTR"],
    [[file("x", "", { pax: { "SCHILY.xattr.security.selinux": "unconfined_u" } })], "BAD_XATTR"],
    [[dir("d/", { pax: { "SCHILY.xattr.security.capability": "x" } })], "BAD_XATTR"],
    [[file("d/.wh..wh.plnk", "")], "BAD_WHITEOUT"],
    [[file(".wh.", "")], "BAD_WHITEOUT"],
    [[file(".wh.x", "payload")], "BAD_WHITEOUT"],
    [[file("s", "", { pax: { "GNU.sparse.major": "1" } })], "BAD_SPARSE_MAP"],
    [[file("x", "", { pax: { mtime: "yesterday" } })], "BAD_PAX"],
    [[file("x", "", { pax: { uid: "4294967295" } })], "BAD_OWNER"],
    [[symlink("s", "")], "SYMLINK_TARGET_INVALID"],
    [Buffer.alloc(1024, 0x41), "NOT_A_TAR"],
    [Buffer.alloc(0), "NOT_A_TAR"],
    [whole.subarray(0, 1536), "TRUNCATED"],
    [whole.subarray(0, whole.length - 1024), "TRUNCATED"],
    [Buffer.concat([whole, Buffer.from("junk")]), "TRAILING_GARBAGE"],
    [Buffer.concat([whole, await buildTar([file("second", "archive")])]), "TRAILING_GARBAGE"],
  ];
  for (const [entries, rule] of cases) {
    const report = await box.apply(entries);
    assert.deepEqual([report.ok, report.code, report.rule], [false, "LAYER_REFUSED", rule], JSON.stringify(report));
  }
});

test("blob checks: digest mismatch, missing blob, symlinked blob", opts, async (t) => {
  const box = sandbox(t);
  const other = `sha256:${"0".repeat(64)}`;
  const mismatch = await box.apply([file("a", "a")], other);
  assert.deepEqual([mismatch.ok, mismatch.code], [false, "BLOB_MISMATCH"]);

  // Malformed AND not the requested bytes: the mismatch is reported (a re-download may fix it).
  const garbage = await box.apply(Buffer.alloc(1024, 0x41), other);
  assert.deepEqual([garbage.ok, garbage.code], [false, "BLOB_MISMATCH"]);

  const missing = await runChild(["--root", box.root, "--blob", join(box.base, "nope"), "--digest", other]);
  assert.deepEqual([missing.report.code, missing.exitCode], ["BLOB_MISSING", 1]);

  const blob = await buildTar([file("a", "a")]);
  writeFileSync(join(box.base, "real.tar"), blob);
  symlinkSync(join(box.base, "real.tar"), join(box.base, "link.tar"));
  const digest = `sha256:${createHash("sha256").update(blob).digest("hex")}`;
  const linked = await runChild(["--root", box.root, "--blob", join(box.base, "link.tar"), "--digest", digest]);
  assert.equal(linked.report.code, "BLOB_MISSING");
  assert.match(linked.report.message ?? "", /symbolic link/);

  // A symlinked DIRECTORY on the way (the agent owns blobs/, so it could make sha256 -> /etc).
  mkdirSync(join(box.base, "elsewhere"));
  writeFileSync(join(box.base, "elsewhere", "real.tar"), blob);
  symlinkSync(join(box.base, "elsewhere"), join(box.base, "sha256"));
  const viaDir = await runChild(["--root", box.root, "--blob", join(box.base, "sha256", "real.tar"), "--digest", digest]);
  assert.equal(viaDir.report.code, "BLOB_MISSING");
  assert.match(viaDir.report.message ?? "", /resolves through a symbolic link/);
  const direct = await runChild(["--root", box.root, "--blob", join(box.base, "elsewhere", "real.tar"), "--digest", digest]);
  assert.equal(direct.report.ok, true, "the same file by its real path is fine");

  const bad = await runChild(["--root", box.root, "--blob", "relative.tar", "--digest", digest]);
  assert.equal(bad.report.ok, false);

  // Started by a parent that is not (any more) the one named: it must not apply anything.
  const fresh = join(box.base, "fresh");
  mkdirSync(fresh);
  const orphan = await runChild(["--root", fresh, "--blob", join(box.base, "real.tar"), "--digest", digest, "--parent-pid", "999999"]);
  assert.deepEqual([orphan.report.code, readdirSync(fresh)], ["APPLY_FAILED", []]);
  const mine = await runChild(["--root", fresh, "--blob", join(box.base, "real.tar"), "--digest", digest, "--parent-pid", String(process.pid)]);
  assert.equal(mine.report.ok, true, JSON.stringify(mine.report));
  assert.deepEqual(readdirSync(fresh), ["a"]);
});

/** Everything apply can set, for every path under `root`, in a stable order. */
function treeOf(root: string): string[] {
  const out: string[] = [];
  const walk = (path: string) => {
    const info = lstatSync(path);
    const kind = info.isDirectory() ? "dir" : info.isSymbolicLink() ? `link->${readlinkSync(path)}` : info.isFIFO() ? "fifo"
      : `file:${createHash("sha256").update(readFileSync(path)).digest("hex").slice(0, 16)}:nlink=${info.nlink}`;
    // Directories the layer does not name (the root, implicit parents) get the time of the run.
    const fromLayer = [T1, T2, T3].some((time) => time.getTime() === info.mtimeMs);
    const mtime = info.isFIFO() ? 0 : info.isDirectory() && !fromLayer ? "now" : info.mtimeMs;
    out.push(`${relative(root, path) || "."} ${kind} ${info.uid}:${info.gid} ${(info.mode & 0o7777).toString(8)} ${mtime} ${getXattr(path, "user.origin") ?? ""}`);
    if (info.isDirectory()) for (const name of readdirSync(path).sort()) walk(join(path, name));
  };
  walk(root);
  return out;
}

test("gzip and zstd blobs (told by magic bytes) apply to the same tree as the plain tar", opts, async (t) => {
  const lower = await buildTar([dir("etc/"), file("etc/old", "gone"), file("keep", "kept")]);
  const upper = await buildTar([
    dir("usr/bin/", { mtime: T1 }),
    file("usr/bin/su", "su".repeat(5000), { mode: 0o4755, uid: 3, gid: 4, mtime: T2, pax: { "SCHILY.xattr.user.origin": "upper" } }),
    hardlink("usr/bin/su2", "usr/bin/su"),
    symlink("bin", "usr/bin"),
    { header: { name: "run/fifo", type: "fifo", mode: 0o600 } },
    file("etc/.wh.old", ""),
  ]);
  const trees: string[][] = [];
  for (const pack of [(b: Buffer) => b, gzipSync, zstdCompressSync]) {
    const box = sandbox(t);
    const report = await box.apply(pack(lower));
    assert.equal(report.ok, true, JSON.stringify(report));
    const blob = pack(upper);
    const applied = await box.apply(blob);
    // bytes: the blob as stored, which is also what the digest was computed over.
    assert.deepEqual(applied, { ok: true, entries: 6, bytes: blob.length });
    trees.push(treeOf(box.root));
  }
  assert.ok(trees[0]!.some((line) => line.startsWith("usr/bin/su file:") && line.includes(" 4755 ")), trees[0]!.join("\n"));
  assert.ok(trees[0]!.includes(`usr/bin dir 0:0 755 ${T1.getTime()} `), trees[0]!.join("\n"));
  assert.ok(!trees[0]!.some((line) => line.startsWith("etc/old")));
  assert.deepEqual(trees[1], trees[0], "gzip");
  assert.deepEqual(trees[2], trees[0], "zstd");
  // A blob whose name says .tar.gz but whose bytes are a plain tar is a plain tar: names are
  // never consulted (the child only gets a path; this one is misleading on purpose).
  const box = sandbox(t);
  const misnamed = join(box.base, "layer.tar.gz");
  writeFileSync(misnamed, upper);
  const digest = `sha256:${createHash("sha256").update(upper).digest("hex")}`;
  const run = await runChild(["--root", box.root, "--blob", misnamed, "--digest", digest]);
  assert.equal(run.report.ok, true, JSON.stringify(run.report));
});

test("compressed blobs: the digest is of the stored bytes; corrupt, trailing data and bombs are refused", opts, async (t) => {
  const box = sandbox(t);
  const tar = await buildTar([file("a", "x".repeat(100_000)), file("b", "y")]);
  const cut = (bytes: Buffer) => bytes.subarray(0, bytes.length - 5);
  const digestOf = (bytes: Buffer) => `sha256:${createHash("sha256").update(bytes).digest("hex")}`;

  // The digest of the tar inside is not the blob's digest.
  const asTar = await box.apply(gzipSync(tar), digestOf(tar));
  assert.deepEqual([asTar.ok, asTar.code], [false, "BLOB_MISMATCH"], JSON.stringify(asTar));
  assert.equal((await box.apply(zstdCompressSync(tar), digestOf(tar))).code, "BLOB_MISMATCH");

  const refusals: [Buffer, string][] = [
    [cut(gzipSync(tar)), "BAD_COMPRESSION"],
    [cut(zstdCompressSync(tar)), "BAD_COMPRESSION"],
    [Buffer.concat([Buffer.from([0x1f, 0x8b]), Buffer.alloc(2000, 1)]), "BAD_COMPRESSION"],
    [Buffer.concat([gzipSync(tar), Buffer.alloc(512)]), "TRAILING_GARBAGE"],
    [Buffer.concat([zstdCompressSync(tar), Buffer.from("junk")]), "TRAILING_GARBAGE"],
    [gzipSync(tar.subarray(0, 1536)), "TRUNCATED"], // a good stream of a broken tar
  ];
  for (const [blob, rule] of refusals) {
    const report = await box.apply(blob);
    assert.deepEqual([report.ok, report.code, report.rule], [false, "LAYER_REFUSED", rule], JSON.stringify(report));
    if (rule !== "TRUNCATED") assert.match(report.message ?? "", /(gzip|zstd)/);
  }
  // Several zstd frames (and a skippable frame between them) are one stream, decoded frame by frame.
  const skippable = Buffer.concat([Buffer.from([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0]), Buffer.from("abc")]);
  const frames = Buffer.concat([zstdCompressSync(tar.subarray(0, 1024)), skippable, zstdCompressSync(tar.subarray(1024))]);
  const multi = await box.apply(frames);
  assert.deepEqual(multi, { ok: true, entries: 2, bytes: frames.length });
  assert.equal(readFileSync(join(box.root, "a"), "utf8"), "x".repeat(100_000));

  // A bomb: 64 MiB of zeros in ~64 KiB. The cap (lowered here; production always uses
  // MAX_DECOMPRESSED_BYTES) stops it after at most the cap was written.
  const bomb = gzipSync(await buildTar([file("zeros", "\0".repeat(64 * 1024 * 1024))]));
  const path = join(box.base, "bomb");
  writeFileSync(path, bomb);
  const fresh = join(box.base, "bombed");
  mkdirSync(fresh);
  const cap = 1024 * 1024;
  const started = performance.now();
  const capped = await runChild(["--root", fresh, "--blob", path, "--digest", digestOf(bomb), "--max-decompressed-bytes", String(cap)]);
  assert.deepEqual([capped.report.code, capped.report.rule, capped.exitCode], ["LAYER_REFUSED", "DECOMPRESSION_LIMIT", 1], JSON.stringify(capped.report));
  assert.match(capped.report.message ?? "", /gzip blob decompresses to more than 1048576 bytes/);
  // Generous: a busy 2-core CI host takes seconds just to start a child; the tree size below is the real check.
  assert.ok(performance.now() - started < 30_000, "stopped early");
  assert.ok(statSync(join(fresh, "zeros")).size <= cap, "no more than the cap reached the tree");
  const roomy = await runChild(["--root", fresh, "--blob", path, "--digest", digestOf(bomb), "--max-decompressed-bytes", String(65 * 1024 * 1024)]);
  assert.equal(roomy.report.ok, true, JSON.stringify(roomy.report));
  assert.equal(statSync(join(fresh, "zeros")).size, 64 * 1024 * 1024);

  // The lowered cap is a test-mode switch only: with a device it is a bad argument.
  const mounted = await runChild(["--device", "/dev/null", "--mountpoint", join(box.base, "m"), "--blob", path, "--digest", digestOf(bomb), "--max-decompressed-bytes", "1"]);
  assert.equal(mounted.report.code, "INTERNAL", JSON.stringify(mounted.report));
});

test("device mode: mounts in a private namespace, applies, unmounts (ext4 on a loop device)", opts, async (t) => {
  const box = sandbox(t);
  const image = join(box.base, "fs.img");
  const run = (file: string, args: string[]) =>
    new Promise<string>((resolve, reject) => execFile(file, args, (err, stdout, stderr) => (err ? reject(new Error(`${file} ${args.join(" ")}: ${stderr}`)) : resolve(stdout.trim()))));
  await run("/usr/bin/truncate", ["-s", "64M", image]);
  await run("/usr/sbin/mkfs.ext4", ["-q", image]);
  let loop: string;
  try {
    loop = await run("/usr/sbin/losetup", ["--find", "--show", image]);
  } catch (err) {
    t.skip(`no loop devices here: ${(err as Error).message}`);
    return;
  }
  t.after(() => run("/usr/sbin/losetup", ["--detach", loop]));

  const blob = await buildTar([file("etc/os-release", "ID=test\n"), file("usr/bin/su", "su", { mode: 0o4755 }), symlink("escape", box.base)]);
  writeFileSync(join(box.base, "layer.tar"), blob);
  const digest = `sha256:${createHash("sha256").update(blob).digest("hex")}`;
  const mountPoint = join(box.base, "mnt");
  // As the helper does: the blob opened by the parent, inherited as fd 3.
  const blobFd = openSync(join(box.base, "layer.tar"), "r");
  t.after(() => closeSync(blobFd));
  const unshare = (blobArgs: string[]) => new Promise<string>((resolve) => {
    const child = spawn("/usr/bin/unshare", ["--mount", "--propagation", "private", "--", process.execPath, CHILD,
      "--device", loop, "--mountpoint", mountPoint, ...blobArgs, "--digest", digest], { stdio: ["ignore", "pipe", "inherit", blobFd] });
    let stdout = "";
    child.stdout!.on("data", (chunk) => (stdout += chunk));
    child.on("close", () => resolve(stdout));
  });
  // A blob by path is for test mode only: in production the helper passes the open file.
  assert.equal(JSON.parse(await unshare(["--blob", join(box.base, "layer.tar")])).code, "INTERNAL");
  assert.deepEqual(JSON.parse(await unshare(["--blob-fd", "3"])), { ok: true, entries: 3, bytes: blob.length });
  assert.equal(readFileSync("/proc/self/mountinfo", "utf8").includes(mountPoint), false, "nothing left mounted on the host");
  assert.deepEqual(readdirSync(mountPoint), [], "the layer went to the device, not to the mount point directory");

  // Look at the device from the host side.
  await run("/usr/bin/mount", ["-o", "ro,nosuid,nodev", loop, mountPoint]);
  try {
    assert.equal(readFileSync(join(mountPoint, "etc/os-release"), "utf8"), "ID=test\n");
    assert.equal(statSync(join(mountPoint, "usr/bin/su")).mode & 0o7777, 0o4755);
    assert.equal(readlinkSync(join(mountPoint, "escape")), box.base);
  } finally {
    await run("/usr/bin/umount", [mountPoint]);
  }
});

// ---- real trees, written by GNU tar ----------------------------------------------------------

const llistxattr = libc.func("long llistxattr(const char *path, void *list, size_t size)");
const lgetxattrBig = libc.func("long lgetxattr(const char *path, const char *name, void *value, size_t size)");

/** Every xattr of `path` (not following a symlink), name=hex, sorted. */
function xattrsOf(path: string): string[] {
  const list = Buffer.alloc(65536);
  const length = Number(llistxattr(path, list, list.length));
  if (length <= 0) return [];
  return list.subarray(0, length - 1).toString().split("\0").sort().map((name) => {
    const value = Buffer.alloc(65536);
    const size = Number(lgetxattrBig(path, name, value, value.length));
    return `${name}=${value.subarray(0, size).toString("hex")}`;
  });
}

/** type, mode, owner, device numbers, content, link target, mtime (ns), xattrs, hardlink group of every path under `root`. */
function manifest(root: string, options: { nanoseconds: boolean; xattrs: boolean }): string[] {
  const out: string[] = [];
  const groups = new Map<bigint, string>();
  const walk = (rel: string) => {
    const path = join(root, rel);
    const info = lstatSync(path, { bigint: true });
    const kind = info.isDirectory() ? "dir" : info.isSymbolicLink() ? `link->${readlinkSync(path)}` : info.isFIFO() ? "fifo"
      : info.isCharacterDevice() ? `char:${info.rdev}` : info.isBlockDevice() ? `block:${info.rdev}`
        : `file:${createHash("sha256").update(readFileSync(path)).digest("hex").slice(0, 16)}`;
    let group = "";
    if (info.isFile() && info.nlink > 1n) {
      group = groups.get(info.ino) ?? `group-of:${rel}`;
      groups.set(info.ino, group);
    }
    const mtime = options.nanoseconds ? info.mtimeNs : info.mtimeNs / 1_000_000_000n;
    const meta = rel === "" ? "" : `${(Number(info.mode) & 0o7777).toString(8)} ${info.uid}:${info.gid} ${mtime}`;
    out.push(`${rel || "."} ${kind} ${meta} ${group} ${options.xattrs ? xattrsOf(path).join(",") : ""}`);
    if (info.isDirectory()) for (const name of readdirSync(path).sort()) walk(rel === "" ? name : `${rel}/${name}`);
  };
  walk("");
  return out;
}

function sh(script: string): void {
  const result = spawnSync("/bin/sh", ["-euc", script], { encoding: "utf8" });
  assert.equal(result.status, 0, `${script}\n${result.stderr}`);
}

test("real trees written by GNU tar (pax and gnu formats) apply exactly: devices, big ids, binary capabilities, long names, hardlinks, ns mtimes", opts, async (t) => {
  // A fresh machine may lack them: the suite installs what it uses.
  assert.ok(debianTool("setfattr", "attr"), "setfattr (Debian package attr) is needed");
  assert.ok(debianTool("setcap", "libcap2-bin"), "setcap (Debian package libcap2-bin) is needed");
  const box = sandbox(t);
  const src = join(box.base, "src");
  const long = "l".repeat(120);
  sh(`
    mkdir -p ${src}/dev ${src}/run ${src}/usr/bin ${src}/a ${src}/b ${src}/${long}/${long}
    cd ${src}
    mknod -m 0666 dev/null c 1 3
    mknod -m 0660 dev/loop0 b 7 0 && chgrp 6 dev/loop0
    mknod -m 0600 dev/big c 300 70000
    mkfifo -m 0640 run/ctl
    printf ping > usr/bin/ping && chmod 0755 usr/bin/ping
    # cap_setuid is bit 7: the value holds 0x00 and 0x80 bytes, as real images do.
    setcap cap_net_raw,cap_setuid+ep usr/bin/ping
    printf su > usr/bin/su && chmod 4755 usr/bin/su
    printf data > a/x && ln a/x b/y && setfattr -n user.bin -v 0xff00fe80 a/x
    printf ns > userns && chown 300000:300001 userns
    printf max > maxid && chown 4294967294:4294967294 maxid
    printf deep > ${long}/${long}/file
    ln -s /usr/${long}/${long}/target-of-a-long-link longlink
    touch -h -d @1700000000.123456789 longlink
    for f in dev/null dev/loop0 dev/big run/ctl usr/bin/ping usr/bin/su a/x userns maxid ${long}/${long}/file; do touch -d @1600000000.987654321 $f; done
    # Directories last (adding children changes them), deepest first.
    for d in ${long}/${long} ${long} dev run usr/bin usr a b; do touch -d @1500000000.5 $d; done
  `);
  const formats = [
    { format: "pax", flags: "--format=pax --xattrs --xattrs-include=*", nanoseconds: true, xattrs: true },
    { format: "gnu", flags: "--format=gnu", nanoseconds: false, xattrs: false },
  ];
  for (const { format, flags, nanoseconds, xattrs } of formats) {
    const blob = join(box.base, `${format}.tar`);
    sh(`tar ${flags} --numeric-owner -cf ${blob} -C ${src} .`);
    const root = join(box.base, `root-${format}`);
    mkdirSync(root);
    const digest = `sha256:${createHash("sha256").update(readFileSync(blob)).digest("hex")}`;
    const { report } = await runChild(["--root", root, "--blob", blob, "--digest", digest]);
    assert.equal(report.ok, true, `${format}: ${JSON.stringify(report)}`);
    assert.deepEqual(manifest(root, { nanoseconds, xattrs }), manifest(src, { nanoseconds, xattrs }), format);
  }
  // The facts the manifest compares, spelled out once.
  const root = join(box.base, "root-pax");
  const nul = lstatSync(join(root, "dev/null"));
  assert.deepEqual([nul.isCharacterDevice(), nul.rdev, nul.mode & 0o7777, nul.uid], [true, 0x103, 0o666, 0]);
  const loop = lstatSync(join(root, "dev/loop0"));
  assert.deepEqual([loop.isBlockDevice(), loop.rdev, loop.mode & 0o7777, loop.gid], [true, 0x700, 0o660, 6]);
  assert.deepEqual([statSync(join(root, "userns")).uid, statSync(join(root, "userns")).gid], [300000, 300001]);
  assert.equal(statSync(join(root, "maxid")).uid, 4294967294);
  const capability = getXattr(join(src, "usr/bin/ping"), "security.capability")!;
  assert.ok(capability.includes(0x80) && capability.includes(0x00), capability.toString("hex"));
  assert.deepEqual(getXattr(join(root, "usr/bin/ping"), "security.capability"), capability);
  assert.equal(spawnSync("/usr/sbin/getcap", [join(root, "usr/bin/ping")], { encoding: "utf8" }).stdout.trim().split(" ").at(-1), "cap_setuid,cap_net_raw=ep");
  assert.equal(statSync(join(root, "b/y")).ino, statSync(join(root, "a/x")).ino);
  assert.equal(statSync(join(root, "a/x"), { bigint: true }).mtimeNs, 1600000000987654321n);
  assert.equal(statSync(join(root, long), { bigint: true }).mtimeNs, 1500000000500000000n);
});

test("a user.* xattr on a symlink is refused (BAD_XATTR): Linux cannot set one", opts, async (t) => {
  const box = sandbox(t);
  const report = await box.apply([{ header: { name: "l", type: "symlink", linkname: "target", pax: { "SCHILY.xattr.user.a": "b" } } }]);
  assert.deepEqual([report.code, report.rule, report.entry], ["LAYER_REFUSED", "BAD_XATTR", "l"]);
  assert.match(report.message ?? "", /user\.\* xattrs cannot be set on a symlink/);
  assert.deepEqual(readdirSync(box.root), []);
});

// ---- the applier is a guard by itself (issue 9, finding 4) ----------------------------------

test("without the chroot, symlinks planted by a layer never lead a write outside the root", opts, async (t) => {
  const base = mkdtempSync(join(tmpdir(), "imgd-nochroot-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const root = join(base, "root");
  // Beside the root, where every slip below aims: none of them may change.
  const sentinel = join(base, "sentinel");
  const sentinelDir = join(base, "sentinel-dir");
  const outsideState = () => {
    const dirInfo = existsSync(sentinelDir) ? lstatSync(sentinelDir) : null;
    const fileInfo = existsSync(sentinel) ? lstatSync(sentinel) : null;
    return {
      names: readdirSync(base).sort(),
      inDir: dirInfo ? readdirSync(sentinelDir).sort() : "gone",
      sentinel: fileInfo ? readFileSync(sentinel, "utf8") : "gone",
      file: fileInfo ? [fileInfo.mode & 0o7777, fileInfo.uid, fileInfo.nlink] : "gone",
      dir: dirInfo ? [dirInfo.mode & 0o7777, dirInfo.uid, dirInfo.gid] : "gone",
    };
  };
  // Up past the host's / and down again to `base`: on the host that is `base`; in the image, ".."
  // stops at the root, so it names `<root>/<base>` (absent: refused).
  const climb = `${"../".repeat(base.split("/").length + 2)}${base.slice(1)}`;
  const cases: { name: string; layers: Entry[][]; inside?: [string, string][] }[] = [
    // ".." at the image root stays there: the file lands in the image.
    { name: "relative slip", layers: [[symlink("up", ".."), file("up/sentinel", "pwned")]], inside: [["sentinel", "pwned"]] },
    { name: "deep relative slip", layers: [[dir("a/"), symlink("a/up", climb), file("a/up/sentinel", "pwned")]] },
    { name: "absolute slip to the host path", layers: [[symlink("abs", base), file("abs/sentinel", "pwned")]] },
    { name: "absolute slip to /", layers: [[symlink("slash", "/"), file(`slash${base}/sentinel`, "pwned")]] },
    { name: "directory replaced by a link, then written through", layers: [[dir("d/"), file("d/f", "x")], [symlink("d", ".."), file("d/sentinel", "pwned"), file("d/sentinel-dir/planted", "pwned")]] },
    { name: "whiteout through a link", layers: [[symlink("w", ".."), file("w/.wh.sentinel", "")], [symlink("w2", base), file("w2/.wh.sentinel", "")]] },
    { name: "opaque marker through a link", layers: [[symlink("o", ".."), file("o/.wh..wh..opq", "")], [symlink("o2", base), file("o2/.wh..wh..opq", ""), file("o2/sentinel-dir/.wh..wh..opq", "")]] },
    { name: "chmod/chown of a linked directory", layers: [[symlink("c", ".."), dir("c/sentinel-dir/", { mode: 0o777, uid: 1234, gid: 1234 })]] },
    { name: "chmod/chown of a linked file", layers: [[symlink("c", ".."), file("c/sentinel", "pwned", { mode: 0o4777, uid: 1234 })]] },
    { name: "hardlink through a link", layers: [[file("inside", "i"), symlink("h", ".."), hardlink("h/planted", "inside")]] },
    { name: "hardlink whose target goes through a link to outside", layers: [[symlink("t", ".."), hardlink("stolen", "t/sentinel")], [symlink("t2", base), hardlink("stolen2", "t2/sentinel")]] },
    { name: "fifo and device through a link", layers: [[symlink("f", ".."), { header: { name: "f/planted-fifo", type: "fifo", mode: 0o666 } }, { header: { name: "f/planted-dev", type: "character-device", devmajor: 1, devminor: 3, mode: 0o666 } }]] },
  ];
  // Each case twice: as written (a layer writing through a link it planted itself is refused,
  // THROUGH_SYMLINK, as the validator does), and with the links moved to a layer of their own, so
  // that the write goes through a LOWER layer's link and the in-root resolution is what guards.
  const lastLink = (layer: Entry[]) => layer.findLastIndex((e) => e.header.type === "symlink");
  const split = (layers: Entry[][]) => layers.flatMap((l) => (lastLink(l) >= 0 && lastLink(l) < l.length - 1 ? [l.slice(0, lastLink(l) + 1), l.slice(lastLink(l) + 1)] : [l]));
  const variants = cases.flatMap((c) => [{ ...c, inside: undefined }, { ...c, name: `${c.name} (links in a lower layer)`, layers: split(c.layers) }]);
  for (const c of variants) {
    rmSync(root, { recursive: true, force: true });
    rmSync(sentinelDir, { recursive: true, force: true });
    mkdirSync(root);
    writeFileSync(sentinel, "sentinel", { mode: 0o600 });
    mkdirSync(sentinelDir, { mode: 0o700 });
    writeFileSync(join(sentinelDir, "keep"), "keep");
    const before = outsideState();
    for (const layer of c.layers) {
      try {
        await applyLayer(root, [await buildTar(layer)]);
      } catch (err) {
        // A refusal is fine (e.g. a link dangling inside the image); writing outside is not.
        assert.ok(err instanceof LayerRefused, `${c.name}: ${String(err)}`);
      }
    }
    assert.deepEqual(outsideState(), before, c.name);
    for (const [path, content] of c.inside ?? []) assert.equal(readFileSync(join(root, path), "utf8"), content, `${c.name}: landed inside the image`);
  }
});

// ---- decompression does not depend on read sizes (issue 9, finding 5) -----------------------

test("a two-frame zstd object (with a skippable frame) decodes to the same bytes whatever the chunk sizes", async () => {
  const payload = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251));
  const skippable = Buffer.concat([Buffer.from([0x5f, 0x2a, 0x4d, 0x18, 5, 0, 0, 0]), Buffer.from("skip!")]);
  const object = Buffer.concat([zstdCompressSync(payload.subarray(0, 100_000)), skippable, zstdCompressSync(payload.subarray(100_000))]);
  for (const size of [1, 7, 4096, 65536, 1024 * 1024]) {
    const chunks = Array.from({ length: Math.ceil(object.length / size) }, (_, i) => Buffer.from(object.subarray(i * size, (i + 1) * size)));
    const out: Buffer[] = [];
    for await (const chunk of decompressed(Readable.from(chunks), "zstd")) out.push(chunk);
    assert.ok(Buffer.concat(out).equals(payload), `chunks of ${size}`);
  }
  // Junk after the last frame, and a frame cut short, are refused whatever the chunking.
  for (const [bad, rule] of [[Buffer.concat([object, Buffer.from("junk")]), "TRAILING_GARBAGE"], [object.subarray(0, object.length - 3), "BAD_COMPRESSION"]] as const) {
    for (const size of [1, 4096]) {
      const chunks = Array.from({ length: Math.ceil(bad.length / size) }, (_, i) => Buffer.from(bad.subarray(i * size, (i + 1) * size)));
      await assert.rejects(async () => {
        for await (const _ of decompressed(Readable.from(chunks), "zstd"));
      }, (err: unknown) => err instanceof LayerRefused && err.rule === rule);
    }
  }
});

test("the tar reader gives the same tree whatever the chunk sizes it is fed (headers, PAX records and content split anywhere)", opts, async (t) => {
  const base = mkdtempSync(join(tmpdir(), "imgd-chunks-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const long = `${"n".repeat(150)}/${"m".repeat(120)}`;
  const blob = await buildTar([
    dir("etc/", { mtime: T1 }),
    // uid 300000 only in PAX (the ustar field says 0, as GNU tar writes ids that do not fit).
    file("etc/conf", "c".repeat(1000), { uid: 0, pax: { uid: "300000", "SCHILY.xattr.user.k": "v", mtime: "1600000000.5" } }),
    dir(`${"n".repeat(150)}/`, { mtime: T3 }),
    file(long, "long name"),
    symlink("link", `/${"t".repeat(200)}`),
    hardlink("etc/again", "etc/conf"),
    file("empty", ""),
    file("big", "b".repeat(70_000), { mtime: T2 }),
  ]);
  const trees: string[][] = [];
  for (const size of [1, 7, 513, 4096, blob.length]) {
    const root = join(base, `root-${size}`);
    mkdirSync(root);
    const chunks = Array.from({ length: Math.ceil(blob.length / size) }, (_, i) => Buffer.from(blob.subarray(i * size, (i + 1) * size)));
    assert.deepEqual(await applyLayer(root, chunks), { entries: 8 });
    trees.push(manifest(root, { nanoseconds: true, xattrs: true }));
  }
  assert.ok(trees[0]!.some((line) => line.startsWith("etc/conf file:") && line.includes(" 300000:0 1600000000500000000 ")), trees[0]!.join("\n"));
  for (const tree of trees.slice(1)) assert.deepEqual(tree, trees[0]);
});

test("GNU tar's sparse archives apply exactly, holes kept: old GNU, PAX 0.0, 0.1 and 1.0 (chrooted child)", opts, async (t) => {
  const box = sandbox(t);
  const { src, tars } = gnuSparseArchives(box.base);
  for (const format of SPARSE_FORMATS) {
    const root = join(box.base, `root-${format.replace(".", "")}`);
    mkdirSync(root);
    const blob = join(box.base, `${format}.tar`);
    writeFileSync(blob, tars[format]);
    const digest = `sha256:${createHash("sha256").update(tars[format]).digest("hex")}`;
    const { report } = await runChild(["--root", root, "--blob", blob, "--digest", digest]);
    assert.equal(report.ok, true, `${format}: ${JSON.stringify(report)}`);
    for (const name of SPARSE_FILES) {
      const [original, applied] = [statSync(join(src, name)), statSync(join(root, name))];
      assert.equal(applied.size, original.size, `${format} ${name}: length`);
      assert.ok(contentOf(root, name).equals(contentOf(src, name)), `${format} ${name}: content`);
      // Holes stay holes: no more blocks than the original holds (its extent-tree block aside).
      assert.ok(applied.blocks <= original.blocks + 8, `${format} ${name}: ${applied.blocks} blocks, the original ${original.blocks}`);
      assert.ok(applied.blocks * 512 <= applied.size / 2, `${format} ${name}: ${applied.blocks * 512} bytes allocated for ${applied.size}`);
      assert.deepEqual([applied.mode & 0o7777, Math.floor(applied.mtimeMs / 1000)], [original.mode & 0o7777, Math.floor(original.mtimeMs / 1000)], `${format} ${name}: mode, mtime`);
    }
    assert.equal(statSync(join(root, "all-hole")).blocks, 0);
    assert.equal(statSync(join(root, "many-regions")).ino, statSync(join(root, "many-regions.link")).ino, `${format}: the hardlink shares the sparse file's inode`);
  }
});

test("sparse members in any chunking: regions land at their offsets, a map split across reads", opts, async (t) => {
  const box = sandbox(t);
  const regions = [[0, Buffer.from("first")], [4096, Buffer.alloc(5000, 0x62)], [70_000, Buffer.from("last")]] as const;
  const expected = Buffer.alloc(70_004);
  for (const [offset, bytes] of regions) bytes.copy(expected, offset);
  for (const format of SPARSE_FORMATS) {
    const tar = Buffer.concat([sparseFile(format, "f", 70_004, regions), END_OF_ARCHIVE]);
    for (const chunk of [1, 511, 4096]) {
      const root = mkdtempSync(join(box.base, "chunks-"));
      await applyLayer(root, Array.from({ length: Math.ceil(tar.length / chunk) }, (_, i) => tar.subarray(i * chunk, (i + 1) * chunk)));
      assert.ok(readFileSync(join(root, "f")).equals(expected), `${format}, chunks of ${chunk}`);
    }
  }
});

test("hostile sparse maps are refused by the validator's rule, before anything is written", opts, async (t) => {
  const box = sandbox(t);
  const d = Buffer.from("data");
  for (const format of SPARSE_FORMATS) {
    const cases: [string, Parameters<typeof sparseMember>[1]][] = [
      ["out of order", { name: "s", realSize: 100, map: [[50, 2], [0, 2]], data: d }],
      ["overlapping", { name: "s", realSize: 100, map: [[0, 3], [2, 1]], data: d }],
      ["past the real size", { name: "s", realSize: 100, map: [[98, 4]], data: d }],
      ["overflowing", { name: "s", realSize: Number.MAX_SAFE_INTEGER, map: [[Number.MAX_SAFE_INTEGER - 1, 4]], data: d }],
      ["sizes not the stored bytes", { name: "s", realSize: 100, map: [[0, 5]], data: d }],
      ["a malformed number", { name: "s", realSize: 100, map: [[format === "gnu" ? "0x10" : "1e3", 4]], data: d }],
      ["too many regions", { name: "s", realSize: 10, map: [[0, 4]], count: MAX_REGIONS + 1, data: d }],
    ];
    if (format === "gnu") cases.pop(); // old GNU has no count: its bound is on the entries (the corpus's case)
    for (const [what, spec] of cases) {
      const root = mkdtempSync(join(box.base, "hostile-"));
      await assert.rejects(applyLayer(root, [Buffer.concat([sparseMember(format, spec), END_OF_ARCHIVE])]), (err: unknown) => {
        assert.ok(err instanceof LayerRefused, String(err));
        assert.deepEqual([err.rule, err.entry], ["BAD_SPARSE_MAP", "s"], `${format}, ${what}: ${err.message}`);
        return true;
      });
      assert.deepEqual(readdirSync(root), [], `${format}, ${what}: nothing written`);
    }
  }
});
