// TEST ONLY: named kill points for the crash tests (test/e2e/crash.test.ts).
//
// IMGD_TEST_CRASH_AT=<point> or <point>#<n> makes this process SIGKILL itself the n-th time (1 by
// default) execution passes crashPoint("<point>"), as a kill -9 at that very moment would.
// IMGD_TEST_CRASH_AT=@<file> reads that setting from the file at every pass instead (missing or
// empty: nothing), so a test can arm a running process without restarting it; the count starts
// again whenever the setting changes.
// Unset (always, outside tests) crashPoint does nothing but compare with undefined.
// The helper has its own copy (privhelper/crash-points.ts): the two programs share no code.
// Point names and how to write a crash scenario: test/vm/README.md.
import { readFileSync, writeSync } from "node:fs";

const SPEC = process.env.IMGD_TEST_CRASH_AT || undefined;
let armed = "";
let passes = 0;

/** SIGKILLs this process if IMGD_TEST_CRASH_AT names this point (and this pass). */
export function crashPoint(name: string): void {
  if (SPEC === undefined) return;
  const setting = SPEC.startsWith("@") ? readSetting(SPEC.slice(1)) : SPEC;
  if (setting !== armed) [armed, passes] = [setting, 0];
  const target = parseTarget(setting);
  if (target === undefined || name !== target.name || ++passes !== target.nth) return;
  // Said on stderr first (synchronously): the test asserts the point was really reached.
  writeSync(2, `IMGD-CRASH-POINT ${name}#${passes} pid ${process.pid}: SIGKILL\n`);
  process.kill(process.pid, "SIGKILL");
}

function readSetting(file: string): string {
  try {
    return readFileSync(file, "utf8").trim();
  } catch {
    return "";
  }
}

function parseTarget(setting: string): { name: string; nth: number } | undefined {
  if (setting === "") return undefined;
  const match = /^([a-z0-9.:_-]+)(?:#([1-9][0-9]{0,5}))?$/.exec(setting);
  if (!match) throw new Error(`IMGD_TEST_CRASH_AT must be <point>, <point>#<n> or @<file>, got ${JSON.stringify(setting)}`);
  return { name: match[1]!, nth: match[2] === undefined ? 1 : Number(match[2]) };
}
