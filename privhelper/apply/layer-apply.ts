// layer.apply, helper side: checks the device is a layer of imgd's being built (ownership.ts),
// opens the blob itself (blob-open.ts: no symlink followed, a file the agent owns), runs the
// applier child in a private mount namespace with a timeout, handing it the open blob as fd 3
// (`--blob-fd 3`: the child reads that descriptor and never opens a blob path), and turns its
// one-line report into a result or error.
import { closeSync } from "node:fs";
import { mkdir, rmdir } from "node:fs/promises";
import { join } from "node:path";
import { openBlob } from "../blob-open.ts";
import { resolveUserId, type HelperConfig } from "../config.ts";
import { HelperFailure, type FailureCode } from "../errors.ts";
import { entryPointPath } from "../entry-points.ts";
import { ownLayerDevice } from "../ownership.ts";
import { poolStatus } from "../pool.ts";
import { PROGRAMS, runFile } from "../run.ts";

const CHILD = entryPointPath("imgd-applier");
export const APPLY_TIMEOUT_MS = 30 * 60_000;
/** The blob's descriptor in the child: the first after stdin, stdout and stderr. */
export const CHILD_BLOB_FD = 3;

type ChildReport =
  | { ok: true; entries: number; bytes: number }
  | { ok: false; code: string; message: string; entry?: string; rule?: string };

const CHILD_CODES = new Set<FailureCode>(["LAYER_REFUSED", "BLOB_MISMATCH", "BLOB_MISSING", "NO_SPACE", "APPLY_FAILED"]);

/** The unshare command line; everything in it is derived from the checked device and digest. */
export function applyCommand(config: HelperConfig, devicePath: string, name: string, digest: string): { args: string[]; mountPoint: string } {
  const mountPoint = join(config.stateDir, "mnt", `apply-${name}`);
  const args = [
    "--mount", "--propagation", "private", "--",
    process.execPath, CHILD,
    "--device", devicePath, "--mountpoint", mountPoint, "--blob-fd", String(CHILD_BLOB_FD), "--digest", digest,
    "--parent-pid", String(process.pid),
  ];
  return { args, mountPoint };
}

export async function applyLayerToDevice(config: HelperConfig, name: string, digest: string): Promise<{ entries: number; bytes: number }> {
  const device = await ownLayerDevice(config, name);
  const blobFd = openBlob(config.blobDir, digest, resolveUserId(config.agentUser));
  let stdout: string;
  let stderr: string;
  const { args, mountPoint } = applyCommand(config, device.path, name, digest);
  try {
    // Mount points only exist inside the applier's private namespace: root's alone (0700).
    await mkdir(join(config.stateDir, "mnt"), { recursive: true, mode: 0o700 });
    const env = await compileCacheEnv(config);
    ({ stdout, stderr } = await runFile(PROGRAMS.unshare, args, { timeoutMs: APPLY_TIMEOUT_MS, allowExitCodes: [1], inheritFds: [blobFd], env }));
  } finally {
    closeSync(blobFd);
    // The mount itself died with the child's namespace; only the empty directory is left.
    await rmdir(mountPoint).catch(() => undefined);
  }
  const report = parseReport(stdout);
  if (!report) throw new HelperFailure("APPLY_FAILED", `layer applier gave no report: ${stderr.trim() || stdout.trim() || "(no output)"}`);
  if (report.ok) return { entries: report.entries, bytes: report.bytes };

  const where = report.entry ? ` (entry ${JSON.stringify(report.entry)}${report.rule ? `, rule ${report.rule}` : ""})` : "";
  const code: FailureCode = CHILD_CODES.has(report.code as FailureCode) ? (report.code as FailureCode) : "APPLY_FAILED";
  if (code === "APPLY_FAILED") {
    // With error_if_no_space a full pool surfaces as I/O errors in ext4: say what really happened.
    const pool = await poolStatus(config).catch(() => null);
    if (pool?.mode === "out_of_data_space") {
      throw new HelperFailure("NO_SPACE", `thin pool ${config.poolName} ran out of data space while applying ${digest}: ${report.message}${where}`);
    }
  }
  throw new HelperFailure(code, `${report.message}${where}`);
}

/**
 * Node's compile cache for the applier (a fresh process per layer): the V8 code of its modules is
 * kept between runs instead of compiled again each time (measured on the host: unpack of a
 * rootfs-like layer 0.52x tar's speed without it, 0.65x with it). Root's alone, in the helper's
 * state directory, never in /tmp where another user could plant it; Node checks each entry
 * against its module's source and recompiles on any mismatch.
 */
async function compileCacheEnv(config: HelperConfig): Promise<Record<string, string>> {
  const dir = join(config.stateDir, "compile-cache");
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return { NODE_COMPILE_CACHE: dir };
}

function parseReport(stdout: string): ChildReport | null {
  const last = stdout.trim().split("\n").at(-1);
  if (!last) return null;
  try {
    const value = JSON.parse(last) as ChildReport;
    return typeof value === "object" && value !== null && typeof value.ok === "boolean" ? value : null;
  } catch {
    return null;
  }
}
