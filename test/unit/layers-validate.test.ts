import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";
import { constants as zlibConstants, gzipSync, zstdCompressSync } from "node:zlib";
import fc from "fast-check";
import { extract } from "tar-stream";
import { LayerValidationError, normalizeEntryName, validateLayer, type LayerLimits, type LayerRule } from "../../agent/layers/validate.ts";
import { END_OF_ARCHIVE, packTar, padded, paxRecords, rawHeader, rawTar, type PackEntry } from "../fixtures/tar-bytes.ts";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { layerSizeOf } from "../../agent/images/pool-space.ts";
import { MAX_SPARSE_REGIONS } from "../../agent/layers/sparse.ts";
import { gnuSparseArchives, SPARSE_FILES } from "../fixtures/gnu-sparse.ts";
import { SPARSE_FORMATS, sparseFile, sparseMember } from "../fixtures/tar-bytes.ts";

/** Feeds `bytes` in chunks of `chunk` bytes (whole by default). */
function validate(bytes: Buffer, limits: Partial<LayerLimits> = {}, chunk = bytes.length || 1) {
  const chunks: Buffer[] = [];
  for (let i = 0; i < bytes.length; i += chunk) chunks.push(bytes.subarray(i, i + chunk));
  return validateLayer(Readable.from(chunks), limits);
}

async function refused(bytes: Buffer, rule: LayerRule, limits: Partial<LayerLimits> = {}): Promise<LayerValidationError> {
  try {
    const summary = await validate(bytes, limits);
    assert.fail(`expected ${rule}, but the layer was accepted: ${JSON.stringify(summary)}`);
  } catch (err) {
    if (!(err instanceof LayerValidationError)) throw err;
    assert.equal(err.rule, rule, `expected ${rule}, got ${err.rule}: ${err.message} (entry ${err.entry})`);
    return err;
  }
}

const file = (name: string, body: string | Buffer = "x", extra: Partial<PackEntry["header"]> = {}): PackEntry => ({ header: { name, ...extra }, body });
const dir = (name: string): PackEntry => ({ header: { name, type: "directory" } });
const symlink = (name: string, linkname: string): PackEntry => ({ header: { name, type: "symlink", linkname } });
const hardlink = (name: string, linkname: string): PackEntry => ({ header: { name, type: "link", linkname } });
const whiteout = (name: string): PackEntry => ({ header: { name }, body: "" });

test("a typical layer is accepted and summarized", async () => {
  const tar = await packTar([
    dir("usr/"),
    dir("usr/bin/"),
    file("usr/bin/perl", "perl binary", { mode: 0o755 }),
    hardlink("usr/bin/perl5.36.0", "usr/bin/perl"),
    hardlink("usr/bin/other", "usr/bin/from-a-lower-layer"),
    symlink("usr/bin/python3", "/usr/bin/python3.11"),
    symlink("usr/lib/libz.so", "../lib/x"),
    { header: { name: "run/initctl", type: "fifo" } },
    file("usr/bin/su", "setuid", { mode: 0o4755 }),
    file(`usr/share/${"long-component-".repeat(8)}/x`, "long names go through PAX"),
    file("etc/motd", "with xattrs", { pax: { "SCHILY.xattr.user.origin": "test", "SCHILY.xattr.security.capability": "\u0001" } }),
    whiteout("etc/.wh.shadow"),
    whiteout("etc/apt/.wh..wh..opq"),
    file("empty", ""),
  ]);
  const summary = await validate(tar);
  assert.deepEqual(summary, {
    entries: 14,
    files: 5,
    directories: 2,
    symlinks: 2,
    hardlinks: 2,
    fifos: 1,
    devices: 0,
    whiteouts: 1,
    opaqueDirs: 1,
    sparseFiles: 0,
    sparseRegions: 0,
    fileBytes: "perl binary".length + "setuid".length + "long names go through PAX".length + "with xattrs".length,
    tarBytes: tar.length,
    compression: "none",
    objectBytes: tar.length,
    hasRootEntry: false,
    lowerLayerLinks: 1,
    notes: ['hardlink "usr/bin/other" -> "usr/bin/from-a-lower-layer" refers to a lower layer'],
  });
});

test("the result does not depend on how the input is chunked", async () => {
  const tar = await packTar([dir("a/"), file("a/f", "y".repeat(1500)), file(`${"p".repeat(120)}/q`, "z"), hardlink("a/g", "a/f")]);
  const whole = await validate(tar);
  for (const chunk of [1, 7, 511, 512, 513, 4096]) assert.deepEqual(await validate(tar, {}, chunk), whole, `chunks of ${chunk}`);
  const garbage = Buffer.concat([tar, Buffer.from("junk")]);
  for (const chunk of [1, 100, 512, garbage.length]) {
    await assert.rejects(validate(garbage, {}, chunk), (err: LayerValidationError) => err.rule === "TRAILING_GARBAGE");
  }
});

test("an empty layer (just the end-of-archive marker) is fine, and so is record padding", async () => {
  assert.equal((await validate(END_OF_ARCHIVE)).entries, 0);
  const gnuStyle = Buffer.concat([await packTar([file("a")]), Buffer.alloc(10240 - 2048)]);
  assert.equal((await validate(gnuStyle)).entries, 1);
});

test('"./" prefixes are stripped and a "./" root directory entry is accepted', async () => {
  const summary = await validate(await packTar([dir("./"), dir("./etc/"), file("./etc/hosts"), hardlink("./etc/h2", "./etc/hosts")]));
  assert.equal(summary.hasRootEntry, true);
  assert.equal(summary.lowerLayerLinks, 0, "./etc/hosts and etc/hosts are the same member");
});

test("names are normalized and checked", () => {
  assert.equal(normalizeEntryName("./usr/bin/"), "usr/bin");
  assert.equal(normalizeEntryName("a//./b/"), "a/b");
  assert.equal(normalizeEntryName("./"), "");
  assert.equal(normalizeEntryName("..."), "...");
  assert.equal(normalizeEntryName("a/..b/c.."), "a/..b/c..");
  const cases: Array<[string, LayerRule]> = [
    ["", "EMPTY_NAME"],
    ["/etc/passwd", "ABSOLUTE_PATH"],
    ["//etc", "ABSOLUTE_PATH"],
    ["..", "DOTDOT"],
    ["../etc", "DOTDOT"],
    ["a/../../etc", "DOTDOT"],
    ["a/b/..", "DOTDOT"],
    ["./../x", "DOTDOT"],
    ["a\0b", "NUL_IN_NAME"],
    ["caf\uFFFD", "BAD_ENCODING"],
    [`${"d/".repeat(256)}f`, "TOO_DEEP"],
    [`a/${"n".repeat(256)}`, "NAME_COMPONENT_TOO_LONG"],
    [`${"p".repeat(200)}/`.repeat(21), "PATH_TOO_LONG"],
  ];
  for (const [name, rule] of cases) {
    assert.throws(() => normalizeEntryName(name), (err: LayerValidationError) => err.rule === rule, `${JSON.stringify(name.slice(0, 40))} -> ${rule}`);
  }
  assert.equal(normalizeEntryName(`${"d/".repeat(255)}f`).split("/").length, 256);
  const longest = `${"p".repeat(254)}/`.repeat(16) + "q".repeat(15);
  assert.equal(Buffer.byteLength(normalizeEntryName(longest)), 4095);
  assert.throws(() => normalizeEntryName(`${longest}q`), (err: LayerValidationError) => err.rule === "PATH_TOO_LONG");
  assert.throws(() => normalizeEntryName(`${"é".repeat(2048)}`), (err: LayerValidationError) => err.rule === "NAME_COMPONENT_TOO_LONG");
});

test("entries with bad names are refused, with the raw name escaped in the error", async () => {
  await refused(await packTar([file("/etc/passwd")]), "ABSOLUTE_PATH");
  await refused(await packTar([file("usr/../../etc/passwd")]), "DOTDOT");
  await refused(await packTar([dir("../")]), "DOTDOT");
  await refused(await packTar([file(".")]), "EMPTY_NAME");
  await refused(rawTar([[{ name: "" }, "x"]]), "EMPTY_NAME");
  await refused(await packTar([symlink("./", "/etc")]), "EMPTY_NAME");
  // The ustar name field ends at a NUL ("a" here); only a PAX path record can carry one.
  await refused(await packTar([file("a\0b/../../x", "x", { pax: { comment: "force PAX" } })]), "NUL_IN_NAME");
  await refused(rawTar([[{ name: Buffer.from([0x61, 0xff, 0x62]) }, "x"]]), "BAD_ENCODING");
  const err = await refused(await packTar([file("../evil\n\x1b[31mred")]), "DOTDOT");
  assert.equal(err.entry, "../evil\\x0a\\x1b[31mred");
});

test("path limits are configurable", async () => {
  const tar = await packTar([file("a/b/c/d")]);
  await refused(tar, "TOO_DEEP", { maxDepth: 3 });
  await refused(tar, "PATH_TOO_LONG", { maxPathBytes: 6 });
  await refused(await packTar([file("abcdef")]), "NAME_COMPONENT_TOO_LONG", { maxComponentBytes: 5 });
  assert.equal((await validate(tar, { maxDepth: 4, maxPathBytes: 7, maxComponentBytes: 1 })).files, 1);
  await assert.rejects(validate(tar, { maxDepth: 0 }), TypeError);
});

test("device nodes are accepted (as debootstrap's /dev has them); unknown entry types are refused", async () => {
  const devices = await validate(await packTar([
    dir("dev/"),
    { header: { name: "dev/null", type: "character-device", devmajor: 1, devminor: 3, mode: 0o666 } },
    { header: { name: "dev/sda", type: "block-device", devmajor: 8, devminor: 0 } },
  ]));
  assert.deepEqual([devices.devices, devices.entries], [2, 3]);
  // A contiguous file ('7') is a regular file.
  assert.equal((await validate(await packTar([{ header: { name: "c", type: "contiguous-file" }, body: "x" }]))).fileBytes, 1);
  for (const flag of ["V", "D", "M", "8", "9", "A", "\x7f"]) await refused(rawTar([[{ name: "x", typeflag: flag }]]), "UNKNOWN_TYPE");
  await refused(rawTar([[{ name: "x", typeflag: "S" }]]), "BAD_SPARSE_MAP"); // no real size, no map
  await refused(rawTar([[{ name: "d", typeflag: "3" }, "content"]]), "NONZERO_SIZE");
});

test("only regular files carry content", async () => {
  await refused(rawTar([[{ name: "s", typeflag: "2", linkname: "t" }, "hidden"]]), "NONZERO_SIZE");
  await refused(rawTar([[{ name: "f", typeflag: "6" }, "hidden"]]), "NONZERO_SIZE");
  await refused(rawTar([[{ name: "h", typeflag: "1", linkname: "f" }, "hidden"]]), "NONZERO_SIZE");
  await refused(Buffer.concat([rawHeader({ name: "d/", typeflag: "5", size: 512 }), END_OF_ARCHIVE]), "NONZERO_SIZE");
});

test("THROUGH_SYMLINK: nothing is written through a symlink an earlier member of the same layer created", async () => {
  const through = async (entries: PackEntry[], entry: string, link: string) => {
    const err = await refused(await packTar(entries), "THROUGH_SYMLINK");
    assert.equal(err.entry, entry);
    assert.match(err.message, new RegExp(`goes through "${link}", a symlink created earlier in this layer`));
  };
  await through([symlink("a", "/etc"), file("a/passwd")], "a/passwd", "a");
  await through([dir("etc/"), symlink("etc/up", "../../.."), file("etc/up/x/y")], "etc/up/x/y", "etc/up");
  await through([dir("d/"), file("d/f"), symlink("d", "../x"), file("d/f")], "d/f", "d"); // a directory replaced by a link
  await through([symlink("root", "/root"), file("root/.ssh/authorized_keys")], "root/.ssh/authorized_keys", "root"); // names itself
  await through([symlink("a", "/etc"), whiteout("a/.wh.shadow")], "a/.wh.shadow", "a");
  await through([symlink("a", "/etc"), whiteout("a/.wh..wh..opq")], "a/.wh..wh..opq", "a");
  await through([symlink("a", "/etc"), dir("a/sub/")], "a/sub/", "a");
  await through([symlink("a", "/etc"), symlink("a/s", "x")], "a/s", "a");
  const hard = await refused(await packTar([symlink("hostetc", "/etc"), hardlink("stolen", "hostetc/shadow")]), "THROUGH_SYMLINK");
  assert.equal(hard.entry, "stolen");
  assert.match(hard.message, /hardlink target "hostetc\/shadow" goes through "hostetc"/);
  // Not through a link of this layer: fine (the applier resolves lower layers' links in the image).
  await validate(await packTar([file("a/passwd"), symlink("b", "/etc"), file("b")])); // b replaced by a file, no child
  await validate(await packTar([symlink("root", "/root"), dir("root/"), file("root/.ssh/authorized_keys")])); // link replaced by a dir
  await validate(await packTar([symlink("l", "/etc"), file("l.d/x"), file("lx"), hardlink("h", "l")])); // siblings; a hardlink TO the link
  await validate(await packTar([file("lower-link/x")])); // a link of a lower layer: the applier's
  await validate(await packTar([symlink("a", "/etc"), whiteout(".wh.a")])); // deleting the link itself
});

test("a directory replaced by a non-directory takes this layer's entries under it along", async () => {
  const fifo = (name: string): PackEntry => ({ header: { name, type: "fifo" } });
  // The fifo is the parent now, not the symlink that stood under the directory it replaced.
  const under = await refused(await packTar([symlink("a/a", "/etc"), fifo("a"), dir("a/a/a/")]), "PARENT_NOT_DIR");
  assert.equal(under.entry, "a/a/a/");
  assert.match(under.message, /is under "a", which an earlier member/);
  // A new directory there is empty: nothing of the layer's is left under it.
  await validate(await packTar([symlink("a/a", "/etc"), fifo("a"), dir("a/"), file("a/a/x")]));
  await validate(await packTar([file("a/b"), symlink("a", "x"), dir("a/"), dir("a/b/"), file("a/b/c")]));
  // A file that went with it is no target in this layer any more: a lower layer's, if any.
  const lower = await validate(await packTar([file("a/b"), fifo("a"), dir("a/"), hardlink("h", "a/b")]));
  assert.equal(lower.lowerLayerLinks, 1);
  // A hard link to a symlink of this layer is that symlink.
  const hard = await refused(await packTar([dir("d/"), symlink("s", "d"), hardlink("h", "s"), file("h/x")]), "THROUGH_SYMLINK");
  assert.equal(hard.entry, "h/x");
  // A hard link under its own path: the link replaces the directory its target is in.
  const own = await refused(await packTar([fifo("c/b/b"), hardlink("c", "c/b/b")]), "HARDLINK_TARGET_INVALID");
  assert.match(own.message, /under its own path/);
});

test("symlink targets: anything but empty, NUL or too long", async () => {
  const ok = await validate(await packTar([symlink("a", "/abs/olute"), symlink("b", "../../../../etc/shadow"), symlink("c", "x".repeat(4095))]));
  assert.equal(ok.symlinks, 3);
  await refused(rawTar([[{ name: "s", typeflag: "2" }]]), "SYMLINK_TARGET_INVALID");
  await refused(await packTar([symlink("s", "x".repeat(4096))]), "SYMLINK_TARGET_INVALID");
  await refused(await packTar([{ header: { name: "s", type: "symlink", linkname: "a\0b", pax: { comment: "force PAX" } } }]), "SYMLINK_TARGET_INVALID");
  await refused(rawTar([[{ name: "s", typeflag: "2", linkname: Buffer.from([0xc3, 0x28]) }]]), "BAD_ENCODING");
  await refused(await packTar([symlink("s", "short")]), "SYMLINK_TARGET_INVALID", { maxLinkTargetBytes: 4 });
});

test("hardlink targets are names of this layer or of a lower one, never escapes, dirs or deleted paths", async () => {
  const accepted = await validate(await packTar([file("a/f"), hardlink("a/g", "./a/f"), hardlink("a/h", "lower/file"), symlink("s", "x"), hardlink("s2", "s")]));
  assert.equal(accepted.hardlinks, 3);
  assert.equal(accepted.lowerLayerLinks, 1);

  const invalid: PackEntry[][] = [
    [hardlink("h", "/etc/shadow")],
    [hardlink("h", "../etc/shadow")],
    [hardlink("h", "a/../../etc")],
    [hardlink("h", "./")],
    [hardlink("h", "h")],
    [dir("d/"), hardlink("h", "d")],
    [whiteout("d/.wh.x"), hardlink("h", "d/.wh.x")],
  ];
  for (const entries of invalid) await refused(await packTar(entries), "HARDLINK_TARGET_INVALID");
  await refused(rawTar([[{ name: "h", typeflag: "1" }]]), "HARDLINK_TARGET_INVALID");

  await refused(await packTar([whiteout("etc/.wh.passwd"), hardlink("p", "etc/passwd")]), "HARDLINK_TO_MISSING");
  await refused(await packTar([whiteout(".wh.etc"), hardlink("p", "etc/passwd")]), "HARDLINK_TO_MISSING");
  await refused(await packTar([whiteout("etc/.wh..wh..opq"), hardlink("p", "etc/sub/passwd")]), "HARDLINK_TO_MISSING");
  await refused(await packTar([whiteout(".wh..wh..opq"), hardlink("p", "etc/passwd")]), "HARDLINK_TO_MISSING");
  // Re-created after the whiteout in the same layer: fine.
  assert.equal((await validate(await packTar([whiteout("etc/.wh.passwd"), file("etc/passwd"), hardlink("p", "etc/passwd")]))).lowerLayerLinks, 0);
  // The opaque marker hides lower content of etc/ only, not etc/ itself.
  assert.equal((await validate(await packTar([whiteout("etc/.wh..wh..opq"), hardlink("p", "etc")]))).lowerLayerLinks, 1);
});

test("whiteouts: a non-empty plain name, an empty regular file; the opaque marker only as a basename", async () => {
  const ok = await validate(await packTar([whiteout(".wh.top"), whiteout("a/.wh..hidden"), whiteout("a/.wh..wh..opq"), whiteout(".wh..wh..opq")]));
  assert.deepEqual([ok.whiteouts, ok.opaqueDirs], [2, 2]);
  for (const name of ["a/.wh.", "a/.wh..", "a/.wh...", "a/.wh..wh.plnk", ".wh..wh..opq2", "a/.wh..wh."]) {
    await refused(await packTar([whiteout(name)]), "BAD_WHITEOUT");
  }
  await refused(await packTar([file("a/.wh.x", "content")]), "BAD_WHITEOUT");
  await refused(await packTar([dir("a/.wh.x/")]), "BAD_WHITEOUT");
  await refused(await packTar([symlink("a/.wh.x", "y")]), "BAD_WHITEOUT");
  await refused(await packTar([file("a/.wh..wh..opq", "content")]), "BAD_WHITEOUT");
  // ".wh..wh..opq" as a directory component is just a (strange) name.
  assert.equal((await validate(await packTar([file("x.wh..wh..opq/y")]))).files, 1);
});

test("size and count limits", async () => {
  await refused(await packTar([file("a", "12345")]), "ENTRY_TOO_LARGE", { maxEntryBytes: 4 });
  assert.equal((await validate(await packTar([file("a", "1234")]), { maxEntryBytes: 4 })).fileBytes, 4);
  await refused(await packTar([file("a"), file("b"), file("c")]), "TOO_MANY_ENTRIES", { maxEntries: 2 });
  assert.equal((await validate(await packTar([file("a"), file("b")]), { maxEntries: 2 })).entries, 2);
  const big = await packTar([file("a", "x".repeat(100_000))]);
  await refused(big, "LAYER_TOO_LARGE", { maxLayerBytes: big.length - 1 });
  assert.equal((await validate(big, { maxLayerBytes: big.length })).tarBytes, big.length);
});

test("owners must be real ids", async () => {
  const negative = Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]); // base-256 -1
  await refused(rawTar([[{ name: "f", uidField: negative }, "x"]]), "BAD_OWNER");
  const minusOne = Buffer.from([0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
  await refused(rawTar([[{ name: "f", uidField: minusOne }, "x"]]), "BAD_OWNER");
  assert.equal((await validate(await packTar([file("f", "x", { uid: 65534, gid: 65534 })]))).files, 1);
});

test("PAX records: ids up to 4294967294 win over the header, numbers must be numbers", async () => {
  // GNU tar writes 0 (or a clamped value) in the ustar field when the id does not fit.
  assert.equal((await validate(await packTar([file("f", "x", { uid: 0, pax: { uid: "300000", gid: "4294967294" } })]))).files, 1);
  assert.equal((await validate(await packTar([file("f", "x", { uid: 7, pax: { uid: "7" } })]))).files, 1);
  await refused(await packTar([file("f", "x", { gid: 5, pax: { gid: "-1" } })]), "BAD_PAX");
  await refused(await packTar([file("f", "x", { pax: { uid: "12abc" } })]), "BAD_PAX");
  await refused(await packTar([file("f", "x", { pax: { uid: "4294967295" } })]), "BAD_OWNER");
  await refused(await packTar([file("f", "x", { pax: { size: "1abc" } })]), "BAD_PAX");
  await refused(await packTar([file("f", "x", { pax: { mtime: "soon" } })]), "BAD_PAX");
  assert.equal((await validate(await packTar([file("f", "x", { pax: { mtime: "1700000000.123456789" } })]))).files, 1);
  await refused(await packTar([file("f", "x", { pax: { "GNU.sparse.major": "1", "GNU.sparse.minor": "0" } })]), "BAD_SPARSE_MAP"); // 1.0 without its real size
  for (const name of ["trusted.overlay.opaque", "security.selinux", "system.posix_acl_access", "user."]) {
    await refused(await packTar([file("f", "x", { pax: { [`SCHILY.xattr.${name}`]: "y" } })]), "BAD_XATTR");
  }
  await refused(await packTar([file("f", "x", { pax: { "SCHILY.xattr.user.big": "v".repeat(65537) } })]), "BAD_XATTR");
  // Malformed records: a length that does not end at a newline.
  const badRecord = Buffer.from("30 path=x\n");
  await refused(rawTar([[{ name: "PaxHeaders/f", typeflag: "x" }, badRecord], [{ name: "f" }, "x"]]), "BAD_PAX");
  // A global header may carry a comment (git archive writes one), nothing else.
  const comment = paxRecords([["comment", Buffer.from("a commit id")]]);
  assert.equal((await validate(rawTar([[{ name: "pax_global_header", typeflag: "g" }, comment], [{ name: "f" }, "x"]]))).files, 1);
  await refused(rawTar([[{ name: "pax_global_header", typeflag: "g" }, paxRecords([["uid", Buffer.from("0")]])], [{ name: "f" }, "x"]]), "BAD_PAX");
});

test("PAX: one extended header per member, no empty path or linkpath, numbers that are safe integers", async () => {
  const x = (records: [string, string][]) => [{ name: "PaxHeaders/f", typeflag: "x" }, paxRecords(records)] as const;
  // Go and GNU tar keep the last of two, libarchive refuses the second: refused.
  const twice = await refused(rawTar([x([["comment", "first"]]), x([["mtime", "1"]]), [{ name: "f" }, "x"]]), "BAD_PAX");
  assert.equal(twice.entry, "(archive)");
  assert.match(twice.message, /second PAX extended header/);
  // POSIX: an empty value deletes the field; Go keeps the ustar name. Refused, named by the header.
  const emptyPath = await refused(rawTar([x([["path", ""]]), [{ name: "f" }, "x"]]), "BAD_PAX");
  assert.deepEqual([emptyPath.entry, emptyPath.message], ["f", "PAX path record with an empty value"]);
  await refused(rawTar([x([["linkpath", ""]]), [{ name: "l", typeflag: "2", linkname: "t" }]]), "BAD_PAX");
  // Other empty values: an empty xattr value is a value, an empty comment nothing.
  assert.equal((await validate(rawTar([x([["SCHILY.xattr.user.empty", ""], ["comment", ""]]), [{ name: "f" }, "x"]]))).files, 1);
  for (const [key, value] of [["uid", "99999999999999999999"], ["size", "9007199254740993"], ["mtime", "12345678901234567890"], ["ctime", "soon"], ["atime", "1."], ["uid", ""]]) {
    await refused(rawTar([x([[key!, value!]]), [{ name: "f" }, "x"]]), "BAD_PAX");
  }
  assert.equal((await validate(rawTar([x([["gid", "007"], ["mtime", "-1.5"], ["ctime", "1700000000"]]), [{ name: "f" }, "x"]]))).files, 1);
  // BAD_PAX before BAD_OWNER, whatever the records' order.
  await refused(rawTar([x([["uid", "4294967295"], ["mtime", "x"]]), [{ name: "f" }, "x"]]), "BAD_PAX");
});

/** A v2 file capability (cap_net_raw,cap_setfcap+ep) as setcap writes it: 20 bytes, with 0x00 and 0x80. */
const CAPABILITY = Buffer.from("0100000200200080000000000000000000000000", "hex");

test("binary xattr values (security.capability as setcap writes it) are read as bytes, and allowed only where Linux allows them", async () => {
  assert.ok(CAPABILITY.includes(0) && CAPABILITY.some((b) => b >= 0x80));
  const withXattr = (key: string, value: Buffer, member: Parameters<typeof rawHeader>[0], body?: string) =>
    rawTar([[{ name: "PaxHeaders/x", typeflag: "x" }, paxRecords([[`SCHILY.xattr.${key}`, value]])], [member, body]]);
  assert.equal((await validate(withXattr("security.capability", CAPABILITY, { name: "usr/bin/ping", mode: 0o755 }, "elf"))).files, 1);
  assert.equal((await validate(withXattr("user.bin", Buffer.from([0, 0xff, 0x80, 10]), { name: "d/", typeflag: "5" }))).directories, 1);
  // Every byte counts toward the 64 KiB limit (a UTF-8 decoder would have turned 0xff into 3 bytes).
  assert.equal((await validate(withXattr("user.big", Buffer.alloc(65536, 0xff), { name: "f" }, "x"))).files, 1);
  await refused(withXattr("user.big", Buffer.alloc(65537, 0xff), { name: "f" }, "x"), "BAD_XATTR");
  const onLink = await refused(withXattr("user.x", Buffer.from("y"), { name: "s", typeflag: "2", linkname: "t" }), "BAD_XATTR");
  assert.match(onLink.message, /user\.\* xattrs cannot be set on a symlink/);
  await refused(withXattr("user.x", Buffer.from("y"), { name: "p", typeflag: "6" }), "BAD_XATTR");
  await refused(withXattr("security.capability", CAPABILITY, { name: "d/", typeflag: "5" }), "BAD_XATTR");
  await refused(withXattr("security.capability", CAPABILITY, { name: "s", typeflag: "2", linkname: "t" }), "BAD_XATTR");
});

test("objects that are not tars", async () => {
  await refused(Buffer.alloc(0), "NOT_A_TAR");
  await refused(Buffer.from("hello"), "NOT_A_TAR");
  await refused(Buffer.alloc(4096, 0x41), "NOT_A_TAR");
  const xz = await refused(Buffer.concat([Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), Buffer.alloc(2000, 1)]), "NOT_A_TAR");
  assert.match(xz.message, /xz/);
  await refused(rawTar([[{ name: "f", badChecksum: true }, "x"]]), "NOT_A_TAR");
  await refused(rawTar([[{ name: "f", magic: "none" }, "x"]]), "NOT_A_TAR");
  assert.equal((await validate(rawTar([[{ name: "f", magic: "gnu" }, "x"]]))).files, 1);
  // A bad header after good members.
  await refused(rawTar([[{ name: "a" }, "x"], [{ name: "b", badChecksum: true }, "y"]]), "NOT_A_TAR");
});

test("gzip and zstd layers are recognized by magic bytes and hold the same entries as the plain tar", async () => {
  const tar = await packTar([dir("usr/"), file("usr/bin/perl", "perl".repeat(3000), { mode: 0o755 }), symlink("bin", "usr/bin"), hardlink("usr/bin/p", "usr/bin/perl")]);
  const plain = await validate(tar);
  assert.equal(plain.compression, "none");
  const zipped = [gzipSync(tar), zstdCompressSync(tar)];
  for (const [i, compression] of (["gzip", "zstd"] as const).entries()) {
    const bytes = zipped[i]!;
    assert.ok(bytes.length < tar.length / 2, `${compression} really compressed`);
    for (const chunk of [1, 3, 100, bytes.length]) {
      assert.deepEqual(await validate(bytes, {}, chunk), { ...plain, compression, objectBytes: bytes.length }, `${compression}, chunks of ${chunk}`);
    }
  }
  // Concatenated gzip members are one stream (RFC 1952; gunzip and zlib agree).
  const split = Buffer.concat([gzipSync(tar.subarray(0, 1000)), gzipSync(tar.subarray(1000))]);
  assert.deepEqual(await validate(split), { ...plain, compression: "gzip", objectBytes: split.length });
});

test("compression is told by content, never by name", async () => {
  // validateLayer never sees a name; an object that a ".tar.gz" key would call gzip but that is
  // a plain tar is a plain tar, and plain bytes stay "not a tar" whatever they are called.
  const tar = await packTar([file("a", "x")]);
  assert.equal((await validate(tar)).compression, "none");
  await refused(Buffer.from("not gzip at all, despite layer.tar.gz"), "NOT_A_TAR");
  // A plain tar that carries gzip data as a member is a plain tar.
  const carrier = await packTar([file("inner.tar.gz", gzipSync(tar))]);
  assert.deepEqual([(await validate(carrier)).compression, (await validate(carrier)).files], ["none", 1]);
  // Only the very first bytes count: the gzip magic one byte in is plain bytes, not a tar.
  await refused(Buffer.concat([Buffer.from([0]), gzipSync(tar)]), "NOT_A_TAR");
});

test("broken compressed objects: truncated, garbage after the magic, data after the stream", async () => {
  const tar = await packTar([file("a", "x".repeat(100_000)), file("b", "y")]);
  for (const packed of [gzipSync(tar), zstdCompressSync(tar)]) {
    for (const cut of [4, 10, packed.length >> 1, packed.length - 1]) {
      const err = await refused(packed.subarray(0, cut), "BAD_COMPRESSION");
      assert.match(err.message, /(gzip|zstd) stream is corrupt or truncated: .+/);
    }
  }
  await refused(Buffer.from([0x1f, 0x8b]), "BAD_COMPRESSION");
  await refused(Buffer.concat([Buffer.from([0x1f, 0x8b]), Buffer.alloc(2000, 1)]), "BAD_COMPRESSION");
  await refused(Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), Buffer.alloc(2000, 1)]), "BAD_COMPRESSION");
  // A good stream of a bad tar: the tar rules still apply inside.
  await refused(gzipSync(tar.subarray(0, 1000)), "TRUNCATED");
  await refused(zstdCompressSync(await packTar([file("../etc/passwd", "x")])), "DOTDOT");
  // Raw bytes the decoder did not consume are refused, not silently dropped.
  await refused(Buffer.concat([gzipSync(tar), Buffer.alloc(512)]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([gzipSync(tar), Buffer.from("junk")]), "BAD_COMPRESSION");
  await refused(Buffer.concat([zstdCompressSync(tar), Buffer.from("junk")]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([zstdCompressSync(tar), Buffer.alloc(3)]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([zstdCompressSync(tar), SKIPPABLE.subarray(0, 10)]), "BAD_COMPRESSION");
});

/** A zstd skippable frame (magic 0x184D2A5A, 4-byte length, user data). */
const SKIPPABLE = Buffer.concat([Buffer.from([0x5a, 0x2a, 0x4d, 0x18, 12, 0, 0, 0]), Buffer.from("not a frame!")]);

test("multi-frame zstd (and skippable frames) decode as one stream, whatever the read sizes", async () => {
  const tar = await packTar([dir("usr/"), file("usr/a", "a".repeat(300_000)), file("usr/b", Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7919) % 251)))]);
  const plain = await validate(tar);
  // Two frames, the first ending mid-archive; Node's decoder alone would read only the first
  // frame unless it ended exactly at a chunk boundary.
  const twoFrames = Buffer.concat([zstdCompressSync(tar.subarray(0, 250_000)), zstdCompressSync(tar.subarray(250_000))]);
  for (const chunk of [1, 7, 4096, 65536, 1024 * 1024]) {
    assert.deepEqual(await validate(twoFrames, {}, chunk), { ...plain, compression: "zstd", objectBytes: twoFrames.length }, `chunks of ${chunk}`);
  }
  const withSkippable = Buffer.concat([zstdCompressSync(tar.subarray(0, 1024)), SKIPPABLE, zstdCompressSync(tar.subarray(1024)), SKIPPABLE]);
  for (const chunk of [1, 7, 4096]) {
    assert.equal((await validate(withSkippable, {}, chunk)).fileBytes, plain.fileBytes, `chunks of ${chunk}`);
  }
  // Multi-member gzip is chunk-independent too.
  const twoMembers = Buffer.concat([gzipSync(tar.subarray(0, 250_000)), gzipSync(tar.subarray(250_000))]);
  for (const chunk of [1, 7, 4096, 65536]) assert.equal((await validate(twoMembers, {}, chunk)).fileBytes, plain.fileBytes);
  // A frame with its checksum (zstd -C) and one with a raw block.
  const level0 = zstdCompressSync(Buffer.concat([tar.subarray(0, 512)]), { params: { [zlibConstants.ZSTD_c_checksumFlag]: 1 } });
  assert.equal((await validate(Buffer.concat([level0, zstdCompressSync(tar.subarray(512))]), {}, 5)).fileBytes, plain.fileBytes);
});

test("a decompression bomb stops at maxDecompressedBytes, quickly", async () => {
  const bomb = gzipSync(await packTar([file("zeros", Buffer.alloc(64 * 1024 * 1024))]));
  assert.ok(bomb.length < 200 * 1024, `bomb is ${bomb.length} bytes`);
  const started = performance.now();
  const err = await refused(bomb, "DECOMPRESSION_LIMIT", { maxDecompressedBytes: 1024 * 1024 });
  assert.match(err.message, /gzip layer decompresses to more than 1048576 bytes/);
  assert.ok(performance.now() - started < 2000, "stopped early");
  await refused(zstdCompressSync(Buffer.alloc(8 * 1024 * 1024)), "DECOMPRESSION_LIMIT", { maxDecompressedBytes: 1024 * 1024 });
  // Under the limit the same object is a fine (if large) layer; the tar limits still apply to it.
  assert.equal((await validate(bomb, { maxDecompressedBytes: 65 * 1024 * 1024 })).fileBytes, 64 * 1024 * 1024);
  await refused(bomb, "LAYER_TOO_LARGE", { maxLayerBytes: 32 * 1024 * 1024 });
  // maxLayerBytes also bounds the object as stored.
  await refused(bomb, "LAYER_TOO_LARGE", { maxLayerBytes: bomb.length - 1 });
});

test("a failing input stream rejects with its own error, also inside a compressed layer", async () => {
  const packed = gzipSync(await packTar([file("a", "x".repeat(50_000))]));
  const boom = new Error("connection reset");
  const input = new Readable({
    read() {
      this.push(packed.subarray(0, 100));
      this.destroy(boom);
    },
  });
  await assert.rejects(validateLayer(input), (err) => err === boom);
});

test("truncated objects", async () => {
  const tar = await packTar([file("a", "x".repeat(2000)), file("b", "y")]);
  await refused(tar.subarray(0, 1000), "TRUNCATED"); // inside a's data
  await refused(tar.subarray(0, 512 + 2048 + 100), "TRUNCATED"); // inside b's header
  await refused(tar.subarray(0, tar.length - 1024), "TRUNCATED"); // no end marker
  await refused(tar.subarray(0, tar.length - 512), "TRUNCATED"); // one zero block of two
  await refused(tar.subarray(0, tar.length - 100), "TRUNCATED");
  // A PAX header that no member follows, with or without the end marker after it.
  const pax = await packTar([file(`${"n".repeat(150)}`, "z")]);
  await refused(Buffer.concat([pax.subarray(0, 1024), END_OF_ARCHIVE]), "TRUNCATED");
  await refused(pax.subarray(0, 1024), "TRUNCATED");
});

test("nothing may follow the end of the archive but zeros", async () => {
  const tar = await packTar([file("a", "x")]);
  const second = await packTar([file("etc/evil", "appended")]);
  await refused(Buffer.concat([tar, second]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([tar, Buffer.from([1])]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([tar, Buffer.alloc(4096), Buffer.from([1])]), "TRAILING_GARBAGE");
  await refused(Buffer.concat([tar, Buffer.alloc(100)]), "TRAILING_GARBAGE"); // not whole blocks
  // A lone zero block, then another member: GNU tar stops there, tar-stream would go on.
  await refused(Buffer.concat([tar.subarray(0, tar.length - 1024), Buffer.alloc(512), second]), "TRAILING_GARBAGE");
  // A zero block between a PAX header and its member.
  const pax = await packTar([file(`${"n".repeat(150)}`, "z")]);
  await refused(Buffer.concat([pax.subarray(0, 1024), Buffer.alloc(512), pax.subarray(1024)]), "TRAILING_GARBAGE");
});

test("metadata headers are bounded", async () => {
  const tar = await packTar([file("f", "x", { pax: { "SCHILY.xattr.user.big": "v".repeat(60000) } })]);
  await refused(tar, "HEADER_TOO_LARGE", { maxHeaderBytes: 4096 });
  assert.equal((await validate(tar)).files, 1);
});

test("a failing input stream rejects with its own error, not a validation error", async () => {
  const tar = await packTar([file("a", "x".repeat(5000))]);
  const boom = new Error("connection reset");
  const input = new Readable({
    read() {
      this.push(tar.subarray(0, 1024));
      this.destroy(boom);
    },
  });
  await assert.rejects(validateLayer(input), (err) => err === boom);
});

test("a refused layer stops reading its input", async () => {
  const tar = await packTar([file("/abs", "x")]);
  let reads = 0;
  const input = new Readable({
    read() {
      reads++;
      this.push(reads === 1 ? tar : Buffer.alloc(65536));
    },
  });
  await assert.rejects(validateLayer(input), (err: LayerValidationError) => err.rule === "ABSOLUTE_PATH");
  assert.ok(input.destroyed, "input destroyed");
  assert.ok(reads < 100, `read ${reads} chunks`);
});

/** Names as tar-stream reads them back from an archive (members only). */
async function memberNames(tar: Buffer): Promise<Array<{ name: string; linkname: string | null; type: string }>> {
  const out: Array<{ name: string; linkname: string | null; type: string }> = [];
  const parser = extract();
  const done = (async () => {
    for await (const member of parser) {
      for await (const _ of member);
      out.push({ name: member.header.name, linkname: member.header.linkname || null, type: member.header.type });
    }
  })();
  parser.end(tar);
  await done;
  return out;
}

/** An independent statement of "escapes the root". */
function escapes(name: string): boolean {
  return name.startsWith("/") || name.split("/").includes("..");
}

test("property: no accepted layer has a member (or hardlink target) that escapes the root", async () => {
  const component = fc.constantFrom("..", ".", "", "a", "b", "etc", "..a", "a..", ".wh.x", "x y", "...");
  const name = fc
    .tuple(fc.constantFrom("", "/", "./", "//", "../"), fc.array(component, { minLength: 1, maxLength: 5 }), fc.constantFrom("", "/"))
    .map(([prefix, parts, suffix]) => prefix + parts.join("/") + suffix);
  const entry = fc.record({ type: fc.constantFrom("file", "directory", "symlink", "link"), name, target: name });
  await fc.assert(
    fc.asyncProperty(fc.array(entry, { minLength: 1, maxLength: 6 }), async (entries) => {
      const tar = await packTar(
        entries.map((e) =>
          e.type === "file"
            ? { header: { name: e.name }, body: "" }
            : { header: { name: e.name, type: e.type as "directory" | "symlink" | "link", ...(e.type === "directory" ? {} : { linkname: e.target || "t" }) } },
        ),
      );
      const members = await memberNames(tar);
      const dangerous = members.some((m) => escapes(m.name) || (m.type === "link" && m.linkname !== null && escapes(m.linkname)));
      let accepted = true;
      try {
        await validate(tar);
      } catch (err) {
        if (!(err instanceof LayerValidationError)) throw err;
        accepted = false;
      }
      if (accepted) assert.ok(!dangerous, `accepted a layer with an escaping name: ${JSON.stringify(members)}`);
      if (dangerous) assert.ok(!accepted);
    }),
    { numRuns: 300, seed: 4242 },
  );
});

test("property: normalized names are relative, canonical and free of .. components", () => {
  fc.assert(
    fc.property(fc.array(fc.constantFrom("..", ".", "", "a", "b/", "/", "c.", ".d", "…"), { maxLength: 8 }), (parts) => {
      const raw = parts.join("/");
      let name: string;
      try {
        name = normalizeEntryName(raw);
      } catch (err) {
        if (err instanceof LayerValidationError) return;
        throw err;
      }
      assert.ok(!escapes(name), name);
      assert.ok(!name.startsWith("/") && !name.endsWith("/") && !name.includes("//"), name);
      assert.ok(!name.split("/").includes("."), name);
    }),
    { numRuns: 2000, seed: 7 },
  );
});

test("padding helper sanity", () => {
  assert.equal(padded("x").length, 512);
  assert.equal(padded(Buffer.alloc(512)).length, 512);
});

test("GNU tar's sparse archives (old GNU, PAX 0.0, 0.1, 1.0) are accepted: real sizes for the limit, stored bytes for what is written", async (t) => {
  const base = mkdtempSync(join(tmpdir(), "imgd-sparse-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const { src, tars } = gnuSparseArchives(base);
  const files = SPARSE_FILES.filter((n) => !n.endsWith(".link"));
  // GNU tar stores each file's data as SEEK_DATA/SEEK_HOLE find it, in whole filesystem blocks:
  // hole-at-end's 17 bytes are one block, data-at-end two, many-regions 50, punched 2 MiB less the
  // 1 MiB hole, all-hole nothing. (st_blocks may count an extent-tree block more: at most that.)
  const stored = 4096 + 2 * 4096 + 50 * 4096 + 1024 * 1024;
  const allocated = files.reduce((sum, n) => sum + statSync(join(src, n)).blocks * 512, 0);
  assert.ok(stored <= allocated, `${stored} stored, ${allocated} allocated`);
  const largest = Math.max(...files.map((n) => statSync(join(src, n)).size));
  for (const format of SPARSE_FORMATS) {
    for (const chunk of [tars[format].length, 777]) {
      const summary = await validate(tars[format], {}, chunk);
      assert.deepEqual(
        { files: summary.files, hardlinks: summary.hardlinks, sparseFiles: summary.sparseFiles, fileBytes: summary.fileBytes },
        { files: files.length, hardlinks: 1, sparseFiles: files.length, fileBytes: stored },
        `${format}, chunks of ${chunk}`,
      );
      // 50 regions for many-regions, and at least one (its last, empty one) for every other file.
      assert.ok(summary.sparseRegions >= 50 + files.length, `${format}: ${summary.sparseRegions} regions`);
    }
    // The per-file limit is on the real size: a 3 MiB file of holes stores nothing and is still too large.
    const error = await refused(tars[format], "ENTRY_TOO_LARGE", { maxEntryBytes: largest - 1 });
    assert.match(error.message, /sparse file of \d+ bytes/);
    assert.equal((await validate(tars[format], { maxEntryBytes: largest })).files, files.length);
  }
});

test("sparse maps: hostile ones are BAD_SPARSE_MAP in every format; the region bound is exact", async () => {
  const d = Buffer.from("data");
  const end = (member: Buffer) => Buffer.concat([member, END_OF_ARCHIVE]);
  for (const format of SPARSE_FORMATS) {
    const bad: [string, Parameters<typeof sparseMember>[1]][] = [
      ["out of order", { name: "s", realSize: 100, map: [[50, 2], [0, 2]], data: d }],
      ["overlapping", { name: "s", realSize: 100, map: [[0, 3], [2, 1]], data: d }],
      ["past the real size", { name: "s", realSize: 100, map: [[98, 4]], data: d }],
      ["offset + size overflowing", { name: "s", realSize: Number.MAX_SAFE_INTEGER, map: [[Number.MAX_SAFE_INTEGER - 1, 4]], data: d }],
      ["sizes not the stored bytes", { name: "s", realSize: 100, map: [[0, 5]], data: d }],
      ["a number that is not one", { name: "s", realSize: 100, map: [[format === "gnu" ? "0x10" : "1e3", 4]], data: d }],
      ["a real size that is not a number", { name: "s", realSize: format === "gnu" ? "-1" : "12abc", map: [[0, 4]], data: d }],
    ];
    for (const [what, spec] of bad) {
      const error = await refused(end(sparseMember(format, spec)), "BAD_SPARSE_MAP");
      assert.equal(error.entry, "s", `${format}, ${what}: names the real name`);
    }
    // Adjacent regions, an empty region at the end, and exactly MAX_SPARSE_REGIONS regions are fine.
    assert.equal((await validate(end(sparseFile(format, "s", 10, [[0, Buffer.from("ab")], [2, Buffer.from("cd")], [10, Buffer.alloc(0)]])))).fileBytes, 4);
    const most = Array.from({ length: MAX_SPARSE_REGIONS }, (_, i) => [2 * i, Buffer.from("r")] as const);
    const tooMany = [...most, [2 * MAX_SPARSE_REGIONS, Buffer.from("r")] as const];
    if (format === "0.0") {
      // Two PAX records per region: 0.0 maps reach the 1 MiB header bound first (about 18,000 regions).
      await refused(end(sparseFile(format, "s", 2 * MAX_SPARSE_REGIONS, most)), "HEADER_TOO_LARGE");
      assert.match((await refused(end(sparseMember(format, { name: "s", realSize: 10, map: [], count: MAX_SPARSE_REGIONS + 1, data: Buffer.alloc(0) })), "BAD_SPARSE_MAP")).message, /more than 65536 regions/);
      continue;
    }
    const summary = await validate(end(sparseFile(format, "s", 2 * MAX_SPARSE_REGIONS, most)), {}, 4096);
    assert.deepEqual([summary.sparseRegions, summary.fileBytes], [MAX_SPARSE_REGIONS, MAX_SPARSE_REGIONS]);
    assert.match((await refused(end(sparseFile(format, "s", 2 * MAX_SPARSE_REGIONS + 1, tooMany)), "BAD_SPARSE_MAP")).message, /more than 65536 regions/);
  }
  // Mixed or unknown records, sparse records on a non-file, a sparse whiteout.
  const pax = (records: [string, string][], header: Parameters<typeof rawHeader>[0] = { name: "s" }, body = "") =>
    rawTar([[{ name: "PaxHeaders/s", typeflag: "x" }, paxRecords(records)], [header, body]]);
  await refused(pax([["GNU.sparse.major", "1"], ["GNU.sparse.minor", "0"], ["GNU.sparse.realsize", "4"], ["GNU.sparse.size", "4"]]), "BAD_SPARSE_MAP");
  await refused(pax([["GNU.sparse.size", "4"], ["GNU.sparse.numblocks", "0"], ["GNU.sparse.colour", "red"]]), "BAD_SPARSE_MAP");
  await refused(pax([["GNU.sparse.size", "0"], ["GNU.sparse.numblocks", "0"]], { name: "d/", typeflag: "5" }), "BAD_SPARSE_MAP");
  await refused(end(sparseFile("1.0", ".wh.gone", 100, [[100, Buffer.alloc(0)]])), "BAD_WHITEOUT");
  await refused(Buffer.concat([sparseFile("gnu", "s", 10, [[0, d]]).subarray(0, 512), END_OF_ARCHIVE]), "TRUNCATED");
});

test("the pool estimate counts a sparse file's stored bytes and a block per region, never its holes", () => {
  assert.deepEqual(layerSizeOf({ fileBytes: 8192, entries: 3, sparseRegions: 4 }), { fileBytes: 8192 + 4 * 4096, entries: 3 });
  assert.deepEqual(layerSizeOf({ fileBytes: 10, entries: 1, sparseRegions: 0 }), { fileBytes: 10, entries: 1 });
});
