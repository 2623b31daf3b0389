// Machinery for the crash tests in the VM (test/e2e/crash.test.ts): starting and killing the
// agent and the helper (the same start lines as vm-agent / vm-helper, without their extra node
// start-up for readiness), small test images uploaded to the guest's S3 server, and the
// invariants that must hold once every run has ended.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { createConnection } from "node:net";
import { join } from "node:path";
import BetterSqlite3 from "better-sqlite3";
import { PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { FindingKind, RunKind, connectImgd, RunStatus, type ImgdClient } from "../../client/sdk.ts";
import { buildTar } from "../fixtures/tar-build.ts";
import { imageManifest, type LayerEntry } from "../fixtures/layer-model.ts";
import { pseudoRandomBytes } from "../fixtures/prng.ts";
import { diffManifests, walkTree, type ManifestEntry } from "../fixtures/tree.ts";

const repo = join(import.meta.dirname, "../..");
const servicesLib = join(repo, "test/vm/lib/services.sh");
const PID_DIR = "/run/imgd-vm-pids";
const AGENT_ADDR = process.env.IMGD_ADDR ?? "unix:/run/imgd/agent/imgd.sock"; // as test/vm/lib/services.sh
const HELPER_SOCKET = process.env.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock";
export const STATE_DIR = "/var/lib/imgd";
export const HELPER_STATE_DIR = "/var/lib/imgd-privhelper";
/** The same budget as services.sh (IMGD_VM_READY_TIMEOUT seconds, 180 by default). */
const READY_TIMEOUT_MS = Number(process.env.IMGD_VM_READY_TIMEOUT ?? 180) * 1000;

export type Service = "agent" | "helper";

export const sh = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8" });
export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---- services ----------------------------------------------------------------------------------

export function pidOf(service: Service): number | undefined {
  try {
    const pid = Number(readFileSync(join(PID_DIR, `${service}.pid`), "utf8").trim());
    return Number.isInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** A zombie counts as dead (as in services.sh). */
export function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

// Each service reads its kill point from its own file (IMGD_TEST_CRASH_AT=@file), so a test arms
// a running process without restarting it.
const ARM_DIR = "/run/imgd-crash";
const armFile = (service: Service) => join(ARM_DIR, service);

/** Sets (or with "" clears) the kill point of a running service. */
export function arm(service: Service, point: string): void {
  mkdirSync(ARM_DIR, { recursive: true, mode: 0o755 });
  writeFileSync(armFile(service), point, { mode: 0o644 });
}

export function disarmAll(): void {
  arm("agent", "");
  arm("helper", "");
}

/** Starts the service (its start line in services.sh), reading its kill point from its file; does not wait. */
export async function launch(service: Service): Promise<number> {
  const child = spawn("bash", ["-c", 'source "$1" && vm_service_launch "$2"', "launch", servicesLib, service], {
    env: { ...process.env, IMGD_TEST_CRASH_AT: `@${armFile(service)}` },
    stdio: "inherit",
  });
  const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
  if (code !== 0) throw new Error(`launching ${service} failed (exit ${code})`);
  return pidOf(service)!;
}

/** Waits until the service accepts connections, or its process died (returns false). */
export async function waitReady(service: Service, pid: number): Promise<boolean> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (!alive(pid)) return false;
    if (await accepts(service)) return true;
    await sleep(100);
  }
  throw new Error(`${service} (pid ${pid}) not ready after ${READY_TIMEOUT_MS} ms; the end of its log:\n${logTail(service)}`);
}

/** The last lines of a service's log, for error messages. */
export function logTail(service: Service, lines = 40): string {
  try {
    return readFileSync(`/tmp/imgd-vm-logs/${service}.log`, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch (err) {
    return `(no log: ${(err as Error).message})`;
  }
}

/** IMGD_ADDR as the agent takes it: HOST:PORT, or unix:PATH. */
function connectOptions(addr: string): { path: string } | { host: string; port: number } {
  if (addr.startsWith("unix:")) return { path: addr.slice("unix:".length) };
  if (addr.startsWith("/")) return { path: addr };
  const colon = addr.lastIndexOf(":");
  return { host: addr.slice(0, colon), port: Number(addr.slice(colon + 1)) };
}

function accepts(service: Service): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = service === "agent" ? createConnection(connectOptions(AGENT_ADDR)) : createConnection(HELPER_SOCKET);
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

export async function start(service: Service): Promise<void> {
  const pid = await launch(service);
  if (!(await waitReady(service, pid))) throw new Error(`${service} died while starting; the end of its log:\n${logTail(service)}`);
}

export async function kill9(service: Service): Promise<void> {
  const pid = pidOf(service);
  if (!alive(pid)) return;
  process.kill(pid!, "SIGKILL");
  await waitDead(pid!, 10_000);
}

/** Waits for the process to die; false if it is still alive after timeoutMs. */
export async function waitDead(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

export async function stop(service: Service): Promise<void> {
  const pid = pidOf(service);
  if (!alive(pid)) return;
  process.kill(pid!, "SIGTERM");
  if (!(await waitDead(pid!, 30_000))) await kill9(service);
}

/** Restarts whichever of the two is not running, the helper first (in parallel). */
export async function startMissing(options: { mayDie?: boolean } = {}): Promise<void> {
  const helper = alive(pidOf("helper")) ? undefined : await launch("helper");
  const agent = alive(pidOf("agent")) ? undefined : await launch("agent");
  if (helper !== undefined && !(await waitReady("helper", helper)) && !options.mayDie) throw new Error(`helper died while starting; the end of its log:\n${logTail("helper")}`);
  if (agent !== undefined && !(await waitReady("agent", agent)) && !options.mayDie) throw new Error(`agent died while starting; the end of its log:\n${logTail("agent")}`);
}

/** The agent's log since `from` (a byte offset), to find the kill point's own line. */
export function logSince(service: Service, from: number): string {
  const path = `/tmp/imgd-vm-logs/${service}.log`;
  const all = readFileSync(path);
  return all.subarray(from).toString("utf8");
}

export function logSize(service: Service): number {
  try {
    return readFileSync(`/tmp/imgd-vm-logs/${service}.log`).length;
  } catch {
    return 0;
  }
}

// ---- gRPC ----------------------------------------------------------------------------------------

/** A client that reconnects on demand: call reconnect() after the agent restarted. */
export class Agent {
  #conn = connectImgd();
  get client(): ImgdClient {
    return this.#conn.client;
  }
  reconnect(): void {
    this.#conn.channel.close();
    this.#conn = connectImgd();
  }
  close(): void {
    this.#conn.channel.close();
  }

  /** Waits until the newest run of `fsm` (for `resourceId` if given) is no longer running. */
  async waitRunEnd(fsm: string, resourceId = "", timeoutMs = 180_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const { runs } = await this.client.listRuns({ fsm: RunKind[fsm.toUpperCase() as keyof typeof RunKind], resourceId, pageSize: 1 });
        if (runs[0] && runs[0].status !== RunStatus.RUNNING) return runs[0];
      } catch (err) {
        if (Date.now() > deadline) throw err;
      }
      if (Date.now() > deadline) throw new Error(`${fsm} run ${resourceId} still running after ${timeoutMs} ms`);
      await sleep(250);
    }
  }

  /** Waits until no run of any FSM is running. */
  async waitAllRunsEnd(timeoutMs = 300_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const { runs } = await this.client.listRuns({ pageSize: 1000 });
      const running = runs.filter((r) => r.status === RunStatus.RUNNING);
      if (running.length === 0) return;
      if (Date.now() > deadline) throw new Error(`runs still running after ${timeoutMs} ms: ${running.map((r) => `${RunKind[r.fsm]}/${r.resourceId}@${r.state}`).join(", ")}`);
      await sleep(300);
    }
  }
}

// ---- test images -----------------------------------------------------------------------------

export interface TestImage {
  name: string;
  layers: LayerEntry[][];
  expected: ManifestEntry[];
}

const T0 = 1_700_000_000;

/** Layer 1: a base (shared by name `base`), layer 2: the image's own files and a whiteout. */
export function baseLayer(label: string, files = 12): LayerEntry[] {
  const entries: LayerEntry[] = [{ name: "base/", type: "directory", mode: 0o755, uid: 0, gid: 0, mtime: T0 }];
  for (let i = 0; i < files; i++) {
    entries.push({ name: `base/f${i}`, type: "file", mode: 0o644, uid: 0, gid: 0, mtime: T0 - i * 60, content: pseudoRandomBytes(`${label}:base:${i}`, 8192 + i * 1024) });
  }
  entries.push({ name: "base/link", type: "symlink", mode: 0o777, uid: 0, gid: 0, mtime: T0, linkname: "f0" });
  return entries;
}

export function topLayer(label: string, files = 8): LayerEntry[] {
  const entries: LayerEntry[] = [
    { name: "base/", type: "directory", mode: 0o755, uid: 0, gid: 0, mtime: T0 + 100 },
    { name: "base/.wh.f1", type: "file", mode: 0o644, uid: 0, gid: 0, mtime: T0 + 100, content: Buffer.alloc(0) },
    { name: `${label}/`, type: "directory", mode: 0o750, uid: 1000, gid: 1000, mtime: T0 + 100 },
  ];
  for (let i = 0; i < files; i++) {
    // The first file is large enough for the download to take several chunks.
    const size = i === 0 ? 256 * 1024 : 4096 + i * 512;
    entries.push({ name: `${label}/g${i}`, type: "file", mode: 0o640, uid: 1000, gid: 1000, mtime: T0 + 50, content: pseudoRandomBytes(`${label}:top:${i}`, size) });
  }
  return entries;
}

export function testImage(name: string, base: LayerEntry[], top = topLayer(name)): TestImage {
  return { name, layers: [base, top], expected: imageManifest([base, top]) };
}

/** Uploads the image's layers as images/<name>/<n>.tar to the guest's S3 server. */
export async function uploadImages(images: TestImage[]): Promise<void> {
  const s3 = new S3Client({
    endpoint: process.env.IMGD_S3_ENDPOINT,
    forcePathStyle: true,
    region: "us-east-1",
    credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
    requestChecksumCalculation: "WHEN_REQUIRED",
  });
  const bucket = process.env.IMGD_S3_BUCKET!;
  try {
    for (const image of images) {
      for (const [i, layer] of image.layers.entries()) {
        await s3.send(new PutObjectCommand({ Bucket: bucket, Key: `images/${image.name}/${i + 1}.tar`, Body: await buildTar(layer) }));
      }
    }
  } finally {
    s3.destroy();
  }
}

/** Mounts a device read-only (no journal replay, nosuid, nodev) and compares its tree. */
export async function treeProblems(devicePath: string, expected: ManifestEntry[]): Promise<string[]> {
  const dir = mkdtempSync("/tmp/imgd-crash-");
  sh("/usr/bin/mount", "-o", "ro,noload,nosuid,nodev", devicePath, dir);
  try {
    return diffManifests(expected, await walkTree(dir));
  } finally {
    sh("/usr/bin/umount", dir);
    rmdirSync(dir);
  }
}

// ---- invariants --------------------------------------------------------------------------------

/**
 * Why a run failed: "interruption" when the kill itself is the reason (the pre-issue-10 engine's
 * "agent stopped while this attempt was running", a poison verdict, a lost or unreachable
 * helper), otherwise the step's own error.
 */
export function failureReason(error: string): "interruption" | "step error" {
  const interruption = [
    /agent stopped while/i,
    /interrupted \d+ times within/i,
    /poison step/i,
    /CONNECTION_LOST|connection closed by the helper|connection dropped/i,
    /UNAVAILABLE|cannot connect to the helper/i,
    /shutting down|shut down/i,
  ];
  return interruption.some((re) => re.test(error)) ? "interruption" : "step error";
}

/** Loop devices attached now (device and backing file). */
export function loopDevices(): string[] {
  return sh("/usr/sbin/losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").split("\n").map((l) => l.trim().replace(/\s+/g, " ")).filter(Boolean).sort();
}

/** Thin ids in the pool, read directly from a metadata snapshot with thin_ls (not via the helper). */
export function poolThinIds(): number[] {
  const meta = sh("/usr/sbin/dmsetup", "table", "imgd-pool").split(" ")[3]!;
  const metaDev = "/dev/" + /^DEVNAME=(.*)$/m.exec(readFileSync(`/sys/dev/block/${meta}/uevent`, "utf8"))![1];
  sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "reserve_metadata_snap");
  try {
    return sh("/usr/sbin/thin_ls", "--metadata-snap", "--no-headers", "-o", "DEV", metaDev).split("\n").map((l) => l.trim()).filter(Boolean).map(Number).sort((a, b) => a - b);
  } finally {
    sh("/usr/sbin/dmsetup", "message", "imgd-pool", "0", "release_metadata_snap");
  }
}

interface CatalogSnapshot {
  devices: { chain_id: string; thin_id: number; parent_chain_id: string | null; name: string; state: string }[];
  activations: { id: string; thin_id: number; name: string; state: string; image: string }[];
  images: { name: string; state: string; chain_id: string | null; error: string | null }[];
  thinIds: number[];
}

/**
 * The catalog, read straight from SQLite as the agent's user (files SQLite might create, like the
 * WAL index, must stay the agent's), read-only, while the agent runs.
 */
export function readCatalog(): CatalogSnapshot {
  const uid = Number(sh("id", "-u", "imgd").trim());
  const gid = Number(sh("id", "-g", "imgd").trim());
  process.setegid!(gid);
  process.seteuid!(uid);
  try {
    const db = new BetterSqlite3(join(STATE_DIR, "imgd.db"), { readonly: true, fileMustExist: true });
    try {
      return {
        devices: db.prepare("SELECT chain_id, thin_id, parent_chain_id, name, state FROM devices ORDER BY thin_id").all() as CatalogSnapshot["devices"],
        activations: db.prepare("SELECT id, thin_id, name, state, image FROM activations ORDER BY thin_id").all() as CatalogSnapshot["activations"],
        images: db.prepare("SELECT name, state, chain_id, error FROM images ORDER BY name").all() as CatalogSnapshot["images"],
        thinIds: (db.prepare("SELECT thin_id FROM thin_ids ORDER BY thin_id").all() as { thin_id: number }[]).map((r) => r.thin_id),
      };
    } finally {
      db.close();
    }
  } finally {
    process.seteuid!(0);
    process.setegid!(0);
  }
}

/**
 * Every invariant of issue 4 that must hold once no run is running; returns the violations (empty
 * when all hold). `loopsAtStart`: the loop devices right after vm-reset (the pool's two).
 */
export async function invariantProblems(agent: Agent, loopsAtStart: string[]): Promise<string[]> {
  const problems: string[] = [];
  const doctor = await agent.client.doctor({});
  for (const f of doctor.findings) problems.push(`doctor: ${FindingKind[f.kind]} ${f.subject}: ${f.detail}`);
  if (!doctor.clean && doctor.findings.length === 0) problems.push("doctor: not clean without findings");

  const catalog = readCatalog();
  const pool = new Set(poolThinIds());
  const known = new Map<number, string>();
  for (const d of catalog.devices) known.set(d.thin_id, `device ${d.name}`);
  for (const a of catalog.activations) known.set(a.thin_id, `activation ${a.id}`);
  for (const [thinId, what] of known) if (!pool.has(thinId)) problems.push(`${what} (thin id ${thinId}) is in SQLite but not in the pool`);
  for (const thinId of pool) if (!known.has(thinId)) problems.push(`thin id ${thinId} is in the pool but SQLite has no device or activation for it`);
  const allocated = new Set(catalog.thinIds);
  for (const thinId of known.keys()) if (!allocated.has(thinId)) problems.push(`thin id ${thinId} is used but not in thin_ids`);
  for (const thinId of allocated) if (!known.has(thinId)) problems.push(`thin id ${thinId} is allocated in thin_ids but owned by nothing`);
  for (const d of catalog.devices) if (d.state !== "ready") problems.push(`device ${d.name} is still ${d.state} with no run working on it`);
  for (const a of catalog.activations) if (a.state !== "active") problems.push(`activation ${a.id} is still ${a.state} with no run working on it`);
  for (const i of catalog.images) if (i.state === "pulling") problems.push(`image ${i.name} is still pulling with no run working on it`);
  const deviceChains = new Set(catalog.devices.map((d) => d.chain_id));
  for (const d of catalog.devices) if (d.parent_chain_id !== null && !deviceChains.has(d.parent_chain_id)) problems.push(`device ${d.name}: its parent ${d.parent_chain_id} has no row`);
  for (const i of catalog.images) if (i.state === "ready" && (!i.chain_id || !deviceChains.has(i.chain_id))) problems.push(`image ${i.name} is ready but its device ${i.chain_id} has no row`);

  const wantTables = new Set(["imgd-pool", ...catalog.activations.map((a) => a.name)]);
  const tables = sh("/usr/sbin/dmsetup", "ls").split("\n").map((l) => l.split(/\s/)[0]!).filter((n) => n.startsWith("imgd-"));
  for (const name of tables) if (!wantTables.has(name)) problems.push(`stray dm table ${name}`);
  for (const name of wantTables) if (!tables.includes(name)) problems.push(`dm table ${name} is missing`);

  const mounts = readFileSync("/proc/self/mounts", "utf8").split("\n").map((l) => l.split(" ")[1] ?? "");
  for (const m of mounts) if (m.startsWith(`${STATE_DIR}/`) || m.startsWith(`${HELPER_STATE_DIR}/`)) problems.push(`stray mount ${m}`);

  const loops = loopDevices();
  if (loops.join("\n") !== loopsAtStart.join("\n")) problems.push(`loop devices changed: ${loops.join(", ")} (at start: ${loopsAtStart.join(", ")})`);

  const tmp = join(STATE_DIR, "tmp");
  for (const name of existsSync(tmp) ? readdirSync(tmp) : []) problems.push(`temp file ${tmp}/${name}`);
  const mnt = join(HELPER_STATE_DIR, "mnt");
  for (const name of existsSync(mnt) ? readdirSync(mnt) : []) problems.push(`left-over mount point ${mnt}/${name}`);
  return problems;
}
