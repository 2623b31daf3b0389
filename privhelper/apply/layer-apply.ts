// layer.apply, helper side: builds the applier child's arguments from validated names, runs it in
// a private mount namespace with a timeout, and turns its one-line report into a result or error.
import { realpathSync } from "node:fs";
import { mkdir, rmdir } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { HelperConfig } from "../config.ts";
import { HelperFailure, type FailureCode } from "../errors.ts";
import { devicePath, requireBlockDevice } from "../fs.ts";
import { poolStatus } from "../pool.ts";
import { PROGRAMS, runFile } from "../run.ts";

const CHILD = fileURLToPath(new URL("./child.ts", import.meta.url));
export const APPLY_TIMEOUT_MS = 30 * 60_000;

type ChildReport =
  | { ok: true; entries: number; bytes: number }
  | { ok: false; code: string; message: string; entry?: string; rule?: string };

const CHILD_CODES = new Set<FailureCode>(["LAYER_REFUSED", "BLOB_MISMATCH", "BLOB_MISSING", "NO_SPACE", "APPLY_FAILED"]);

/**
 * The configured blob directory is root's choice and may be reached through symlinks: resolve it.
 * What lies below it belongs to the agent and may not redirect (the applier checks the open fd).
 */
function trustedBlobDir(config: HelperConfig): string {
  try {
    return realpathSync(config.blobDir);
  } catch {
    throw new HelperFailure("BLOB_MISSING", `blob directory ${config.blobDir} does not exist`);
  }
}

/** The unshare command line; everything in it is derived from the validated name and digest. */
export function applyCommand(config: HelperConfig, name: string, digest: string): { args: string[]; mountPoint: string } {
  const mountPoint = join(config.stateDir, "mnt", `apply-${name}`);
  const blob = join(trustedBlobDir(config), "sha256", digest.slice("sha256:".length));
  const args = [
    "--mount", "--propagation", "private", "--",
    process.execPath, CHILD,
    "--device", devicePath(name), "--mountpoint", mountPoint, "--blob", blob, "--digest", digest,
    "--parent-pid", String(process.pid),
  ];
  return { args, mountPoint };
}

export async function applyLayerToDevice(config: HelperConfig, name: string, digest: string): Promise<{ entries: number; bytes: number }> {
  await requireBlockDevice(name);
  const { args, mountPoint } = applyCommand(config, name, digest);
  await mkdir(join(config.stateDir, "mnt"), { recursive: true, mode: 0o755 });
  let stdout: string;
  let stderr: string;
  try {
    ({ stdout, stderr } = await runFile(PROGRAMS.unshare, args, { timeoutMs: APPLY_TIMEOUT_MS, allowExitCodes: [1] }));
  } finally {
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
