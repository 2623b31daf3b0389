// The small REAL image chain (test/fixtures/real-chain: Debian bookworm by mmdebstrap, build
// steps in a chroot, each step's diff written by GNU tar with whiteouts), checked on the host:
// it holds what real images hold, and extracting its layers in order (GNU tar plus a reference
// whiteout step) gives back every image's real root filesystem, manifest entry for entry. So
// when an activation in the VM (test/e2e/real-chain.test.ts) differs, imgd is wrong, not the
// chain. Builds the chain on first use (as root, from Debian's archive; cached in .vm/real/).
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, createReadStream, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { validateLayer } from "../../agent/layers/validate.ts";
import { ensureRealChain, expectedManifest, layerPath, referenceApply, tarMembers, type RealChain } from "../fixtures/real-chain/chain.ts";
import { layerChanges } from "../fixtures/real-chain/layer-diff.ts";
import { diffManifests, manifestOf, type RealEntry, type ScanEntry } from "../fixtures/real-chain/manifest.ts";

let chain: RealChain;
before(() => {
  chain = ensureRealChain("small");
});

const byPath = (m: RealEntry[]) => new Map(m.map((e) => [e.path, e]));

test("the small chain holds what real images hold", () => {
  const base = byPath(expectedManifest(chain, "real-base"));
  for (const [name, rdev] of Object.entries({ null: "1:3", zero: "1:5", full: "1:7", random: "1:8", urandom: "1:9", tty: "5:0", console: "5:1", ptmx: "5:2" })) {
    const e = base.get(`/dev/${name}`);
    assert.equal(e?.type, "chardev", `/dev/${name} is a character device in layer 1`);
    assert.equal(e.rdev, rdev);
  }
  assert.ok([...base.values()].some((e) => e.type === "file" && (e.mode & 0o4000) !== 0 && e.uid === 0), "a setuid-root file");
  assert.ok([...base.values()].some((e) => e.linkGroup !== null), "hardlinks in layer 1");

  const net = byPath(expectedManifest(chain, "real-net"));
  const ping = net.get("/usr/bin/ping")!;
  assert.match(ping.xattrs["security.capability"] ?? "", /^0[12]0000020020/, "ping has a binary security.capability (setcap's v2 layout)");
  assert.equal(net.get("/usr/local/libexec/ping-hardlink")?.linkGroup, ping.linkGroup, "a hardlink across directories");
  assert.ok(ping.linkGroup);
  assert.equal(net.get("/opt/userns/owned-by-300000")?.uid, 300000);
  assert.equal(net.get("/opt/userns/owned-by-3000000000")?.uid, 3000000000, "an id above 2^31 (only PAX holds it)");
  assert.equal(net.get("/opt/userns/owned-by-3000000000")?.xattrs["user.imgd.binary"], "00ff10fe0a", "a binary user.* xattr");
  assert.ok([...net.values()].some((e) => e.type === "file" && e.path.length > 255), "a path over 255 bytes");
  assert.ok((net.get("/opt/long/link-with-long-target")?.target?.length ?? 0) > 255, "a symlink target over 255 bytes");
  assert.equal(net.get("/opt/fifo")?.type, "fifo");
  assert.equal(net.get("/opt/setgid-dir")?.mode, 0o2775);

  const app = byPath(expectedManifest(chain, "real-app"));
  assert.ok(!app.has("/usr/bin/ping"), "ping was purged");
  assert.equal(app.get("/usr/local/libexec/ping-hardlink")?.linkGroup, null, "its hardlink is alone now");
  assert.equal(app.get("/opt/fifo")?.type, "dir", "a fifo replaced by a directory");
  assert.equal(app.get("/etc/debian_version")?.mtime, "981173106.789012345", "an mtime-only change, to the nanosecond");
});

test("the layers are GNU tar with whiteouts and opaque markers where the build removed things", () => {
  const [base, net, app] = chain.images.get("real-app")!.map((l) => tarMembers(layerPath(chain, l)));
  assert.equal(base![0], "./", "layer 1 starts with the root directory, as debootstrap tarballs do");
  assert.ok(base!.includes("./dev/null"));
  assert.ok(!base!.some((m) => m.includes(".wh.")), "nothing to white out in layer 1");
  assert.ok(net!.length < base!.length / 4, `layer 2 holds only what its step changed (${net!.length} members)`);
  assert.ok(app!.includes("./usr/bin/.wh.ping"), "the purged package is whited out");
  assert.ok(app!.includes("./opt/long/.wh..wh..opq"), "the replaced directory is opaque");
  assert.ok(!app!.some((m) => m.startsWith("./opt/long/directory-name")), "nothing of the old directory is listed");
});

test("GNU tar extraction of the layers in order (whiteouts applied first) gives back every image's real tree", async () => {
  // Images whose layers extend the previous image's are applied on top of it (real-base,
  // real-net, real-app: three layers extracted, not six).
  let root: string | undefined;
  let applied: string[] = [];
  try {
    for (const [image, layers] of chain.images) {
      if (!root || applied.some((l, i) => layers[i] !== l)) {
        if (root) rmSync(root, { recursive: true, force: true });
        root = mkdtempSync(join(tmpdir(), "real-chain-"));
        applied = [];
      }
      for (const layer of layers.slice(applied.length)) referenceApply(layerPath(chain, layer), root);
      applied = layers;
      const differences = diffManifests(expectedManifest(chain, image), await manifestOf(root));
      assert.deepEqual(differences.slice(0, 20), [], `${image}: ${differences.length} differences, the first 20 above`);
    }
    // The comparison sees a lost setuid bit, a missing device node and the mtime its removal
    // gave /dev.
    const [image] = [...chain.images.keys()].slice(-1);
    chmodSync(join(root!, "usr/bin/su"), 0o755);
    rmSync(join(root!, "dev/null"));
    const broken = diffManifests(expectedManifest(chain, image!), await manifestOf(root!));
    assert.equal(broken.length, 3, broken.join("\n"));
    assert.match(broken[0]!, /^\/dev: mtime expected "[0-9]+\.[0-9]{9}", got "[0-9]+\.[0-9]{9}"$/);
    assert.deepEqual(broken.slice(1), ["/dev/null: missing (expected chardev)", "/usr/bin/su: mode expected 04755, got 0755"]);
  } finally {
    if (root) rmSync(root, { recursive: true, force: true });
  }
});

test("the agent's layer validator accepts every layer of the real chain", async () => {
  // Real root filesystems hold device nodes, PAX ids above 2^21 and binary xattrs (issue 8 and
  // the layer contract): the validator must let them through, or no real image can be pulled.
  const layers = new Set([...chain.images.values()].flat());
  for (const layer of layers) {
    const refusal = await validateLayer(createReadStream(layerPath(chain, layer))).then(
      () => null,
      (error: Error & { rule?: string; entry?: string }) => `${error.rule} at ${error.entry}: ${error.message}`,
    );
    assert.equal(refusal, null, `layer ${layer} refused`);
  }
});

// ---- layerChanges on hand-made scans: the rules that decide a layer's members ---------------
const entry = (path: string, type: RealEntry["type"], ino: string, extra: Partial<ScanEntry> = {}): ScanEntry => ({
  path, type, mode: 0o755, uid: 0, gid: 0, size: 0, sha256: null, target: null, rdev: null, mtime: "1.000000000", xattrs: {}, linkGroup: null, ino, ...extra,
});

test("layerChanges: topmost whiteouts only, opaque for a re-made directory, hardlink groups whole, parents along", () => {
  const before = [
    entry("/a", "dir", "1"),
    entry("/a/b", "dir", "2"),
    entry("/a/b/c", "file", "3"),
    entry("/d", "dir", "4"),
    entry("/d/old", "file", "5"),
    entry("/h1", "file", "6", { linkGroup: "/h1" }),
    entry("/keep", "file", "7"),
    entry("/p", "dir", "9"),
    entry("/p/q", "dir", "10"),
    entry("/p/q/f", "file", "11", { sha256: "aa" }),
    entry("/x", "dir", "8", { linkGroup: "/h1" }),
  ];
  const after = [
    entry("/a", "dir", "1", { mtime: "2.000000000" }),
    entry("/d", "dir", "40"),
    entry("/d/new", "file", "41"),
    entry("/h1", "file", "6", { linkGroup: "/h1" }),
    entry("/h2", "file", "6", { linkGroup: "/h1" }),
    entry("/keep", "file", "7"),
    entry("/p", "dir", "9"),
    entry("/p/q", "dir", "10"),
    entry("/p/q/f", "file", "11", { sha256: "bb" }),
  ];
  const changes = layerChanges(before, after);
  assert.deepEqual(changes.entries, ["/a", "/d", "/d/new", "/h1", "/h2", "/p", "/p/q", "/p/q/f"], "a file changed in place brings its unchanged parents");
  assert.deepEqual(changes.whiteouts, ["/.wh.x", "/a/.wh.b", "/d/.wh..wh..opq"]);
});
