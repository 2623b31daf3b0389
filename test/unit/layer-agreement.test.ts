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

const member = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant("dir" as const), name, mode, uid, xattr }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant("file" as const), name, mode, uid, xattr, size: fc.constantFrom(0, 1, 700) }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant("symlink" as const), name, target, uid, xattr: fc.constant(null) }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant("symlink" as const), name, target, uid, xattr }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant("hardlink" as const), name, target: name }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant("device" as const), name, uid, char: fc.boolean(), xattr: fc.constant(null) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant("fifo" as const), name, uid, xattr: fc.constant(null) }), weight: 1 },
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

/** The tar members for one generated entry: a PAX header first when ids or xattrs need one. */
type Generated = { kind: string; name: string; mode?: number; uid?: number; xattr?: [string, Buffer] | null; size?: number; target?: string; char?: boolean };
function membersOf(e: Generated): Member[] {
  const records: [string, Buffer | string][] = [];
  const id = e.uid ?? 0;
  if (id > 0o7777777) records.push(["uid", String(id)], ["gid", String(id)]);
  if (e.xattr) records.push([`SCHILY.xattr.${e.xattr[0]}`, e.xattr[1]]);
  const out: Member[] = records.length > 0 ? [[{ name: "PaxHeaders/x", typeflag: "x" }, paxRecords(records)]] : [];
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

const layer = fc.array(member, { minLength: 1, maxLength: 8 });

test("validator and applier agree on generated layers, both ways", { timeout: 600_000 }, async (t) => {
  assert.equal(process.getuid?.(), 0, "runs as root: the applier chowns and makes device nodes");
  const counts = { accepted: 0, refusedByBoth: 0, refusedByValidatorOnly: 0, lowerDependent: 0, withSparse: 0, sparseAccepted: 0, sparseRefusedByBoth: 0 };
  await fc.assert(
    fc.asyncProperty(layer, async (entries) => {
      // Each entry's blocks (without an end marker), and the names of its members in order.
      const parts = entries.map((e) => {
        if (e.kind === "sparse") return { bytes: sparseBytes(e as SparseGenerated), names: [e.name] };
        const members = membersOf(e);
        return { bytes: rawTar(members).subarray(0, -END_OF_ARCHIVE.length), names: members.filter(([h]) => h.typeflag !== "x").map(([h]) => String(h.name)) };
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
      const v = positions(names, validator.entry);
      const a = positions(names, applier.entry);
      assert.ok(v.length > 0 && a.length > 0 && v[0]! <= a.at(-1)!, `the applier refused at an entry before the validator's\n${show()}`);
      // The same member (a name that occurs once): the same rule.
      if (v.length === 1 && a.length === 1 && v[0] === a[0]) assert.equal(validator.rule, applier.rule, `same entry, different rules\n${show()}`);
    }),
    { numRuns: Number(process.env.IMGD_TEST_AGREEMENT_RUNS ?? 400), seed: process.env.IMGD_TEST_AGREEMENT_SEED ? Number(process.env.IMGD_TEST_AGREEMENT_SEED) : undefined },
  );
  t.diagnostic(`accepted by both ${counts.accepted}, refused by both ${counts.refusedByBoth}, by the validator only ${counts.refusedByValidatorOnly}; with sparse files ${counts.withSparse} (accepted ${counts.sparseAccepted}, BAD_SPARSE_MAP from both ${counts.sparseRefusedByBoth})`);
  // The generator must exercise both outcomes, or the property says little.
  assert.ok(counts.accepted > 20 && counts.refusedByBoth > 20, JSON.stringify(counts));
  // Sparse files too: layers with sound ones applied, hostile maps refused by both.
  assert.ok(counts.sparseAccepted > 5 && counts.sparseRefusedByBoth > 5, JSON.stringify(counts));
});
