// Content-addressed blob store: `<stateDir>/blobs/sha256/<hex>`, downloads staged in
// `<stateDir>/tmp/`. File names come only from digests this store computed (or validated), never
// from S3 key text. A blob appears under its name only complete and fsynced (temp file, fsync,
// rename, fsync of the directory), so a crash leaves at worst a temp file, which init() deletes.
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { lstat, mkdir, open, readdir, rename, rm } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import type { S3Client } from "@aws-sdk/client-s3";
import type { S3Config } from "../s3/config.ts";
import type { LayerObject } from "../s3/image-source.ts";
import { digestHex } from "./digest.ts";
import { fetchLayerInto } from "./layer-download.ts";
import type { DownloadOptions } from "./layer-download.ts";
import type { LayerSummary } from "../layers/validate.ts";

export type { DownloadOptions } from "./layer-download.ts";

const DIR_MODE = 0o750;
const FILE_MODE = 0o640;
const TEMP_NAME = /^blob-[0-9a-f]{32}\.part$/;

export type VerifyResult = "ok" | "missing" | "corrupt";

/** Told how every layer download ends: ok or error, the bytes received (failed tries included), and how long it took. */
export type DownloadObserver = (outcome: "ok" | "error", bytes: number, seconds: number) => void;

export class BlobStore {
  readonly stateDir: string;
  /** `<stateDir>/blobs/sha256`: one file per blob, named by its hex digest. */
  readonly blobDir: string;
  /** `<stateDir>/tmp`: downloads in progress. */
  readonly tmpDir: string;

  private readonly observeDownload: DownloadObserver | undefined;

  constructor(stateDir: string, options: { observeDownload?: DownloadObserver } = {}) {
    this.observeDownload = options.observeDownload;
    if (!isAbsolute(stateDir)) throw new Error(`blob store: state dir must be an absolute path, got ${JSON.stringify(stateDir)}`);
    this.stateDir = stateDir;
    this.blobDir = join(stateDir, "blobs", "sha256");
    this.tmpDir = join(stateDir, "tmp");
  }

  /** Creates the directories and deletes temp files a crash left behind. Call once, before any download. */
  async init(): Promise<void> {
    await mkdir(this.blobDir, { recursive: true, mode: DIR_MODE });
    await mkdir(this.tmpDir, { recursive: true, mode: DIR_MODE });
    for (const dir of [this.stateDir, join(this.stateDir, "blobs"), this.blobDir, this.tmpDir]) {
      const st = await lstat(dir);
      if (!st.isDirectory()) throw new Error(`blob store: ${dir} is not a directory`);
    }
    for (const name of await readdir(this.tmpDir)) {
      if (TEMP_NAME.test(name)) await rm(join(this.tmpDir, name), { force: true });
    }
  }

  /** Path of a blob's file; throws InvalidDigestError unless `digest` is "sha256:<64 hex>". */
  pathFor(digest: string): string {
    return join(this.blobDir, digestHex(digest));
  }

  /** The blob's size if it is stored. */
  async has(digest: string): Promise<{ size: number } | undefined> {
    const path = this.pathFor(digest);
    let st;
    try {
      st = await lstat(path);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    if (!st.isFile()) throw new Error(`blob store: ${path} is not a regular file`);
    return { size: st.size };
  }

  /** Re-reads a stored blob and checks its bytes still hash to its name. */
  async verify(digest: string): Promise<VerifyResult> {
    if (!(await this.has(digest))) return "missing";
    const hash = createHash("sha256");
    try {
      for await (const chunk of createReadStream(this.pathFor(digest))) hash.update(chunk as Buffer);
    } catch (err) {
      if (isNotFound(err)) return "missing";
      throw err;
    }
    return hash.digest("hex") === digestHex(digest) ? "ok" : "corrupt";
  }

  /** Deletes a blob; no error if it is not there. */
  async remove(digest: string): Promise<void> {
    await rm(this.pathFor(digest), { force: true });
    await fsyncDir(this.blobDir);
  }

  /**
   * Downloads a listed layer object into the store and returns its digest. Errors are the
   * S3PermanentError / S3TransientError of ../s3/errors.ts, an AbortError when `signal` fires,
   * or a plain Node error for local I/O (disk full...). The temp file is deleted on any error.
   * `etag` and `size` are those of the version stored: the listed ones unless the object was
   * replaced during the download (see layer-download.ts). With `opts.validate` the layer
   * validator checks the bytes while they are written: its refusal (LayerValidationError) stops
   * the download, deletes the temp file and is thrown as it is; its summary is returned.
   */
  async downloadLayer(client: S3Client, cfg: S3Config, obj: LayerObject, opts: DownloadOptions = {}): Promise<{ digest: string; size: number; etag: string; summary?: LayerSummary }> {
    if (!Number.isSafeInteger(obj.size) || obj.size < 1) throw new TypeError(`blob store: layer ${obj.key} has an invalid size ${obj.size}`);
    const tempPath = join(this.tmpDir, `blob-${randomBytes(16).toString("hex")}.part`);
    let file: FileHandle | undefined = await open(tempPath, "wx+", FILE_MODE); // O_EXCL: never reuse or follow anything; read back to hash
    const began = performance.now();
    // Bytes received over every try: `done` counts from 0 again when the object changed mid-download.
    let received = 0;
    let last = 0;
    const onProgress = (done: number, total: number) => {
      received += done >= last ? done - last : done;
      last = done;
      opts.onProgress?.(done, total);
    };
    try {
      const fetched = await fetchLayerInto(client, cfg, obj, file, { ...opts, onProgress });
      await file.sync();
      await file.close();
      file = undefined;
      const digest = `sha256:${fetched.sha256Hex}`;
      await this.commit(tempPath, digest, fetched.size);
      this.observeDownload?.("ok", received, (performance.now() - began) / 1000);
      return { digest, size: fetched.size, etag: fetched.etag, ...(fetched.summary ? { summary: fetched.summary } : {}) };
    } catch (err) {
      this.observeDownload?.("error", received, (performance.now() - began) / 1000);
      await file?.close().catch(() => {});
      await rm(tempPath, { force: true });
      throw err;
    }
  }

  /** Moves a complete, fsynced temp file to its digest name, unless that blob is already there. */
  private async commit(tempPath: string, digest: string, size: number): Promise<void> {
    const existing = await this.has(digest);
    if (existing?.size === size) {
      await rm(tempPath, { force: true });
      return;
    }
    await rename(tempPath, this.pathFor(digest));
    await fsyncDir(this.blobDir);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function isNotFound(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === "ENOENT";
}
