// A Debian program the host tests need (promtool, systemd-analyze): installed with apt-get when
// missing and the tests run as root (as test/vm/lib/prepare.sh installs the VM's tools), so the
// suite installs what it uses; otherwise the caller skips, saying why.
import { execFileSync, spawnSync } from "node:child_process";

const which = (command: string) => spawnSync("sh", ["-c", `command -v ${command}`], { encoding: "utf8" }).stdout.trim() || undefined;

/** The program's path, installing `pkg` first if needed and possible; undefined if still missing. */
export function debianTool(command: string, pkg: string): string | undefined {
  const found = which(command);
  if (found || process.getuid?.() !== 0 || which("apt-get") === undefined) return found;
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  try {
    execFileSync("apt-get", ["install", "-y", "-qq", "--no-install-recommends", pkg], { env, stdio: "ignore" });
  } catch {
    // The package lists may be missing or old (a fresh machine): update them once, then try again.
    execFileSync("apt-get", ["update", "-qq"], { env, stdio: "ignore" });
    execFileSync("apt-get", ["install", "-y", "-qq", "--no-install-recommends", pkg], { env, stdio: "ignore" });
  }
  return which(command);
}
