// The only place where the helper starts programs. Programs are named by absolute path and get
// an argument array (never a shell), a minimal environment, no stdin, and a timeout.
import { execa } from "execa";
import { crashPointEnv } from "./crash-points.ts";
import { HelperFailure } from "./errors.ts";

// Debian 12 locations (merged /usr); the same userland runs in the test VM.
export const PROGRAMS = {
  dmsetup: "/usr/sbin/dmsetup",
  losetup: "/usr/sbin/losetup",
  blkid: "/usr/sbin/blkid",
  mkfsExt4: "/usr/sbin/mkfs.ext4",
  fallocate: "/usr/bin/fallocate",
  mount: "/usr/bin/mount",
  umount: "/usr/bin/umount",
  unshare: "/usr/bin/unshare",
  thinLs: "/usr/sbin/thin_ls",
} as const;

export type Program = keyof typeof PROGRAMS;

export type RunResult = { exitCode: number; stdout: string; stderr: string };

export type RunOptions = {
  timeoutMs?: number;
  /** open descriptors the program inherits as fd 3, 4, ... (the layer applier's blob) */
  inheritFds?: number[];
  /** exit codes that are returned instead of thrown (0 is always accepted) */
  allowExitCodes?: number[];
  /** variables added to the minimal environment (the layer applier's compile cache) */
  env?: Record<string, string>;
};

// Aborted on shutdown so that no child outlives the helper.
const shutdown = new AbortController();
export function abortAllRuns(): void {
  shutdown.abort();
}

const ENV = { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", LC_ALL: "C" };

export async function run(program: Program, args: string[], options: RunOptions = {}): Promise<RunResult> {
  return runFile(PROGRAMS[program], args, options);
}

/** Like run() for an absolute program path that is not a system tool (the layer applier). */
export async function runFile(file: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? 60_000;
  const result = await spawner(file, args, timeoutMs, options.inheritFds ?? [], options.env ?? {});
  const stdout = String(result.stdout ?? "");
  const stderr = String(result.stderr ?? "");
  const command = [file, ...args].join(" ");
  if (result.timedOut) throw new HelperFailure("TIMEOUT", `${command}: timed out after ${timeoutMs} ms`);
  if (result.isCanceled) throw new HelperFailure("SHUTTING_DOWN", `${command}: cancelled by helper shutdown`);
  const exitCode = result.exitCode;
  if (exitCode === undefined) {
    throw new HelperFailure("COMMAND_FAILED", `${command}: ${result.signal ? `killed by ${result.signal}` : result.message}${stderr ? `: ${stderr}` : ""}`);
  }
  if (exitCode !== 0 && !(options.allowExitCodes ?? []).includes(exitCode)) {
    throw new CommandFailed(command, exitCode, stdout, stderr);
  }
  return { exitCode, stdout, stderr };
}

/** What runFile needs to know about a finished child (the fields of execa's result it reads). */
export type SpawnResult = {
  exitCode?: number | undefined;
  stdout?: unknown;
  stderr?: unknown;
  timedOut: boolean;
  isCanceled: boolean;
  signal?: string | undefined;
  message?: string | undefined;
};
export type Spawner = (file: string, args: string[], timeoutMs: number, inheritFds: number[], env: Record<string, string>) => Promise<SpawnResult>;

async function spawnWithExeca(file: string, args: string[], timeoutMs: number, inheritFds: number[], env: Record<string, string>): Promise<SpawnResult> {
  // execa's types do not list descriptor numbers past stderr; it passes them to spawn as they are.
  const stdio = ["ignore", "pipe", "pipe", ...inheritFds] as unknown as ["ignore", "pipe", "pipe"];
  return execa(file, args, {
    reject: false,
    stdio,
    env: { ...env, ...ENV, ...crashPointEnv() },
    extendEnv: false,
    timeout: timeoutMs,
    killSignal: "SIGKILL",
    cancelSignal: shutdown.signal,
    maxBuffer: 4 * 1024 * 1024,
    stripFinalNewline: true,
  });
}

let spawner: Spawner = spawnWithExeca;

/**
 * Test seam: every program the helper starts goes through this one function, so a test that
 * swaps in a recorder knows no real command can run. Returns a function that restores execa.
 */
export function replaceSpawnerForTests(replacement: Spawner): () => void {
  spawner = replacement;
  return () => {
    spawner = spawnWithExeca;
  };
}

/** A program exited non-zero; callers inspect stderr to map well-known kernel errors. */
export class CommandFailed extends HelperFailure {
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
  constructor(command: string, exitCode: number, stdout: string, stderr: string) {
    super("COMMAND_FAILED", `${command}: exit ${exitCode}: ${stderr.trim() || stdout.trim() || "(no output)"}`);
    this.exitCode = exitCode;
    this.stdout = stdout;
    this.stderr = stderr;
  }
}
