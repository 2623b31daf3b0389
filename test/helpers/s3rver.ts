// Test S3: a real s3rver (child process) on a random loopback port with its own temp directory,
// seeded through PutObject, or for many bytes straight into its store from a directory
// (seedFrom, test/fixtures/s3rver-store.ts). The fault-injecting proxy is in fault-proxy.ts.
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { DeleteObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { createRequire } from "node:module";
import { guardSeededObjects, seedS3rverStore } from "../fixtures/s3rver-store.ts";

// s3rver ships no type declarations; this is the part of its API we use.
interface S3rverServer {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
  store: Parameters<typeof guardSeededObjects>[0];
}
type S3rverConstructor = new (options: {
  address: string;
  port: number;
  directory: string;
  silent: boolean;
  configureBuckets: Array<{ name: string }>;
}) => S3rverServer;
const S3rver = createRequire(import.meta.url)("s3rver") as S3rverConstructor;

export interface TestS3 {
  endpoint: string;
  bucket: string;
  /** Stores an object; returns its quoted-MD5 ETag. */
  put(key: string, body: Buffer | string): Promise<string>;
  /** Stores many objects, a few at a time. */
  putMany(objects: Array<[key: string, body: Buffer | string]>): Promise<void>;
  remove(key: string): Promise<void>;
  close(): Promise<void>;
}

// s3rver's built-in account; the seeding client signs with it.
const S3RVER_KEY = { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" };

/** `seedFrom`: a directory whose files become the bucket's objects (key = relative path) before the server starts. */
export async function startS3rver(bucket = "imgd-test", options: { seedFrom?: string } = {}): Promise<TestS3> {
  const directory = await mkdtemp(join(tmpdir(), "imgd-s3rver-"));
  if (options.seedFrom) await seedS3rverStore(directory, bucket, options.seedFrom);
  // s3rver encrypts its continuation tokens with single DES, which Node 24's OpenSSL 3 only
  // offers through the legacy provider: without it every second page of a listing is a 500.
  // So s3rver runs in a child process (this file is its entry point) with that provider on.
  const child = spawn(process.execPath, ["--openssl-legacy-provider", fileURLToPath(import.meta.url), directory, bucket], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let port: number;
  try {
    port = await readPort(child);
  } catch (err) {
    child.kill("SIGKILL");
    await exited;
    await rm(directory, { recursive: true, force: true });
    throw err;
  }
  const endpoint = `http://127.0.0.1:${port}`;
  const seeder = new S3Client({
    endpoint,
    forcePathStyle: true,
    region: "us-east-1",
    credentials: S3RVER_KEY,
    // s3rver would store aws-chunked checksum framing as part of the object.
    requestChecksumCalculation: "WHEN_REQUIRED",
  });
  const put = async (key: string, body: Buffer | string) => {
    const out = await seeder.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body }));
    return out.ETag!;
  };
  return {
    endpoint,
    bucket,
    put,
    async putMany(objects) {
      const queue = [...objects];
      const worker = async () => {
        for (let next = queue.shift(); next; next = queue.shift()) await put(...next);
      };
      await Promise.all(Array.from({ length: 16 }, worker));
    },
    async remove(key) {
      await seeder.send(new DeleteObjectCommand({ Bucket: bucket, Key: key }));
    },
    async close() {
      seeder.destroy();
      child.kill("SIGTERM");
      await exited;
      await rm(directory, { recursive: true, force: true });
    },
  };
}

/** The child announces its port as one JSON line on stdout. */
function readPort(child: ChildProcess): Promise<number> {
  return new Promise((resolve, reject) => {
    let text = "";
    const timer = setTimeout(() => reject(new Error("s3rver did not start within 10 s")), 10_000);
    child.once("exit", (code) => reject(new Error(`s3rver exited with ${code} before it was ready`)));
    child.stdout!.on("data", (chunk: Buffer) => {
      text += chunk.toString("utf8");
      const newline = text.indexOf("\n");
      if (newline < 0) return;
      clearTimeout(timer);
      const { port } = JSON.parse(text.slice(0, newline)) as { port: number };
      resolve(port);
    });
  });
}

// Child process entry: serve until the parent closes our stdin (or dies) or sends SIGTERM.
if (import.meta.main) {
  const [directory, bucket] = process.argv.slice(2);
  const server = new S3rver({ address: "127.0.0.1", port: 0, directory, silent: true, configureBuckets: [{ name: bucket }] });
  guardSeededObjects(server.store);
  const address = await server.run();
  process.stdout.write(`${JSON.stringify({ port: address.port })}\n`);
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
  process.on("SIGTERM", () => process.exit(0));
}

// The tampering proxy lives in fault-proxy.ts; these names stay for the tests that use them.
export { startFaultProxy as startTamperProxy, isObjectGet } from "./fault-proxy.ts";
export type { RecordedRequest, Tamper, TamperProxy } from "./fault-proxy.ts";
