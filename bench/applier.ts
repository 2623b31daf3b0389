// Host benchmark of the layer applier (issue 11, "unpack at the speed of tar"), run as root:
//   node bench/applier.ts [--mb 128] [--runs 3] [--dir DIR] [--old REF] [--profile OUTDIR]
// Builds two ~MB-sized plain tars with GNU tar (a root-filesystem-like mix of small files, dirs
// and symlinks; and 256 KiB files like the VM bench's generated layer), then applies each, into
// a fresh directory of the same filesystem every time, with:
//   imgd     the applier child in test mode (chrooted; hash, apply, syncfs), this checkout
//   old      the same child from git REF (default main), when that ref differs
//   bundled  dist/imgd-applier.mjs, when `npm run build` made it
//   tar -x   GNU tar, then sync
// and prints MiB/s (tar bytes / wall time, process start included) and each ratio to tar -x.
// DIR defaults to an ext4 filesystem on a loop device made for the run (like a thin device's);
// pass --dir to use another (e.g. a tmpfs). Medians of --runs interleaved runs. --profile also
// writes a CPU profile (node --cpu-prof) of one extra run of imgd and of old per layer to OUTDIR.
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { mb: { type: "string", default: "128" }, runs: { type: "string", default: "3" }, dir: { type: "string" }, old: { type: "string", default: "main" }, profile: { type: "string" } } });
const MiB = 1024 * 1024;
const repo = join(dirname(fileURLToPath(import.meta.url)), "..");
const work = mkdtempSync(join(tmpdir(), "imgd-bench-applier-"));
/** A root-only compile cache (NODE_COMPILE_CACHE) as the helper gives its child: Node then skips
 *  stripping the applier's TypeScript at each start (~0.25 s of CPU per layer on this host). */
const compileCache = join(work, "compile-cache");
const sh = (file: string, args: string[]) => execFileSync(file, args, { encoding: "utf8" }).trim();
const cleanups: (() => void)[] = [() => rmSync(work, { recursive: true, force: true })];
for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => process.exit(130)); // runs the cleanups
process.on("exit", () => cleanups.reverse().forEach((f) => { try { f(); } catch { /* best effort */ } }));

/** A deterministic pseudo-random sequence (no Math.random: the same layers every run). */
function* numbers(seed: number): Generator<number> {
  let x = seed >>> 0;
  for (;;) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    yield x;
  }
}

function buildTree(dir: string, totalBytes: number, kind: "rootfs" | "big"): void {
  const rand = numbers(kind === "rootfs" ? 1 : 2);
  const next = () => rand.next().value as number;
  const chunk = Buffer.alloc(4 * MiB);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE(next(), i);
  let written = 0;
  for (let i = 0; written < totalBytes; i++) {
    // rootfs: mostly small files (0.1-16 KiB), one in 40 larger (64 KiB-1 MiB), 64 per directory;
    // big: 256 KiB files, 16 directories.
    const size = kind === "big" ? 256 * 1024 : next() % 40 === 0 ? 65536 + (next() % (960 * 1024)) : 100 + (next() % 16384);
    const sub = kind === "big" ? `d${i % 16}` : `usr/share/p${Math.floor(i / 64) % 400}/s${Math.floor(i / 256)}`;
    mkdirSync(join(dir, sub), { recursive: true });
    const at = next() % (chunk.length - size);
    writeFileSync(join(dir, sub, `f${i}`), chunk.subarray(at, at + size));
    if (kind === "rootfs" && i % 50 === 0) symlinkSync(`f${i}`, join(dir, sub, `l${i}`));
    written += size;
  }
}

function makeLayer(kind: "rootfs" | "big", totalBytes: number): { path: string; digest: string; bytes: number } {
  const tree = join(work, `tree-${kind}`);
  mkdirSync(tree);
  buildTree(tree, totalBytes, kind);
  const path = join(work, `${kind}.tar`);
  sh("/usr/bin/tar", ["--format=pax", "--numeric-owner", "-cf", path, "-C", tree, "."]);
  rmSync(tree, { recursive: true, force: true });
  const data = readFileSync(path);
  return { path, digest: `sha256:${createHash("sha256").update(data).digest("hex")}`, bytes: data.length };
}

function targetFilesystem(): string {
  if (values.dir) return values.dir;
  const image = join(work, "fs.img");
  const mountPoint = join(work, "mnt");
  mkdirSync(mountPoint);
  sh("/usr/bin/truncate", ["-s", "3G", image]);
  sh("/usr/sbin/mkfs.ext4", ["-q", "-m", "0", image]);
  sh("/usr/bin/mount", ["-o", "loop,nosuid,nodev", image, mountPoint]);
  cleanups.push(() => sh("/usr/bin/umount", [mountPoint]));
  return mountPoint;
}

/** The applier child of git `ref`, copied out (with its imports) so it runs as it was. */
function oldChild(ref: string): string | null {
  const head = sh("/usr/bin/git", ["-C", repo, "rev-parse", "HEAD"]);
  const at = spawnSync("/usr/bin/git", ["-C", repo, "rev-parse", "--verify", ref], { encoding: "utf8" });
  if (at.status !== 0 || at.stdout.trim() === head) return null;
  const copy = join(work, "old");
  const files = sh("/usr/bin/git", ["-C", repo, "ls-tree", "-r", "--name-only", ref, "privhelper/"]).split("\n");
  for (const file of files) {
    mkdirSync(dirname(join(copy, file)), { recursive: true });
    writeFileSync(join(copy, file), execFileSync("/usr/bin/git", ["-C", repo, "show", `${ref}:${file}`]));
  }
  symlinkSync(join(repo, "node_modules"), join(copy, "node_modules"));
  writeFileSync(join(copy, "package.json"), readFileSync(join(repo, "package.json")));
  return join(copy, "privhelper/apply/child.ts");
}

const fs = targetFilesystem();
let fresh = 0;
/** Wall seconds, and CPU seconds (user + system, of the programs run), to apply a layer into a
 *  fresh directory of the target filesystem with `how`. CPU time is the fairer figure on a busy
 *  host (wall time there is mostly waiting for a core). */
function timed(how: (dir: string) => void): { wall: number; cpu: number } {
  const dir = join(fs, `run-${fresh++}`);
  mkdirSync(dir);
  sh("/usr/bin/sync", []);
  const before = childCpu();
  const started = performance.now();
  how(dir);
  const wall = (performance.now() - started) / 1000;
  const cpu = childCpu() - before;
  rmSync(dir, { recursive: true, force: true });
  return { wall, cpu };
}

/** CPU seconds used so far by this process's waited-for children (getrusage RUSAGE_CHILDREN, via /proc). */
function childCpu(): number {
  // /proc/self/stat fields 16 and 17: cutime and cstime, in clock ticks (100 per second on Linux).
  const fields = readFileSync("/proc/self/stat", "utf8").split(") ")[1]!.split(" ");
  return (Number(fields[13]) + Number(fields[14])) / 100;
}

const child = (script: string, layer: { path: string; digest: string }, profile: string[] = [], env: Record<string, string> = {}) => (dir: string) => {
  const run = spawnSync(process.execPath, [...profile, script, "--root", dir, "--blob", layer.path, "--digest", layer.digest], { encoding: "utf8", env: { ...process.env, ...env } });
  if (!run.stdout.includes('"ok":true')) throw new Error(`${script}: ${run.stdout}${run.stderr}`);
};
const tarX = (layer: { path: string }) => (dir: string) => {
  sh("/usr/bin/tar", ["-xf", layer.path, "-C", dir]);
  sh("/usr/bin/sync", []);
};

const mb = Number(values.mb);
const runs = Number(values.runs);
const old = oldChild(values.old!);
const bundled = join(repo, "dist/imgd-applier.mjs");
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
console.log(`applier bench: ${mb} MiB layers, ${runs} runs each, into ${values.dir ?? "a fresh ext4 loop filesystem"}; node ${process.version}`);
for (const kind of ["rootfs", "big"] as const) {
  const layer = makeLayer(kind, mb * MiB);
  const contenders: [string, (dir: string) => void][] = [
    ["imgd", child(join(repo, "privhelper/apply/child.ts"), layer)],
    ["imgd, cached", child(join(repo, "privhelper/apply/child.ts"), layer, [], { NODE_COMPILE_CACHE: compileCache })],
    // What the helper runs when it runs from the bundle (npm run build; the units and the VM do).
    ...(existsSync(bundled) ? [["imgd, bundled", child(bundled, layer, [], { NODE_COMPILE_CACHE: compileCache })] as [string, (dir: string) => void]] : []),
    ...(old ? [[`old (${values.old})`, child(old, layer)] as [string, (dir: string) => void]] : []),
    ["tar -x + sync", tarX(layer)],
  ];
  timed(contenders[1]![1]); // warms the compile cache
  const times = new Map(contenders.map(([name]) => [name, [] as { wall: number; cpu: number }[]]));
  for (let i = 0; i < runs; i++) for (const [name, how] of contenders) times.get(name)!.push(timed(how));
  const wall = (name: string) => median(times.get(name)!.map((t) => t.wall));
  const cpu = (name: string) => median(times.get(name)!.map((t) => t.cpu));
  const size = statSync(layer.path).size / MiB;
  console.log(`\n${kind} layer: ${size.toFixed(1)} MiB tar`);
  for (const [name] of contenders) {
    const ratio = (f: (n: string) => number) => (f("tar -x + sync") / f(name)).toFixed(2);
    console.log(`  ${name.padEnd(16)} ${(size / wall(name)).toFixed(1).padStart(7)} MiB/s wall (${wall(name).toFixed(2)} s, ${ratio(wall)}x tar -x)   CPU ${cpu(name).toFixed(2)} s (${ratio(cpu)}x tar -x)`);
  }
  if (values.profile) {
    timed(child(join(repo, "privhelper/apply/child.ts"), layer, ["--cpu-prof", "--cpu-prof-dir", values.profile, "--cpu-prof-name", `imgd-${kind}.cpuprofile`]));
    if (old) timed(child(old, layer, ["--cpu-prof", "--cpu-prof-dir", values.profile, "--cpu-prof-name", `old-${kind}.cpuprofile`]));
  }
  rmSync(layer.path);
}
