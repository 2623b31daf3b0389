// The two guards agree (issues 8 and 9): over generated layers, whatever the agent's validator
// accepts the root helper's applier applies, and whatever the applier refuses the validator has
// refused already, at that entry or an earlier one, and with the same rule when at that entry.
// Layers are drawn from a small alphabet of names so that entries collide: symlinks that later
// members write through, whiteouts of what the layer wrote, hardlinks to links, devices,
// binary xattrs, ids above 2^21. The applier runs as root on a fresh directory, without the
// chroot (it is a guard by itself), exactly as the child drives it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import fc from "fast-check";
import { LayerValidationError, printable, validateLayer } from "../../agent/layers/validate.ts";
import { WHOLE_ARCHIVE } from "../../agent/layers/errors.ts";
import { applyLayer } from "../../privhelper/apply/oci-apply.ts";
import { LayerRefused } from "../../privhelper/apply/refusal.ts";
import { END_OF_ARCHIVE, paxRecords, rawTar, SPARSE_FORMATS, sparseMember, type RawHeader } from "../fixtures/tar-bytes.ts";

type Member = readonly [RawHeader, Buffer?];
type Outcome = { ok: true } | { ok: false; rule: string; entry: string; message: string };

// Plain names most of the time; whiteouts and opaque markers now and then (a whiteout that is not
// the last component is refused by both, so they must not drown the rest).
const segment = fc.oneof({ arbitrary: fc.constantFrom("a", "b", "c"), weight: 12 }, { arbitrary: fc.constantFrom(".wh.a", ".wh.b", ".wh..wh..opq"), weight: 1 });
const name = fc.array(segment, { minLength: 1, maxLength: 3 }).map((parts) => parts.join("/"));
const target = fc.oneof(name, fc.constantFrom("/etc", "/a", "../a", "..", ".", "a/../b", "/"));
const uid = fc.constantFrom(0, 1000, 300_000, 4_294_967_294);
const mode = fc.constantFrom(0o644, 0o755, 0o4755, 0o600, 0o1777);
// A setcap-style v2 capability value: 0x00 and bytes >= 0x80, not UTF-8.
const CAPABILITY = Buffer.from("0000000200200000000000000000000000000000", "hex");
const xattr = fc.oneof(
  { arbitrary: fc.constant(null), weight: 8 },
  { arbitrary: fc.constantFrom<[string, Buffer]>(["user.note", Buffer.from([0x00, 0xff, 0x80, 0x41])], ["security.capability", CAPABILITY]), weight: 2 },
  { arbitrary: fc.constant<[string, Buffer]>(["trusted.overlay.opaque", Buffer.from("y")]), weight: 1 },
);

/**
 * PAX oddities, now and then: records readers disagree on (an empty path, a second 'x' header),
 * numbers at the edges of what the guards accept, global headers, a PAX path renaming the member.
 */
type PaxTweak = { records?: [string, string][]; extraX?: [string, string][]; global?: [string, string][] };
const PAX_TWEAKS: PaxTweak[] = [
  { extraX: [["comment", "first"]] },
  { extraX: [] },
  { records: [["path", ""]] },
  { records: [["linkpath", ""]] },
  { records: [["linkpath", "b"]] },
  { records: [["path", "c"]] },
  { records: [["path", "a/b"]] },
  { records: [["uid", "99999999999999999999"]] },
  { records: [["uid", "4294967295"]] },
  { records: [["gid", "007"]] },
  { records: [["uid", "4294967295"], ["mtime", "x"]] },
  { records: [["mtime", "1700000000.123456789"]] },
  { records: [["mtime", "-1.5"]] },
  { records: [["mtime", "12345678901234567890"]] },
  { records: [["atime", "1."]] },
  { records: [["ctime", "soon"]] },
  { records: [["ctime", "1700000000"]] },
  { records: [["size", "x"]] },
  { records: [["SCHILY.xattr.user.empty", ""]] },
  { records: [["comment", ""]] },
  { global: [["comment", "git"]] },
  { global: [["uid", "5"]] },
  { global: [["path", "x"]] },
];
const paxTweak = fc.oneof({ arbitrary: fc.constant(null), weight: 20 }, { arbitrary: fc.constantFrom(...PAX_TWEAKS), weight: 1 });

const member = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant("dir" as const), name, mode, uid, xattr, pax: paxTweak }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant("file" as const), name, mode, uid, xattr, size: fc.constantFrom(0, 1, 700), pax: paxTweak }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant("symlink" as const), name, target, uid, xattr: fc.constant(null), pax: paxTweak }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant("symlink" as const), name, target, uid, xattr }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant("hardlink" as const), name, target: name, pax: paxTweak }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant("device" as const), name, uid, char: fc.boolean(), xattr: fc.constant(null) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant("fifo" as const), name, uid, xattr: fc.constant(null), pax: paxTweak }), weight: 1 },
  { arbitrary: sparseEntry(), weight: 2 },
);

/**
 * A GNU sparse file in any of the four formats, with a map that is often sound and often not:
 * regions drawn from a few offsets and sizes (in order or not, overlapping or not, past the real
 * size or not), stored bytes that may not match, real sizes from empty to a few blocks.
 */
function sparseEntry() {
  const region = fc.tuple(fc.constantFrom(0, 4, 10, 4096, 5000), fc.constantFrom(0, 1, 6, 100));
  return fc.record({
    kind: fc.constant("sparse" as const),
    name,
    format: fc.constantFrom(...SPARSE_FORMATS),
    // Not over the per-file limit: that is the agent's policy (ENTRY_TOO_LARGE, the validator's
    // alone, as for any file), tested with the hostile corpus; the applier has no such setting.
    realSize: fc.constantFrom(0, 10, 5100, 70_000),
    regions: fc.oneof(
      fc.array(region, { maxLength: 4 }),
      // Sorted and apart: a sound map more often than chance would give.
      fc.uniqueArray(fc.constantFrom(0, 1000, 2000, 3000, 4000), { maxLength: 4 }).map((offsets) => offsets.sort((a, b) => a - b).map((o) => [o, 6] as [number, number])),
    ),
    dataDelta: fc.constantFrom(0, 0, 0, 1, -1),
  });
}
type SparseGenerated = { kind: "sparse"; name: string; format: (typeof SPARSE_FORMATS)[number]; realSize: number; regions: [number, number][]; dataDelta: number };

/** A sparse entry's blocks, as GNU tar would lay them out for its format. */
function sparseBytes(e: SparseGenerated): Buffer {
  const stored = Math.max(0, e.regions.reduce((sum, [, size]) => sum + size, 0) + e.dataDelta);
  return sparseMember(e.format, { name: e.name, realSize: e.realSize, map: e.regions, data: Buffer.alloc(stored, 0x73) });
}

/** The tar members for one generated entry: a PAX header first when ids, xattrs or a tweak need one. */
type Generated = { kind: string; name: string; mode?: number; uid?: number; xattr?: [string, Buffer] | null; size?: number; target?: string; char?: boolean; pax?: PaxTweak | null };
function membersOf(e: Generated): Member[] {
  const records: [string, Buffer | string][] = [];
  const id = e.uid ?? 0;
  if (id > 0o7777777) records.push(["uid", String(id)], ["gid", String(id)]);
  if (e.xattr) records.push([`SCHILY.xattr.${e.xattr[0]}`, e.xattr[1]]);
  records.push(...(e.pax?.records ?? []));
  const out: Member[] = [];
  if (e.pax?.global) out.push([{ name: "pax_global_header", typeflag: "g" }, paxRecords(e.pax.global)]);
  if (e.pax?.extraX) out.push([{ name: "PaxHeaders/first", typeflag: "x" }, paxRecords(e.pax.extraX)]);
  if (records.length > 0) out.push([{ name: "PaxHeaders/x", typeflag: "x" }, paxRecords(records)]);
  const small = id > 0o7777777 ? 0 : id;
  const header: RawHeader = { name: e.name, mode: e.mode ?? 0o644, uid: small, gid: small };
  switch (e.kind) {
    case "dir":
      out.push([{ ...header, name: `${e.name}/`, typeflag: "5" }]);
      break;
    case "file":
      out.push([{ ...header, typeflag: "0" }, Buffer.alloc(e.size ?? 0, 0x61)]);
      break;
    case "symlink":
      out.push([{ ...header, mode: 0o777, typeflag: "2", linkname: e.target }]);
      break;
    case "hardlink":
      out.push([{ ...header, typeflag: "1", linkname: e.target }]);
      break;
    case "device":
      out.push([{ ...header, mode: 0o666, typeflag: e.char ? "3" : "4", devmajor: e.char ? 1 : 7, devminor: e.char ? 3 : 0 }]);
      break;
    case "fifo":
      out.push([{ ...header, typeflag: "6" }]);
      break;
  }
  return out;
}

async function validatorOutcome(tar: Buffer): Promise<Outcome & { lowerLinks?: number }> {
  try {
    const summary = await validateLayer(Readable.from([tar]));
    return { ok: true, lowerLinks: summary.lowerLayerLinks };
  } catch (err) {
    if (err instanceof LayerValidationError) return { ok: false, rule: err.rule, entry: err.entry, message: err.message };
    throw err;
  }
}

async function applierOutcome(tar: Buffer): Promise<Outcome> {
  const root = mkdtempSync(join(tmpdir(), "imgd-agree-"));
  try {
    await applyLayer(root, [tar]);
    return { ok: true };
  } catch (err) {
    if (err instanceof LayerRefused) return { ok: false, rule: err.rule, entry: err.entry, message: err.message };
    // Anything else (EEXIST, ENOTDIR, EPERM...) on a layer the validator let through is a
    // disagreement too: the applier must either apply or refuse by a rule.
    const e = err as NodeJS.ErrnoException & { entry?: string };
    return { ok: false, rule: `ERROR ${e.code ?? e.name}`, entry: e.entry ?? "?", message: e.message };
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

const sameName = (n: string, entry: string) => n === entry || printable(n) === entry || `${n}/` === entry || n === `${entry}/`;
/** Where an entry name occurs among the members (validator names are escaped for printing). */
function positions(names: string[], entry: string): number[] {
  return names.flatMap((n, i) => (sameName(n, entry) ? [i] : []));
}

// One layer in five holds only sparse files: mixed layers are mostly refused by something else,
// and CI once drew 4 accepted sparse layers in 400 (seeds 1-30 drew 8-21), under the floor
// below. With this arm the floor holds by a wide margin, not by luck.
const layer = fc.oneof({ arbitrary: fc.array(member, { minLength: 1, maxLength: 8 }), weight: 4 }, { arbitrary: fc.array(sparseEntry(), { minLength: 1, maxLength: 2 }), weight: 1 });
// A random seed each run, printed, so that any failure (a disagreement or a floor) can be replayed.
const SEED = process.env.IMGD_TEST_AGREEMENT_SEED ? Number(process.env.IMGD_TEST_AGREEMENT_SEED) : Math.floor(Math.random() * 2 ** 31);

test("validator and applier agree on generated layers, both ways", { timeout: 600_000 }, async (t) => {
  assert.equal(process.getuid?.(), 0, "runs as root: the applier chowns and makes device nodes");
  const counts = { accepted: 0, refusedByBoth: 0, refusedByValidatorOnly: 0, lowerDependent: 0, withSparse: 0, sparseAccepted: 0, sparseRefusedByBoth: 0 };
  await fc.assert(
    fc.asyncProperty(layer, async (entries) => {
      // Each entry's blocks (without an end marker), and the names of its members in order.
      const parts = entries.map((e) => {
        if (e.kind === "sparse") return { bytes: sparseBytes(e as SparseGenerated), names: [e.name] };
        const members = membersOf(e);
        // A PAX path renames the member (an empty one is refused in the header's name).
        const path = (e as Generated).pax?.records?.find(([key]) => key === "path")?.[1];
        const names = members.filter(([h]) => h.typeflag !== "x" && h.typeflag !== "g").map(([h]) => (path ? path : String(h.name)));
        return { bytes: rawTar(members).subarray(0, -END_OF_ARCHIVE.length), names };
      });
      const tar = Buffer.concat([...parts.map((p) => p.bytes), END_OF_ARCHIVE]);
      const names = parts.flatMap((p) => p.names);
      if (entries.some((e) => e.kind === "sparse")) counts.withSparse++;
      const validator = await validatorOutcome(tar);
      const applier = await applierOutcome(tar);
      const show = () => `layer: ${JSON.stringify(entries)}\nvalidator: ${JSON.stringify(validator)}\napplier: ${JSON.stringify(applier)}`;
      const sparse = entries.some((e) => e.kind === "sparse");
      if (validator.ok) {
        counts.accepted++;
        if (sparse) counts.sparseAccepted++;
        // Hardlinks to what this layer does not hold need a lower layer, which only the applier
        // sees: on an empty root they are missing, and nothing else may go wrong.
        if (!applier.ok && validator.lowerLinks && applier.rule === "HARDLINK_TO_MISSING") return void counts.lowerDependent++;
        assert.ok(applier.ok, `the validator accepted a layer the applier did not apply\n${show()}`);
        return;
      }
      if (applier.ok) {
        counts.refusedByValidatorOnly++;
        return; // the validator may be stricter (THROUGH_SYMLINK: the applier stays inside the root)
      }
      counts.refusedByBoth++;
      if (sparse && validator.rule === "BAD_SPARSE_MAP") counts.sparseRefusedByBoth++;
      // A hardlink to a target this layer does not hold is a lower layer's business: only the
      // applier can see it is missing.
      if (applier.rule === "HARDLINK_TO_MISSING") return void counts.lowerDependent++;
      if (validator.entry === WHOLE_ARCHIVE || applier.entry === WHOLE_ARCHIVE) {
        // About the archive, not one member: the same refusal.
        assert.deepEqual([applier.rule, applier.entry], [validator.rule, validator.entry], `different archive-level refusals\n${show()}`);
        return;
      }
      const v = positions(names, validator.entry);
      const a = positions(names, applier.entry);
      assert.ok(v.length > 0 && a.length > 0 && v[0]! <= a.at(-1)!, `the applier refused at an entry before the validator's\n${show()}`);
      // The same member (a name that occurs once): the same rule.
      if (v.length === 1 && a.length === 1 && v[0] === a[0]) assert.equal(validator.rule, applier.rule, `same entry, different rules\n${show()}`);
    }),
    { numRuns: Number(process.env.IMGD_TEST_AGREEMENT_RUNS ?? 400), seed: SEED },
  );
  t.diagnostic(`seed ${SEED}: accepted by both ${counts.accepted}, refused by both ${counts.refusedByBoth}, by the validator only ${counts.refusedByValidatorOnly}; with sparse files ${counts.withSparse} (accepted ${counts.sparseAccepted}, BAD_SPARSE_MAP from both ${counts.sparseRefusedByBoth})`);
  // The generator must exercise both outcomes, or the property says little.
  const floors = `seed ${SEED} (IMGD_TEST_AGREEMENT_SEED replays it): ${JSON.stringify(counts)}`;
  assert.ok(counts.accepted > 20 && counts.refusedByBoth > 20, floors);
  // Sparse files too: layers with sound ones applied, hostile maps refused by both.
  assert.ok(counts.sparseAccepted > 5 && counts.sparseRefusedByBoth > 5, floors);
});

// Disagreements the property found (seeds 1 and 3 at 4,000 runs, and the wider generator since),
// kept as fixed cases: both guards must give exactly this outcome.
const pax = (records: [string, string][]): RawMember => [{ name: "PaxHeaders/x", typeflag: "x" }, paxRecords(records)];
type RawMember = readonly [RawHeader, (Buffer | string)?];
const FOUND: Array<{ why: string; members: RawMember[]; outcome: { rule: string; entry: string } | "ok" }> = [
  {
    why: "a symlink under a directory that a fifo replaced is gone: the fifo is the parent",
    members: [[{ name: "a/a", typeflag: "2", linkname: "/etc" }], [{ name: "a", typeflag: "6" }], [{ name: "a/a/a/", typeflag: "5" }]],
    outcome: { rule: "PARENT_NOT_DIR", entry: "a/a/a/" },
  },
  {
    why: "... and after a new directory there, nothing under it is left",
    members: [[{ name: "a/a", typeflag: "2", linkname: "/etc" }], [{ name: "a", typeflag: "4", devmajor: 7, devminor: 0 }], [{ name: "a/", typeflag: "5" }], [{ name: "a/a/a" }, "x"]],
    outcome: "ok",
  },
  {
    why: "two PAX extended headers before one member",
    members: [pax([["comment", "first"]]), pax([["mtime", "1"]]), [{ name: "f" }, "x"]],
    outcome: { rule: "BAD_PAX", entry: WHOLE_ARCHIVE },
  },
  { why: "an empty PAX path", members: [pax([["path", ""]]), [{ name: "f" }, "x"]], outcome: { rule: "BAD_PAX", entry: "f" } },
  { why: "an empty PAX linkpath", members: [pax([["linkpath", ""]]), [{ name: "l", typeflag: "2", linkname: "t" }]], outcome: { rule: "BAD_PAX", entry: "l" } },
  {
    why: "a hardlink whose target is under its own path (the link replaces the directory first)",
    members: [[{ name: "c/b/b", typeflag: "6" }], [{ name: "c", typeflag: "1", linkname: "c/b/b" }]],
    outcome: { rule: "HARDLINK_TARGET_INVALID", entry: "c" },
  },
  {
    why: "a hardlink to a symlink of this layer is that symlink",
    members: [[{ name: "d/", typeflag: "5" }], [{ name: "s", typeflag: "2", linkname: "d" }], [{ name: "h", typeflag: "1", linkname: "s" }], [{ name: "h/x" }, "x"]],
    outcome: { rule: "THROUGH_SYMLINK", entry: "h/x" },
  },
  { why: "a whiteout under a fifo of this layer", members: [[{ name: "a", typeflag: "6" }], [{ name: "a/.wh.b" }]], outcome: { rule: "PARENT_NOT_DIR", entry: "a/.wh.b" } },
  { why: "a PAX uid beyond 2^53", members: [pax([["uid", "99999999999999999999"]]), [{ name: "f" }, "x"]], outcome: { rule: "BAD_PAX", entry: "f" } },
  { why: "a PAX ctime that is no time", members: [pax([["ctime", "soon"]]), [{ name: "f" }, "x"]], outcome: { rule: "BAD_PAX", entry: "f" } },
  { why: "a bad PAX time before an out-of-range uid", members: [pax([["uid", "4294967295"], ["mtime", "x"]]), [{ name: "f" }, "x"]], outcome: { rule: "BAD_PAX", entry: "f" } },
  {
    why: "a global header with more than a comment",
    members: [[{ name: "pax_global_header", typeflag: "g" }, paxRecords([["uid", "5"]])], [{ name: "f" }, "x"]],
    outcome: { rule: "BAD_PAX", entry: WHOLE_ARCHIVE },
  },
  // Structure: how an archive ends (checked by hand, not drawn by the property).
  { why: "an extended header that no member follows, then the end marker", members: [pax([["comment", "c"]])], outcome: { rule: "TRUNCATED", entry: WHOLE_ARCHIVE } },
];

/** The archive of `members`, cut short or lengthened at its end by `endDelta` bytes. */
const STRUCTURE: Array<{ why: string; members: RawMember[]; endDelta: number; outcome: { rule: string; entry: string } }> = [
  { why: "one zero block and part of a second", members: [[{ name: "f" }, "x"]], endDelta: -100, outcome: { rule: "TRUNCATED", entry: WHOLE_ARCHIVE } },
  { why: "an extended header, then one zero block", members: [pax([["comment", "c"]])], endDelta: -512, outcome: { rule: "TRUNCATED", entry: WHOLE_ARCHIVE } },
  { why: "zeros after the end marker, not whole blocks", members: [[{ name: "f" }, "x"]], endDelta: 100, outcome: { rule: "TRAILING_GARBAGE", entry: WHOLE_ARCHIVE } },
];

test("layers the property found the guards disagreeing on: both give the same outcome now", async () => {
  assert.equal(process.getuid?.(), 0, "runs as root: the applier chowns and makes device nodes");
  for (const { why, members, outcome } of FOUND) {
    const tar = rawTar(members);
    for (const [guard, got] of [["validator", await validatorOutcome(tar)], ["applier", await applierOutcome(tar)]] as const) {
      const seen = got.ok ? "ok" : { rule: got.rule, entry: got.entry };
      assert.deepEqual(seen, outcome, `${why}: the ${guard} ${got.ok ? "accepted it" : `said ${got.rule} at ${got.entry}: ${got.message}`}`);
    }
  }
  for (const { why, members, endDelta, outcome } of STRUCTURE) {
    const whole = rawTar(members);
    const tar = endDelta < 0 ? whole.subarray(0, endDelta) : Buffer.concat([whole, Buffer.alloc(endDelta)]);
    for (const [guard, got] of [["validator", await validatorOutcome(tar)], ["applier", await applierOutcome(tar)]] as const) {
      assert.deepEqual(got.ok ? "ok" : { rule: got.rule, entry: got.entry }, outcome, `${why}: the ${guard} ${got.ok ? "accepted it" : `said ${got.rule}: ${got.message}`}`);
    }
  }
});
