// TEST ONLY: named kill points for the crash tests (test/e2e/crash.test.ts).
//
// IMGD_TEST_CRASH_AT=<point> or <point>#<n> makes the process SIGKILL itself (or, for
// crashParentPoint, the helper that started it) the n-th time (1 by default) execution passes
// that point, as a kill -9 at that very moment would. IMGD_TEST_CRASH_AT=@<file> reads that
// setting from the file at every pass instead (missing or empty: nothing), so a test can arm a
// running helper without restarting it; the count starts again whenever the setting changes.
// Unset (always, outside tests) the calls do nothing but compare with undefined. The agent has
// its own copy (agent/crash-points.ts): the two programs share no code. Point names and how to
// write a crash scenario: test/vm/README.md.
import { readFileSync, writeSync } from "node:fs";

const SPEC = process.env.IMGD_TEST_CRASH_AT || undefined;
let armed = "";
let passes = 0;

/** SIGKILLs this process if IMGD_TEST_CRASH_AT names this point (and this pass). */
export function crashPoint(name: string): void {
  if (reached(name)) kill(name, process.pid);
}

/**
 * The layer applier's way to kill the helper while the applier runs (unshare execs the applier,
 * so its parent is the helper; the applier then dies with it, by its parent-death signal).
 */
export function crashParentPoint(name: string): void {
  if (reached(name)) kill(name, process.ppid);
}

/**
 * The setting for a child program's (otherwise minimal) environment: the current one itself,
 * since the layer applier cannot read the file once it has chrooted.
 */
export function crashPointEnv(): Record<string, string> {
  const setting = currentSetting();
  return setting === "" ? {} : { IMGD_TEST_CRASH_AT: setting };
}

function currentSetting(): string {
  if (SPEC === undefined) return "";
  if (!SPEC.startsWith("@")) return SPEC;
  try {
    return readFileSync(SPEC.slice(1), "utf8").trim();
  } catch {
    return "";
  }
}

function reached(name: string): boolean {
  if (SPEC === undefined) return false;
  const setting = currentSetting();
  if (setting !== armed) [armed, passes] = [setting, 0];
  const target = parseTarget(setting);
  return target !== undefined && name === target.name && ++passes === target.nth;
}

function kill(name: string, pid: number): void {
  // Said on stderr first (synchronously): the test asserts the point was really reached.
  writeSync(2, `IMGD-CRASH-POINT ${name}#${passes} pid ${pid}: SIGKILL\n`);
  process.kill(pid, "SIGKILL");
}

function parseTarget(setting: string): { name: string; nth: number } | undefined {
  if (setting === "") return undefined;
  const match = /^([a-z0-9.:_-]+)(?:#([1-9][0-9]{0,5}))?$/.exec(setting);
  if (!match) throw new Error(`IMGD_TEST_CRASH_AT must be <point>, <point>#<n> or @<file>, got ${JSON.stringify(setting)}`);
  return { name: match[1]!, nth: match[2] === undefined ? 1 : Number(match[2]) };
}
