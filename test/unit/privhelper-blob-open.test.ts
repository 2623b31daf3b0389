// The helper opens layer blobs itself (privhelper/blob-open.ts, issue 9 finding 1): no symlink is
// followed anywhere on the path, and only a regular single-link file owned by the agent's uid is
// read. Then the applier child reads that descriptor (`--blob-fd 3`) and opens no blob path.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chownSync, closeSync, linkSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import tar from "tar-stream";
import { openBlob } from "../../privhelper/blob-open.ts";
import { HelperFailure } from "../../privhelper/errors.ts";

const isRoot = process.getuid?.() === 0;
const opts = { skip: isRoot ? false : "needs root (chown)" };
const AGENT_UID = 12345;
const CHILD = fileURLToPath(new URL("../../privhelper/apply/child.ts", import.meta.url));

function sandbox(t: { after(fn: () => void): void }) {
  const base = mkdtempSync(join(tmpdir(), "imgd-blob-open-"));
  t.after(() => rmSync(base, { recursive: true, force: true }));
  const blobDir = join(base, "state", "blobs");
  mkdirSync(join(blobDir, "sha256"), { recursive: true });
  // A root-only store beside it, as a containerd or buildkit content store would be.
  const secret = join(base, "secret");
  mkdirSync(join(secret, "sha256"), { recursive: true, mode: 0o700 });
  const put = (dir: string, content: string, uid = AGENT_UID) => {
    const hex = createHash("sha256").update(content).digest("hex");
    writeFileSync(join(dir, "sha256", hex), content);
    chownSync(join(dir, "sha256", hex), uid, uid);
    return `sha256:${hex}`;
  };
  return { base, blobDir, secret, put };
}

function refused(fn: () => unknown, code: string, message: RegExp): void {
  assert.throws(fn, (err: unknown) => err instanceof HelperFailure && err.code === code && message.test(err.message));
}

test("an agent-owned regular file is opened and read through its descriptor", opts, (t) => {
  const box = sandbox(t);
  const digest = box.put(box.blobDir, "layer bytes");
  const fd = openBlob(box.blobDir, digest, AGENT_UID);
  try {
    assert.equal(readFileSync(fd, "utf8"), "layer bytes");
  } finally {
    closeSync(fd);
  }
});

test("symlinks anywhere on the path are refused: blobs/, blobs/sha256/, the blob, an ancestor", opts, (t) => {
  const box = sandbox(t);
  const digest = box.put(box.secret, "root's secret", 0);
  const hex = digest.slice(7);
  // blobs -> the root-only store
  rmSync(box.blobDir, { recursive: true });
  symlinkSync(box.secret, box.blobDir);
  refused(() => openBlob(box.blobDir, digest, AGENT_UID), "BLOB_REFUSED", /blobs is a symbolic link/);
  // blobs/sha256 -> the store's sha256
  rmSync(box.blobDir);
  mkdirSync(box.blobDir);
  symlinkSync(join(box.secret, "sha256"), join(box.blobDir, "sha256"));
  refused(() => openBlob(box.blobDir, digest, AGENT_UID), "BLOB_REFUSED", /sha256 is a symbolic link/);
  // blobs/sha256/<hex> -> the secret file
  rmSync(join(box.blobDir, "sha256"));
  mkdirSync(join(box.blobDir, "sha256"));
  symlinkSync(join(box.secret, "sha256", hex), join(box.blobDir, "sha256", hex));
  refused(() => openBlob(box.blobDir, digest, AGENT_UID), "BLOB_REFUSED", /is a symbolic link/);
  // a configured path through a symlink (root must configure the real path)
  symlinkSync(join(box.base, "state"), join(box.base, "state-link"));
  refused(() => openBlob(join(box.base, "state-link", "blobs"), digest, AGENT_UID), "BLOB_REFUSED", /state-link is a symbolic link/);
});

test("only a regular, single-link file owned by the agent: root's file, a hard link, a FIFO, a directory are refused", opts, (t) => {
  const box = sandbox(t);
  const rootOwned = box.put(box.blobDir, "placed by root", 0);
  refused(() => openBlob(box.blobDir, rootOwned, AGENT_UID), "BLOB_REFUSED", /owned by uid 0, not the agent's uid 12345/);
  const linked = box.put(box.blobDir, "two names");
  linkSync(join(box.blobDir, "sha256", linked.slice(7)), join(box.base, "other-name"));
  refused(() => openBlob(box.blobDir, linked, AGENT_UID), "BLOB_REFUSED", /has 2 links/);
  const fifo = `sha256:${"f".repeat(64)}`;
  spawnSyncOk("/usr/bin/mkfifo", [join(box.blobDir, "sha256", "f".repeat(64))]);
  chownSync(join(box.blobDir, "sha256", "f".repeat(64)), AGENT_UID, AGENT_UID);
  refused(() => openBlob(box.blobDir, fifo, AGENT_UID), "BLOB_REFUSED", /not a regular file/); // and did not hang
  mkdirSync(join(box.blobDir, "sha256", "d".repeat(64)));
  chownSync(join(box.blobDir, "sha256", "d".repeat(64)), AGENT_UID, AGENT_UID);
  refused(() => openBlob(box.blobDir, `sha256:${"d".repeat(64)}`, AGENT_UID), "BLOB_REFUSED", /not a regular file/);
  refused(() => openBlob(box.blobDir, `sha256:${"0".repeat(64)}`, AGENT_UID), "BLOB_MISSING", /is not in/);
});

test("the applier child reads the blob from --blob-fd 3 and opens no blob path", opts, async (t) => {
  const box = sandbox(t);
  const pack = tar.pack();
  pack.entry({ name: "hello", mode: 0o644 }, "from the descriptor");
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const chunk of pack) chunks.push(chunk as Buffer);
  const bytes = Buffer.concat(chunks);
  const hex = createHash("sha256").update(bytes).digest("hex");
  writeFileSync(join(box.blobDir, "sha256", hex), bytes);
  chownSync(join(box.blobDir, "sha256", hex), AGENT_UID, AGENT_UID);
  const fd = openBlob(box.blobDir, `sha256:${hex}`, AGENT_UID);
  // Removed from the store before the child runs: only the descriptor can still reach it.
  rmSync(join(box.blobDir, "sha256", hex));
  const root = join(box.base, "root");
  mkdirSync(root);
  const report = await new Promise<string>((resolve) => {
    const child = spawn(process.execPath, [CHILD, "--root", root, "--blob-fd", "3", "--digest", `sha256:${hex}`], { stdio: ["ignore", "pipe", "pipe", fd] });
    let out = "";
    child.stdout!.on("data", (c: Buffer) => (out += c.toString()));
    child.once("exit", () => resolve(out.trim()));
  });
  closeSync(fd);
  assert.deepEqual(JSON.parse(report), { ok: true, entries: 1, bytes: bytes.byteLength });
  assert.equal(readFileSync(join(root, "hello"), "utf8"), "from the descriptor");
  assert.deepEqual(readdirSync(join(box.blobDir, "sha256")), []);
});

function spawnSyncOk(file: string, args: string[]): void {
  const { status } = spawnSync(file, args);
  assert.equal(status, 0);
}
