// The layer applier: a short-lived root process started by the helper as
//   unshare --mount --propagation private -- node child.ts --device D --mountpoint M --blob-fd N --digest sha256:X
// The helper opens the blob itself and hands it over as the inherited descriptor N; the child
// never opens a blob by path then. It mounts D at M inside its own mount namespace, chroots into
// M (the kernel's fence around every path the layer names; the applier resolves every path inside
// the image by itself as well, see oci-apply.ts), applies the blob, syncs, leaves the chroot and
// unmounts. Test mode: --root DIR instead of --device/--mountpoint (no mount, still chrooted), and
// only there --blob PATH instead of --blob-fd, and --max-decompressed-bytes N (to test the cap
// without gigabytes; production always uses MAX_DECOMPRESSED_BYTES).
// gzip and zstd blobs are decompressed (decompress.ts, by magic bytes); the digest is always
// checked over the blob's raw bytes, as stored, hashed once while reading.
// Output: one JSON line on stdout, {"ok":true,"entries":N,"bytes":N} or
// {"ok":false,"code":...,"message":...,"entry":...,"rule":...} with a non-zero exit.
//
// Throughput (issue 11): a plain tar is read synchronously in 8 MiB slices, each hashed once on a
// second thread (parallel-hash.ts) while the synchronous tar reader writes file contents straight
// from the same slice.
//
// Everything the child needs is imported statically here, before the chroot: once inside, nothing
// from the host filesystem (node_modules, libc) is reachable any more.
import { createHash } from "node:crypto";
import { closeSync, constants, fstatSync, mkdirSync, openSync, readlinkSync, readSync } from "node:fs";
import { isAbsolute, normalize } from "node:path";
import { chroot, fchdir, killMeWithParent, MNT_DETACH, mount, MS_NODEV, MS_NOSUID, syncfs, umount2 } from "./libc.ts";
import { blobCompression, decompressed, MAX_DECOMPRESSED_BYTES } from "./decompress.ts";
import { LayerApplier, LayerRefused, withEntry } from "./oci-apply.ts";
import { ParallelSha256 } from "./parallel-hash.ts";

/** The blob is read in slices of this size (each hashed on the other thread while it is applied). */
const READ_BYTES = 8 * 1024 * 1024;

type Args = {
  /** test mode only: the blob by path; the helper passes --blob-fd (a descriptor it opened) */
  blob?: string;
  blobFd?: number;
  digest: string;
  root?: string;
  device?: string;
  mountPoint?: string;
  parentPid?: number;
  maxDecompressedBytes: number;
};

class ChildFailure extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

function parseArgs(argv: string[]): Args {
  const values = new Map<string, string>();
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i]!, argv[i + 1]];
    if (!["--blob", "--blob-fd", "--digest", "--root", "--device", "--mountpoint", "--parent-pid", "--max-decompressed-bytes"].includes(flag) || value === undefined || values.has(flag)) {
      throw new ChildFailure("INTERNAL", `bad arguments: ${argv.join(" ")}`);
    }
    values.set(flag, value);
  }
  const path = (flag: string) => {
    const value = values.get(flag);
    if (value !== undefined && (!isAbsolute(value) || normalize(value) !== value || value === "/")) {
      throw new ChildFailure("INTERNAL", `${flag} must be a normalized absolute path other than /`);
    }
    return value;
  };
  const parentPid = values.has("--parent-pid") ? Number(values.get("--parent-pid")) : undefined;
  if (parentPid !== undefined && !(Number.isSafeInteger(parentPid) && parentPid > 1)) throw new ChildFailure("INTERNAL", "bad --parent-pid");
  const maxText = values.get("--max-decompressed-bytes");
  const maxDecompressedBytes = maxText === undefined ? MAX_DECOMPRESSED_BYTES : Number(maxText);
  if (!(Number.isSafeInteger(maxDecompressedBytes) && maxDecompressedBytes > 0)) throw new ChildFailure("INTERNAL", "bad --max-decompressed-bytes");
  const blobFdText = values.get("--blob-fd");
  const blobFd = blobFdText === undefined ? undefined : Number(blobFdText);
  if (blobFd !== undefined && !(/^[0-9]+$/.test(blobFdText!) && blobFd > 2 && blobFd < 65536)) throw new ChildFailure("INTERNAL", "bad --blob-fd");
  const args = { blob: path("--blob"), blobFd, digest: values.get("--digest"), root: path("--root"), device: path("--device"), mountPoint: path("--mountpoint"), parentPid, maxDecompressedBytes };
  const mounted = args.device !== undefined && args.mountPoint !== undefined && args.root === undefined && maxText === undefined;
  const testMode = args.root !== undefined && args.device === undefined && args.mountPoint === undefined;
  // A blob by path only in test mode: in production the helper opens it (safely) and passes the fd.
  const blobOk = (args.blobFd !== undefined) !== (args.blob !== undefined) && (args.blob === undefined || testMode);
  if (!blobOk || !args.digest || !/^sha256:[0-9a-f]{64}$/.test(args.digest) || !(mounted || testMode)) {
    throw new ChildFailure("INTERNAL", `bad arguments: ${argv.join(" ")}`);
  }
  return args as Args;
}

/** The blob the helper opened for us: it must be a regular file (never a FIFO or device). */
function inheritedBlob(fd: number): number {
  let regular: boolean;
  try {
    regular = fstatSync(fd).isFile();
  } catch {
    throw new ChildFailure("BLOB_MISSING", `blob descriptor ${fd} is not open`);
  }
  if (!regular) throw new ChildFailure("BLOB_MISSING", `blob descriptor ${fd} is not a regular file`);
  return fd;
}

/** Test mode only: opens the blob by path, refusing links on the way. */
function openBlob(path: string): number {
  let fd: number;
  try {
    // O_NOFOLLOW: the blob store is writable by the unprivileged agent; never follow a link it
    // planted. O_NONBLOCK: a FIFO planted there must not hang us (it is refused just below).
    fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new ChildFailure("BLOB_MISSING", `blob ${path} does not exist`);
    if (code === "ELOOP") throw new ChildFailure("BLOB_MISSING", `blob ${path} is a symbolic link; refused`);
    throw err;
  }
  if (!fstatSync(fd).isFile()) {
    closeSync(fd);
    throw new ChildFailure("BLOB_MISSING", `blob ${path} is not a regular file`);
  }
  // O_NOFOLLOW guards only the last component; the agent could also have made a DIRECTORY of the
  // path a symlink (say sha256 -> /etc). Ask the kernel where the open file really is: checked on
  // the fd itself, so there is no window between the check and the use.
  const actual = readlinkSync(`/proc/self/fd/${fd}`);
  if (actual !== path) {
    closeSync(fd);
    throw new ChildFailure("BLOB_MISSING", `blob ${path} resolves through a symbolic link to another file; refused`);
  }
  return fd;
}

async function main(): Promise<{ entries: number; bytes: number }> {
  const args = parseArgs(process.argv.slice(2));
  if (args.parentPid !== undefined) {
    // If the helper dies (even by SIGKILL) we must not go on writing to a device it no longer
    // tracks. The ppid check closes the race with a parent that died before the prctl.
    killMeWithParent();
    if (process.ppid !== args.parentPid) throw new ChildFailure("APPLY_FAILED", "the helper exited before the applier started");
  }
  process.umask(0); // modes come from the layer, exactly
  const hash = new ParallelSha256(READ_BYTES); // its thread starts while we mount and read

  void process.stdout; // created lazily by Node: make it exist before the host disappears
  const blobFd = args.blobFd !== undefined ? inheritedBlob(args.blobFd) : openBlob(args.blob!);
  const blobName = args.blob ?? `descriptor ${args.blobFd}`;
  let root = args.root!;
  if (args.device !== undefined) {
    root = args.mountPoint!;
    mkdirSync(root, { recursive: true, mode: 0o700 });
    // Private namespace: this mount is invisible to the host and dies with this process.
    mount(args.device, root, "ext4", MS_NOSUID | MS_NODEV, "noinit_itable");
  }

  const hostRoot = openSync("/", constants.O_RDONLY | constants.O_DIRECTORY);
  let chrooted = false;
  let failed = false;
  try {
    chroot(root);
    chrooted = true;
    process.chdir("/");

    let entries: number;
    let bytes: number;
    try {
      ({ entries, bytes } = await applyBlob(blobFd, hash, args.maxDecompressedBytes));
    } catch (err) {
      // Bytes that are not the requested blob explain any failure better (and are not the
      // layer's fault): check the whole file before blaming its content.
      const actual = hashWholeFile(blobFd);
      if (actual !== args.digest) throw new ChildFailure("BLOB_MISMATCH", `blob ${blobName} hashes to ${actual}, not ${args.digest}`);
      throw err;
    }

    const actual = hash.digest();
    if (actual !== args.digest) {
      throw new ChildFailure("BLOB_MISMATCH", `blob ${blobName} hashes to ${actual}, not ${args.digest}; the device content is invalid`);
    }
    const imageRoot = openSync("/", constants.O_RDONLY | constants.O_DIRECTORY);
    try {
      syncfs(imageRoot);
    } finally {
      closeSync(imageRoot);
    }
    return { entries, bytes };
  } catch (err) {
    failed = true;
    hash.stop();
    throw err;
  } finally {
    try {
      if (chrooted) {
        // Back to the host root (the saved fd still points at it) so the mount point can be named.
        fchdir(hostRoot);
        chroot(".");
        process.chdir("/");
      }
      closeSync(hostRoot);
      closeSync(blobFd);
      if (args.device !== undefined) unmount(args.mountPoint!);
    } catch (cleanupError) {
      // The first error is the one worth reporting; the namespace takes the mount with it anyway.
      if (!failed) throw cleanupError;
    }
  }
}

/** Applies the blob open at `blobFd` to "/" (the image, chrooted), hashing its raw bytes once. */
async function applyBlob(blobFd: number, hash: ParallelSha256, maxDecompressedBytes: number): Promise<{ entries: number; bytes: number }> {
  const rootFd = openSync("/", constants.O_RDONLY | constants.O_DIRECTORY);
  const applier = new LayerApplier(rootFd);
  let bytes = 0;
  /** The next slice of the blob, handed to the hashing thread; empty at the end. */
  const readSlice = (): Buffer => {
    const slot = hash.nextSlot();
    const read = readSync(blobFd, slot, 0, slot.length, bytes);
    if (read > 0) hash.submit(read);
    bytes += read;
    return slot.subarray(0, read);
  };
  try {
    const first = readSlice();
    const compression = blobCompression(first);
    if (compression === "none") {
      // Each slice is applied straight from the shared slot while the other thread hashes it.
      for (let slice = first; slice.length > 0; slice = readSlice()) applier.push(slice);
    } else {
      // The decoder may hold on to its input: it gets copies, never the slots.
      const raw = async function* (): AsyncGenerator<Buffer> {
        for (let slice = first; slice.length > 0; slice = readSlice()) yield Buffer.from(slice);
      };
      for await (const chunk of decompressed(raw(), compression, maxDecompressedBytes)) applier.push(chunk);
    }
    const { entries } = applier.finish();
    return { entries, bytes };
  } catch (err) {
    applier.abort();
    throw withEntry(err, applier.current);
  } finally {
    closeSync(rootFd);
  }
}

function hashWholeFile(fd: number): string {
  const hash = createHash("sha256");
  const buffer = Buffer.alloc(1024 * 1024);
  for (let position = 0; ; ) {
    const read = readSync(fd, buffer, 0, buffer.length, position);
    if (read === 0) return `sha256:${hash.digest("hex")}`;
    hash.update(buffer.subarray(0, read));
    position += read;
  }
}

function unmount(mountPoint: string): void {
  try {
    umount2(mountPoint, 0);
  } catch {
    umount2(mountPoint, MNT_DETACH); // something still holds it: detach now, freed when released
  }
}

function report(line: object): void {
  process.stdout.write(JSON.stringify(line) + "\n");
}

main().then(
  (result) => {
    report({ ok: true, ...result });
  },
  (err: unknown) => {
    const error = err as Error & { code?: string; entry?: string };
    if (err instanceof LayerRefused) {
      report({ ok: false, code: "LAYER_REFUSED", message: err.message, entry: err.entry, rule: err.rule });
    } else if (err instanceof ChildFailure) {
      report({ ok: false, code: err.code, message: err.message });
    } else if (error?.code === "ENOSPC" || error?.code === "EDQUOT") {
      report({ ok: false, code: "NO_SPACE", message: error.message, entry: error.entry });
    } else {
      report({ ok: false, code: "APPLY_FAILED", message: error?.message ?? String(err), entry: error?.entry });
    }
    process.exitCode = 1;
  },
);
