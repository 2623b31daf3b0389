// End to end on REAL images, inside the VM: every image of the small real chain (Debian bookworm
// by mmdebstrap plus build steps, GNU tar layers with whiteouts: test/fixtures/real-chain) is
// pulled through the agent, activated, mounted read-only here (as root, nodev,nosuid) and its
// tree compared ENTRY FOR ENTRY with the manifest of the real root filesystem it was built from:
// type, content, device numbers, mode, owner, hardlink groups, every xattr, mtime to the ns.
// The chain is built on the host (test/vm/e2e runs build.sh; its images are served next to the
// synthetic ones); IMGD_TEST_REAL_CHAIN_DIR points at another built chain.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { connectImgd, ImageState, RunStatus, type ImgdClient } from "../../client/sdk.ts";
import { expectedManifest, readRealChain, type RealChain } from "../fixtures/real-chain/chain.ts";
import { diffManifests, manifestOf, type RealEntry } from "../fixtures/real-chain/manifest.ts";

const repo = join(import.meta.dirname, "../..");
const chainDir = process.env.IMGD_TEST_REAL_CHAIN_DIR ?? join(repo, ".vm/real/small");

let client: ImgdClient;
let close: () => void;
let chain: RealChain;

before(() => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: npm run test:vm");
  assert.ok(existsSync(join(chainDir, "images.txt")), `no real chain in ${chainDir}: test/fixtures/real-chain/build.sh small (test/vm/e2e does it)`);
  chain = readRealChain(chainDir);
  // Other e2e files share this VM: start from a fresh agent and pool.
  execFileSync("vm-reset", { stdio: "inherit" });
  const c = connectImgd();
  client = c.client;
  close = () => c.channel.close();
});
after(() => close?.());

const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
const MiB = 1048576;

/** Bytes of object bodies the S3 server has sent so far ("GET <key> STATUS BYTES" lines of its request log). */
function s3BytesServed(): number {
  const log = process.env.IMGD_TEST_S3_LOG;
  if (!log || !existsSync(log)) return 0;
  let bytes = 0;
  for (const line of readFileSync(log, "utf8").split("\n")) {
    const [method, key, , size] = line.split(" ");
    if (method === "GET" && key && !key.startsWith("?") && /^[0-9]+$/.test(size ?? "")) bytes += Number(size);
  }
  return bytes;
}

// Sparse files of the recipe (small.recipe's app step): their holes must stay holes.
const SPARSE_FILES = ["var/lib/imgd-sparse/hole-at-end", "var/lib/imgd-sparse/data-at-end"];

/**
 * Mounts the activation read-only (no journal replay, nodev, nosuid), reads its manifest and the
 * blocks its sparse files hold, unmounts.
 */
async function readDevice(device: string): Promise<{ manifest: RealEntry[]; sparse: { path: string; size: number; allocated: number }[] }> {
  const dir = mkdtempSync("/tmp/imgd-real-");
  sh("/usr/bin/mount", "-o", "ro,noload,nodev,nosuid", device, dir);
  try {
    const sparse = SPARSE_FILES.filter((path) => existsSync(join(dir, path))).map((path) => {
      const st = statSync(join(dir, path));
      return { path, size: st.size, allocated: st.blocks * 512 };
    });
    return { manifest: await manifestOf(dir), sparse };
  } finally {
    sh("/usr/bin/umount", dir);
    rmdirSync(dir);
  }
}

for (const image of readRealChainImages()) {
  test(`${image}: pulled and activated, the activation equals the real root filesystem entry for entry`, async () => {
    const started = performance.now();
    const servedBefore = s3BytesServed();
    const poolBefore = (await client.getPool({})).dataUsedBytes;
    let last;
    for await (const update of client.pullImage({ image })) last = update;
    assert.equal(last?.status, RunStatus.SUCCEEDED);
    const pulledMs = performance.now() - started;
    const fetched = s3BytesServed() - servedBefore;
    const poolGrew = Number((await client.getPool({})).dataUsedBytes - poolBefore);
    const { image: info } = await client.getImage({ image });
    assert.equal(info!.state, ImageState.READY);
    assert.equal(info!.layers.length, chain.images.get(image)!.length);
    const { activation } = await client.activateImage({ image });
    const expected = expectedManifest(chain, image);
    const { manifest, sparse } = await readDevice(activation!.devicePath);
    const differences = diffManifests(expected, manifest);
    console.log(
      `${image}: pulled in ${(pulledMs / 1000).toFixed(1)} s, ${(fetched / MiB).toFixed(1)} MiB fetched from S3, ` +
        `pool data +${(poolGrew / MiB).toFixed(1)} MiB, ${expected.length} entries compared, ${differences.length} differences`,
    );
    for (const file of sparse) {
      console.log(`${image}: ${file.path}: ${file.size} bytes, ${file.allocated} allocated`);
      assert.ok(file.allocated <= 64 * 1024, `${image}: ${file.path} lost its holes: ${file.allocated} of ${file.size} bytes allocated`);
    }
    assert.deepEqual(differences.slice(0, 20), [], `${image}: ${differences.length} entries differ from the real tree; the first 20:\n${differences.slice(0, 20).join("\n")}`);
  });
}

/** The image names, read when the file is loaded (node:test needs them to declare the tests). */
function readRealChainImages(): string[] {
  return existsSync(join(chainDir, "images.txt")) ? [...readRealChain(chainDir).images.keys()] : ["real-chain-missing"];
}
