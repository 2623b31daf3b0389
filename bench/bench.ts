// imgd benchmark, run inside the VM (bench/run) as root, against the real helper, pool and S3
// server the harness started. Every figure is a ratio against a baseline measured in the same
// run on the same machine, never an absolute target (each row names the issue's goal):
//   pulls     the cold pull of golang vs downloading its layers alone and unpacking them alone;
//             node and python after it (bytes fetched, applied, reused); pool data used by the
//             three vs their unique layer bytes; peak RSS of the agent, the helper and the applier
//   unpack    each layer of golang: layer.apply (the helper's confined applier: mount, apply,
//             hash, sync, unmount) vs mount + `tar -x` + sync + unmount of the same layer, each
//             into a snapshot of the device below it (a fresh device for the first layer)
//   re-pull   latency of PullImage on a ready image vs GetImage (medians)
//   activate  latency of ActivateImage vs the raw create_snap + create + mknodes (medians)
//   download  the agent's blob download (hash, fsync, rename) vs the aws CLI and curl copying the
//             same objects from the same server
//   ranged    the largest layer downloaded by one GET vs by parallel ranged GETs (the agent's
//             own two modes, IMGD_DOWNLOAD_PARALLEL_THRESHOLD / _PART_SIZE / _PART_CONCURRENCY)
//   generated the same comparison for a generated layer of 256 KiB files (IMGD_BENCH_LAYER_MB,
//             128; 0: none) in a fresh device
// IMGD_BENCH_ONLY=activate,download (say) runs only those sections ("pulls" is the first four).
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chownSync, createWriteStream, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from "node:fs";
import { pipeline } from "node:stream/promises";
import { pack } from "tar-stream";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { BlobStore } from "../agent/blobs/store.ts";
import { HelperClient } from "../agent/helper-client.ts";
import { createS3Client, loadS3Config } from "../agent/s3/client.ts";
import type { S3Config } from "../agent/s3/client.ts";
import { listImageLayers } from "../agent/s3/image-source.ts";
import { connectImgd, LayerPhase } from "../client/sdk.ts";
import { MOUNT_READ_WRITE, withMounted } from "../test/helpers/mount.ts";

const helper = new HelperClient(process.env.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock");
const { client, channel } = connectImgd();
const s3Config = loadS3Config(process.env);
// A client per section: the CLIs run under execFileSync, which blocks the event loop for minutes,
// so the server's close of an idle keep-alive connection is only seen after the next request was
// written on it (EPIPE, and a lost bench run). The agent never blocks its loop like that.
let s3 = createS3Client(s3Config);
const freshS3 = () => {
  s3.destroy();
  s3 = createS3Client(s3Config);
};
const images = ["golang", "node", "python"];
const MiB = 1048576;
/** The agent's blob store in the VM, where the helper takes the blobs it applies from. */
const BLOB_DIR = "/var/lib/imgd/blobs/sha256";

const now = () => performance.now();
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const sh = (cmd: string, args: string[], env?: NodeJS.ProcessEnv) => execFileSync(cmd, args, { encoding: "utf8", env: { ...process.env, ...env } });
const rows: [string, string, string, string][] = [];
/** Records a row for the final table and prints it at once (a run that fails later keeps it). */
const row = (what: string, imgd: string, baseline: string, ratio: string) => {
  rows.push([what, imgd, baseline, ratio]);
  console.log(`bench row: ${what} | ${imgd} | ${baseline} | ${ratio}`);
};

// ---- peak memory -------------------------------------------------------------------------------

const pidOf = (service: string) => Number(readFileSync(`/run/imgd-vm-pids/${service}.pid`, "utf8").trim());
const statusKiB = (pid: number, field: string) => {
  try {
    const line = readFileSync(`/proc/${pid}/status`, "utf8").split("\n").find((l) => l.startsWith(`${field}:`));
    return line ? Number(line.split(/\s+/)[1]) : 0;
  } catch {
    return 0; // gone meanwhile
  }
};
const childrenOf = (pid: number): number[] => {
  try {
    return readdirSync(`/proc/${pid}/task`).flatMap((tid) => readFileSync(`/proc/${pid}/task/${tid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number));
  } catch {
    return [];
  }
};

/**
 * Peak RSS of the agent, the helper and the helper's children (the applier processes) while
 * `work` runs: the kernel's own high-water mark (VmHWM) for the two services, sampled every
 * 100 ms for the short-lived appliers. Also the agent's peak of anonymous memory (RssAnon, what
 * it allocated), sampled: RSS also counts the pages of mapped files it touched (most of them
 * Node's own binary, shared by every node process and reclaimable).
 */
async function peakRss<T>(work: () => Promise<T>): Promise<{ result: T; agent: number; agentAnon: number; helper: number; applier: number }> {
  const agentPid = pidOf("agent");
  const helperPid = pidOf("helper");
  let applier = 0;
  let agentAnon = 0;
  const sampler = setInterval(() => {
    const tree = (pid: number): number[] => childrenOf(pid).flatMap((c) => [c, ...tree(c)]);
    for (const child of tree(helperPid)) applier = Math.max(applier, statusKiB(child, "VmRSS"));
    agentAnon = Math.max(agentAnon, statusKiB(agentPid, "RssAnon"));
  }, 100);
  try {
    const result = await work();
    return { result, agent: statusKiB(agentPid, "VmHWM") / 1024, agentAnon: agentAnon / 1024, helper: statusKiB(helperPid, "VmHWM") / 1024, applier: applier / 1024 };
  } finally {
    clearInterval(sampler);
  }
}

/** CPU seconds so far: of a process and the children it waited for, and of the whole machine. */
const TICKS = 100; // USER_HZ, 100 on Linux
const processCpu = (pid: number) => {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\) /, "").split(" ");
  return fields.slice(11, 15).reduce((n, f) => n + Number(f), 0) / TICKS; // utime stime cutime cstime
};
const machineBusyCpu = () => {
  const [, ...ticks] = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).map(Number);
  return (ticks.reduce((a, b) => a + b, 0) - ticks[3] - ticks[4]) / TICKS; // all but idle and iowait
};
/** Where the CPU went while `work` ran: the agent, the helper with its appliers, the machine. */
async function cpuDuring<T>(work: () => Promise<T>): Promise<{ result: T; summary: string; machine: number }> {
  const pids = { agent: pidOf("agent"), helper: pidOf("helper") };
  const before = { agent: processCpu(pids.agent), helper: processCpu(pids.helper), machine: machineBusyCpu(), wall: now() };
  const result = await work();
  const wall = (now() - before.wall) / 1000;
  const used = (what: "agent" | "helper") => processCpu(pids[what]) - before[what];
  const machine = machineBusyCpu() - before.machine;
  const cpus = availableParallelism();
  const summary = `CPU s: agent ${used("agent").toFixed(1)}, helper and appliers ${used("helper").toFixed(1)}, whole machine ${machine.toFixed(1)} of ${(cpus * wall).toFixed(1)} (${cpus} CPUs x ${wall.toFixed(1)} s)`;
  return { result, summary, machine };
}

// ---- pulls ----------------------------------------------------------------------------------------

/** Pulls an image; per layer, whether it was fetched, applied, or reused as it was. */
async function pull(image: string): Promise<{ seconds: number; fetched: number; applied: number; reused: number; layers: number; timeline: string }> {
  const phases = new Map<number, Set<LayerPhase>>();
  const sizes = new Map<number, number>();
  // Per layer, seconds since the pull began at which each phase was first seen, and when its
  // download was complete: shows whether downloads and applies overlapped.
  const seen = new Map<number, Map<string, number>>();
  const mark = (position: number, event: string, at: number) => {
    const events = seen.get(position) ?? new Map<string, number>();
    seen.set(position, events);
    if (!events.has(event)) events.set(event, at);
  };
  const t = now();
  for await (const message of client.pullImage({ image })) {
    // A failed pull ends the stream with its error.
    const at = (now() - t) / 1000;
    for (const l of message.layers) {
      phases.set(l.position, (phases.get(l.position) ?? new Set()).add(l.phase));
      sizes.set(l.position, Number(l.bytesTotal));
      mark(l.position, LayerPhase[l.phase].toLowerCase(), at);
      if (l.phase === LayerPhase.DOWNLOADING && l.bytesDone === l.bytesTotal) mark(l.position, "downloaded", at);
    }
  }
  const seconds = (now() - t) / 1000;
  const timeline = [...seen]
    .sort(([a], [b]) => a - b)
    .map(([position, events]) => `layer ${position} (${(sizes.get(position)! / MiB).toFixed(0)} MiB): ${[...events].map(([e, at]) => `${e} ${at.toFixed(1)}`).join(", ")}`)
    .join("\n");
  const bytesWith = (phase: LayerPhase) => [...phases].filter(([, seen]) => seen.has(phase)).reduce((n, [position]) => n + sizes.get(position)!, 0);
  return { seconds, fetched: bytesWith(LayerPhase.DOWNLOADING), applied: bytesWith(LayerPhase.APPLYING), reused: bytesWith(LayerPhase.REUSED), layers: phases.size, timeline };
}

/**
 * The cold pull of the first image against the two things it is made of, each alone in the same
 * run: downloading its layers (into a scratch blob store) and unpacking them (each layer applied
 * by the helper onto a scratch snapshot of the agent's device for the layer below, as a pull
 * does; next to `tar -x` into another such snapshot). A pull that overlaps the two takes little
 * more than the longer. This runs while the pool holds only the first image: a second copy of
 * its whole chain would not fit the real-size bench's 2 GiB pool beside all three.
 */
async function benchPulls(): Promise<void> {
  const before = await client.getPool({});
  const mib = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`;
  const [first, ...later] = images;
  const { result, agent, agentAnon, helper: helperMiB, applier } = await peakRss(async () => {
    const cold = await cpuDuring(() => pull(first));
    console.log(`bench: during the cold pull of ${first}: ${cold.summary}`);
    const pulls = [cold.result];
    // The first image's baselines, before the others are pulled (the helper's peak includes the
    // layers it applies for them: the same work as a pull's).
    const download = await cpuDuring(() => downloadAlone(first));
    console.log(`bench: during the download alone (in the bench's own process): ${download.summary}`);
    const unpack = await cpuDuring(() => unpackEachLayer(first));
    console.log(`bench: during the unpack alone (imgd's and tar's): ${unpack.summary}`);
    for (const image of later) pulls.push(await pull(image));
    return { pulls, download: download.result, downloadCpu: download.machine, unpack: unpack.result.seconds, unpackCpu: unpack.result.cpu };
  });
  const { pulls, download, unpack } = result;
  // The machine's CPU time the two took alone (download: the client, s3rver, the kernel; unpack:
  // imgd's device work and applier, the kernel), spread over every CPU: no overlap of the two can
  // make the pull shorter than that on this machine.
  const floor = (result.downloadCpu + result.unpackCpu) / availableParallelism();
  console.log(
    `bench: CPU the cold pull's two parts took alone: download ${result.downloadCpu.toFixed(1)} s, unpack ${result.unpackCpu.toFixed(1)} s; ` +
      `over ${availableParallelism()} CPUs at least ${floor.toFixed(1)} s together, ${(floor / Math.max(download, unpack)).toFixed(2)}x the longer`,
  );
  const after = await client.getPool({});
  const cold = pulls[0].seconds;
  console.log(`bench: the cold pull of ${first}, seconds since it began:\n${pulls[0].timeline}`);
  row(
    `cold pull of ${first} (${pulls[0].layers} layers, ${mib(pulls[0].fetched)})`,
    `${cold.toFixed(1)} s`,
    `download alone ${download.toFixed(1)} s, unpack alone ${unpack.toFixed(1)} s`,
    `${(cold / Math.max(download, unpack)).toFixed(2)}x the longer (goal <= 1.2x)`,
  );
  later.forEach((image, i) => {
    const p = pulls[i + 1];
    row(`pull of ${image} after ${images.slice(0, i + 1).join(", ")}`, `${p.seconds.toFixed(1)} s`, `fetched ${mib(p.fetched)}, applied ${mib(p.applied)}, reused ${mib(p.reused)}`, "-");
  });

  let layerBytes = 0;
  const unique = new Map<string, number>();
  for (const image of images) {
    const { image: info } = await client.getImage({ image });
    for (const l of info!.layers) {
      layerBytes += Number(l.size);
      unique.set(l.digest, Number(l.size));
    }
  }
  const used = Number(after.dataUsedBytes - before.dataUsedBytes);
  const uniqueBytes = [...unique.values()].reduce((a, b) => a + b, 0);
  row("pool data used by 3 images", mib(used), `${mib(uniqueBytes)} unique layer bytes (${mib(layerBytes)} in all)`, `${(used / uniqueBytes).toFixed(2)}x (goal <= 1.15x)`);
  row("peak RSS during the pulls", `agent ${agent.toFixed(0)} MiB (anonymous ${agentAnon.toFixed(0)}), helper ${helperMiB.toFixed(0)} MiB, applier ${applier.toFixed(0)} MiB`, "goal: agent <= 256, helper <= 128", "-");
}

/** Downloads the image's layers into a scratch blob store as a pull does: all at once, validated. */
async function downloadAlone(image: string): Promise<number> {
  freshS3();
  const objects = await listImageLayers(s3, s3Config, image);
  const dir = mkdtempSync("/tmp/imgd-bench-dl-");
  try {
    const store = new BlobStore(dir);
    await store.init();
    const t = now();
    // As the pull downloads: each layer validated while it arrives (default limits), which is
    // part of a download's CPU in imgd (the check thread), not of the unpack.
    await Promise.all(objects.map((o) => store.downloadLayer(s3, s3Config, o, { validate: {} })));
    return (now() - t) / 1000;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Each layer of the image, applied by imgd's helper and by `tar -x` (a row each, compareUnpack);
 * returns the time imgd's per-layer work took in all (device made, filesystem for the first,
 * layer applied, device unmapped), the image's unpack alone, and the machine's CPU time it took.
 */
async function unpackEachLayer(image: string): Promise<{ seconds: number; cpu: number }> {
  const { image: info } = await client.getImage({ image });
  const total = { seconds: 0, cpu: 0 };
  let below: number | undefined;
  for (const layer of info!.layers) {
    const hex = layer.digest.replace(/^sha256:/, "");
    const ours = await compareUnpack(`layer ${layer.position} of ${image}`, join(BLOB_DIR, hex), layer.digest, Number(layer.size), 0xfff000, below);
    total.seconds += ours.seconds;
    total.cpu += ours.cpu;
    below = layer.thinId;
  }
  return total;
}

async function benchRepullAndActivate(): Promise<void> {
  const repull: number[] = [];
  for (let i = 0; i < 30; i++) {
    const t = now();
    for await (const _ of client.pullImage({ image: "golang" }));
    repull.push(now() - t);
  }
  const getImage: number[] = [];
  for (let i = 0; i < 30; i++) {
    const t = now();
    await client.getImage({ image: "golang" });
    getImage.push(now() - t);
  }
  row("re-pull latency (median of 30)", `${median(repull).toFixed(1)} ms`, `GetImage ${median(getImage).toFixed(1)} ms`, `${(median(repull) / median(getImage)).toFixed(2)}x (goal <= 1.5x)`);
  const activate: number[] = [];
  for (let i = 0; i < 10; i++) {
    const t = now();
    await client.activateImage({ image: images[i % 3] });
    activate.push(now() - t);
  }
  // Baseline: the raw device-mapper sequence an activation needs, by hand in the same pool: a
  // snapshot message, the device, its node (there is no udev in the guest); then undone.
  const { name: poolName } = await client.getPool({});
  const { image } = await client.getImage({ image: "golang" });
  const rawSectors = (8 * 1024 * MiB) / 512; // the helper's default thin size; the size costs nothing here
  const raw: number[] = [];
  for (let i = 0; i < 10; i++) {
    const thinId = 0xfff000 + i; // far above what the agent allocates in a bench run
    const name = `bench-raw-${i}`;
    const t = now();
    sh("/usr/sbin/dmsetup", ["message", poolName, "0", `create_snap ${thinId} ${image!.thinId}`]);
    sh("/usr/sbin/dmsetup", ["create", name, "--noudevsync", "--table", `0 ${rawSectors} thin /dev/mapper/${poolName} ${thinId}`]);
    sh("/usr/sbin/dmsetup", ["mknodes", name]);
    raw.push(now() - t);
    sh("/usr/sbin/dmsetup", ["remove", "--noudevsync", name]);
    sh("/usr/sbin/dmsetup", ["message", poolName, "0", `delete ${thinId}`]);
  }
  row(
    "activation latency (median of 10)",
    `${median(activate).toFixed(0)} ms`,
    `create_snap + create + mknodes by hand ${median(raw).toFixed(0)} ms`,
    `${(median(activate) / median(raw)).toFixed(1)}x (goal <= 2x)`,
  );
}

async function benchDownload(): Promise<void> {
  freshS3();
  const objects = (await Promise.all(images.map((image) => listImageLayers(s3, s3Config, image)))).flat();
  const bytes = objects.reduce((n, o) => n + o.size, 0);
  const ours = mkdtempSync("/tmp/imgd-bench-dl-");
  const store = new BlobStore(ours);
  await store.init();
  const t0 = now();
  for (const obj of objects) await store.downloadLayer(s3, s3Config, obj, {});
  const oursSeconds = (now() - t0) / 1000;
  rmSync(ours, { recursive: true, force: true }); // the guest's tmpfs holds one copy at a time
  const theirs = mkdtempSync("/tmp/imgd-bench-aws-");
  const t1 = now();
  sh("/usr/bin/aws", ["s3", "cp", "--recursive", "--no-sign-request", "--endpoint-url", s3Config.endpoint!, `s3://${s3Config.bucket}/${s3Config.prefix}`, theirs, "--only-show-errors"], {
    AWS_DEFAULT_REGION: s3Config.region,
    AWS_MAX_CONCURRENT_REQUESTS: "1",
  });
  sh("/usr/bin/sync", []);
  const awsSeconds = (now() - t1) / 1000;
  rmSync(theirs, { recursive: true, force: true });
  // curl: one process, one connection, the objects one after another (s3rver serves anonymous GETs).
  const curled = mkdtempSync("/tmp/imgd-bench-curl-");
  const t2 = now();
  sh("/usr/bin/curl", ["--silent", "--show-error", "--fail", ...objects.flatMap((o, i) => ["-o", join(curled, String(i)), `${s3Config.endpoint}/${s3Config.bucket}/${o.key}`])]);
  sh("/usr/bin/sync", []);
  const curlSeconds = (now() - t2) / 1000;
  rmSync(curled, { recursive: true, force: true });
  const mbps = (s: number) => `${(bytes / MiB / s).toFixed(1)} MiB/s`;
  const faster = Math.min(awsSeconds, curlSeconds);
  row(
    `download ${objects.length} objects, ${(bytes / MiB).toFixed(0)} MiB`,
    mbps(oursSeconds),
    `aws s3 cp ${mbps(awsSeconds)}, curl ${mbps(curlSeconds)}`,
    `${(faster / oursSeconds).toFixed(2)}x the faster (goal >= 0.8x)`,
  );
}

async function benchRangedDownload(): Promise<void> {
  freshS3();
  const objects = (await Promise.all(images.map((image) => listImageLayers(s3, s3Config, image)))).flat();
  const largest = objects.sort((a, b) => b.size - a.size)[0];
  const timed = async (download: S3Config["download"]) => {
    const dir = mkdtempSync("/tmp/imgd-bench-ranged-");
    try {
      const store = new BlobStore(dir);
      await store.init();
      const t = now();
      await store.downloadLayer(s3, { ...s3Config, download: { ...s3Config.download, ...download } }, largest, {});
      return (now() - t) / 1000;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  const partSize = Math.max(1024 * 1024, Math.ceil(largest.size / 8));
  const single = await timed({ parallelThreshold: Number.MAX_SAFE_INTEGER });
  freshS3();
  const ranged = await timed({ parallelThreshold: 1, partSize, partConcurrency: 4 });
  const mbps = (s: number) => `${(largest.size / MiB / s).toFixed(1)} MiB/s`;
  row(`largest layer (${(largest.size / MiB).toFixed(1)} MiB): ranged GETs, ${Math.ceil(largest.size / partSize)} parts, 4 at once`, mbps(ranged), `one GET ${mbps(single)}`, `${(single / ranged).toFixed(2)}x`);
}

/**
 * Applies a layer with imgd's helper (mount, validate, apply, hash, sync, unmount) into a device
 * made as a pull makes it (a snapshot of `below`, the device of the layer under it, or a fresh
 * device with a new filesystem for a first layer) and, as the baseline, runs mount + `tar -x` +
 * sync + unmount into a second device made the same way: the work a tar-based unpacker would do.
 * Returns imgd's whole per-layer time (device made, applied, unmapped).
 */
async function compareUnpack(label: string, blobPath: string, digest: string, bytes: number, thinBase: number, below?: number): Promise<{ seconds: number; cpu: number }> {
  const made = async (thinId: number, name: string) => {
    if (below === undefined) await helper.call("thin.create", { thinId });
    else await helper.call("thin.snapshot", { thinId, originId: below });
    await helper.call("device.activate", { name, thinId });
    if (below === undefined) await helper.call("fs.mkfs", { name });
  };
  const dispose = async (thinId: number, name: string) => {
    await helper.call("device.deactivate", { name });
    await helper.call("thin.delete", { thinId });
  };
  const oursName = `imgd-layer-${thinBase.toString(16).padStart(32, "0")}`;
  const tarName = `imgd-layer-${(thinBase + 1).toString(16).padStart(32, "0")}`;
  const t0 = now();
  const cpu0 = machineBusyCpu();
  await made(thinBase, oursName);
  const t1 = now();
  await helper.call("layer.apply", { name: oursName, digest });
  const applySeconds = (now() - t1) / 1000;
  await helper.call("device.deactivate", { name: oursName });
  const wholeSeconds = (now() - t0) / 1000;
  const wholeCpu = machineBusyCpu() - cpu0;
  await helper.call("thin.delete", { thinId: thinBase });

  await made(thinBase + 1, tarName);
  const t2 = now();
  // The helper mounts nothing for anyone: the baseline mounts the device itself (bench runs as root).
  await withMounted(`/dev/mapper/${tarName}`, (path) => {
    sh("/usr/bin/tar", ["-x", "-f", blobPath, "-C", path, "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*"]);
    sh("/usr/bin/sync", ["-f", path]);
  }, MOUNT_READ_WRITE);
  const tarSeconds = (now() - t2) / 1000;
  await dispose(thinBase + 1, tarName);
  const mbps = (s: number) => `${(bytes / MiB / s).toFixed(1)} MiB/s`;
  row(`unpack ${label} (${(bytes / MiB).toFixed(1)} MiB)`, mbps(applySeconds), `mount+tar -x+sync+umount ${mbps(tarSeconds)}`, `${(tarSeconds / applySeconds).toFixed(2)}x (goal >= 0.9x)`);
  return { seconds: wholeSeconds, cpu: wholeCpu };
}

/** Writes a layer of `count` files of `fileBytes` pseudo-random bytes into the blob store. */
async function generatedLayer(count: number, fileBytes: number): Promise<{ path: string; digest: string; bytes: number }> {
  const tmp = `/var/lib/imgd/tmp/bench-${process.pid}.tar`;
  const archive = pack();
  const hash = createHash("sha256");
  const written = pipeline(archive, async function* (source) {
    for await (const chunk of source) {
      hash.update(chunk as Buffer);
      yield chunk;
    }
  }, createWriteStream(tmp));
  for (let i = 0; i < count; i++) {
    await new Promise<void>((resolve, reject) => archive.entry({ name: `data/d${i % 16}/f${i}`, mode: 0o644 }, randomBytes(fileBytes), (err) => (err ? reject(err) : resolve())));
  }
  archive.finalize();
  await written;
  const hex = hash.digest("hex");
  const path = join(BLOB_DIR, hex);
  renameSync(tmp, path);
  // The helper applies only blobs the agent owns (issue 9): hand it to the agent's user.
  chownSync(path, Number(sh("/usr/bin/id", ["-u", "imgd"]).trim()), Number(sh("/usr/bin/id", ["-g", "imgd"]).trim()));
  return { path, digest: `sha256:${hex}`, bytes: statSync(path).size };
}

/** A generated layer of many files (IMGD_BENCH_LAYER_MB, 128; 0: none). */
async function benchGeneratedLayer(): Promise<void> {
  const mb = Number(process.env.IMGD_BENCH_LAYER_MB ?? 128);
  if (mb === 0) return;
  const big = await generatedLayer(mb * 4, 256 * 1024);
  await compareUnpack("generated layer", big.path, big.digest, big.bytes, 0xfff010);
  rmSync(big.path);
}

/** IMGD_BENCH_ONLY=section,...: only those sections (for working on one figure; the table is then partial). */
const SECTIONS = ["pulls", "activate", "download", "ranged", "generated"] as const;

async function main(): Promise<void> {
  const only = process.env.IMGD_BENCH_ONLY?.split(",").filter(Boolean) ?? [...SECTIONS];
  const unknown = only.filter((name) => !(SECTIONS as readonly string[]).includes(name));
  if (unknown.length > 0) throw new Error(`IMGD_BENCH_ONLY: unknown section(s) ${unknown.join(", ")}; known: ${SECTIONS.join(", ")}`);
  if (only.includes("pulls")) await benchPulls();
  else if (only.includes("activate")) for (const image of images) await pull(image); // activations need ready images (not timed)
  if (only.includes("activate")) await benchRepullAndActivate();
  if (only.includes("download")) await benchDownload();
  if (only.includes("ranged")) await benchRangedDownload();
  if (only.includes("generated")) await benchGeneratedLayer();
  const widths = [0, 1, 2, 3].map((i) => Math.max(...[["measure", "imgd", "baseline", "imgd vs baseline"], ...rows].map((r) => r[i].length)));
  const print = (r: string[]) => console.log(r.map((c, i) => c.padEnd(widths[i])).join("  "));
  console.log("\nimgd benchmark (in the VM, one run; ratios >1 mean imgd is faster, except pool and latency rows where they are imgd/baseline)");
  print(["measure", "imgd", "baseline", "imgd vs baseline"]);
  rows.forEach(print);
  helper.close();
  channel.close();
  s3.destroy();
}

main().catch((err) => {
  console.error(`bench: ${err instanceof Error ? err.stack : err}`);
  process.exit(1);
});
