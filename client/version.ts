// The version both programs print (imgd --version, imgctl version): package.json's, and the git
// commit when the code runs from a checkout (a deployed copy may have no .git: then none).
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const repo = join(import.meta.dirname, "..");

export function version(): { version: string; commit: string } {
  const { version } = JSON.parse(readFileSync(join(repo, "package.json"), "utf8")) as { version: string };
  let commit = "";
  try {
    commit = execFileSync("git", ["-C", repo, "rev-parse", "--short=12", "HEAD"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 2000 }).trim();
  } catch {
    // not a checkout, or no git: the version alone
  }
  return { version, commit };
}

/** "0.1.0 (1a2b3c4d5e6f)", or "0.1.0" without a commit: what GetVersion answers. */
export function versionString(): string {
  const v = version();
  return `${v.version}${v.commit ? ` (${v.commit})` : ""}`;
}

export function versionLine(program: string): string {
  return `${program} ${versionString()}`;
}
