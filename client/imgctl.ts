#!/usr/bin/env node
// imgctl: command-line client of the imgd agent.
import { parseArgs } from "node:util";
import { ClientError } from "nice-grpc";
import { versionLine, version } from "./version.ts";
import { connectImgd, DEFAULT_ADDR, ImageState, RunStatus, type Activation, type Image, type ImgdClient } from "./sdk.ts";

const USAGE = `usage: imgctl [--addr unix:/PATH|HOST:PORT] [--tls-ca F --tls-cert F --tls-key F] [--json] COMMAND
commands:
  version               print imgctl's version (and git commit)
  pull IMAGE            download and unpack IMAGE (a folder of layers in the bucket)
  activate IMAGE        create and activate a thin snapshot of IMAGE (pulls it first if needed)
  deactivate ID         remove an activation's device and snapshot
  delete [--force] IMAGE  forget IMAGE and remove its devices no other image uses; refused
                        while it has activations unless --force (which deactivates them)
  gc                    remove layer devices, blobs and temp files nothing references
  images                list images
  image IMAGE           show one image and its layers
  activations [IMAGE]   list activations
  pool                  show thin pool usage
  runs [--fsm F] [--id ID] [--limit N]   FSM run history
  doctor [--repair]     compare the agent's database with the thin pool and its temp files,
                        and say what a repair would do (read only); --repair carries the
                        repairs out (safe while the agent works); exit 0 when clean
                        (after the repairs), 1 when something disagrees
  doctor --adopt-pool | --wipe-pool   decide about a pool this agent's database does not
                        describe (POOL_MISMATCH: nothing is changed until then; either
                        takes the pool as the database's) and about thin ids it never
                        allocated (FOREIGN_THIN_ID; never repaired otherwise): keep them
                        reserved, or delete them from the pool; then repair the rest
The agent address defaults to $IMGD_ADDR or ${DEFAULT_ADDR} (the agent's Unix socket);
TLS files default to $IMGD_CLIENT_TLS_CA, $IMGD_CLIENT_TLS_CERT, $IMGD_CLIENT_TLS_KEY.
Exit codes: 0 done, 1 failed, 2 usage error.`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandLine(argv, {
      addr: { type: "string" },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      json: { type: "boolean", default: false },
      fsm: { type: "string" },
      id: { type: "string" },
      limit: { type: "string" },
      repair: { type: "boolean", default: false },
      "adopt-pool": { type: "boolean", default: false },
      "wipe-pool": { type: "boolean", default: false },
      force: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
  });
  const [command, ...args] = positionals;
  if (values.help || !command) {
    console.log(USAGE);
    return command || values.help ? 0 : 2;
  }
  if (command === "version") {
    const v = version();
    if (values.json) console.log(JSON.stringify(v));
    else console.log(versionLine("imgctl"));
    return 0;
  }
  const tlsGiven = values["tls-ca"] !== undefined || values["tls-cert"] !== undefined || values["tls-key"] !== undefined;
  const tls = tlsGiven ? { caFile: values["tls-ca"], certFile: values["tls-cert"], keyFile: values["tls-key"] } : undefined;
  const { client, channel } = connectImgd(values.addr, tls ? { tls } : {});
  const out = (human: () => void, data: unknown) => (values.json ? console.log(JSON.stringify(data, bigints, 2)) : human());
  try {
    switch (command) {
      case "pull":
        return await pull(client, one(args, "IMAGE"), values.json);
      case "activate": {
        const { activation } = await client.activateImage({ image: one(args, "IMAGE") });
        out(() => console.log(`activated ${activation!.image}: ${activation!.id} ${activation!.devicePath}`), activation);
        return 0;
      }
      case "deactivate": {
        const { activation } = await client.deactivateImage({ activationId: one(args, "ID") });
        out(() => console.log(`deactivated ${activation!.image}: ${activation!.id} (${activation!.devicePath} removed)`), activation);
        return 0;
      }
      case "delete": {
        const image = one(args, "IMAGE");
        const result = await client.deleteImage({ image, force: values.force });
        out(() => {
          for (const id of result.deactivated) console.log(`deactivated ${id}`);
          console.log(`deleted ${image}: ${result.removedDevices.length} device(s) removed${result.removedDevices.length ? ` (${result.removedDevices.join(", ")})` : ""}`);
        }, result);
        return 0;
      }
      case "gc": {
        const result = await client.collectGarbage({});
        out(() => {
          console.log(`removed ${result.removedDevices.length} device(s), ${result.removedBlobs.length} blob(s) (${mib(result.freedBlobBytes)}), ${result.removedTempFiles} temp file(s)`);
          for (const name of result.removedDevices) console.log(`  device ${name}`);
          for (const digest of result.removedBlobs) console.log(`  blob ${digest}`);
        }, result);
        return 0;
      }
      case "images": {
        const { images } = await client.listImages({});
        out(() => printImages(images), images);
        return 0;
      }
      case "image": {
        const { image } = await client.getImage({ image: one(args, "IMAGE") });
        out(() => printImage(image!), image);
        return 0;
      }
      case "activations": {
        const { activations } = await client.listActivations({ image: args[0] ?? "" });
        out(() => printActivations(activations), activations);
        return 0;
      }
      case "pool": {
        const pool = await client.getPool({});
        out(() => {
          console.log(`pool ${pool.name} (${pool.mode}${pool.errorIfNoSpace ? ", error_if_no_space" : ""}, block ${mib(pool.blockSizeBytes)})`);
          console.log(`  data      ${mib(pool.dataUsedBytes)} / ${mib(pool.dataTotalBytes)} used (${pct(pool.dataUsedBytes, pool.dataTotalBytes)})`);
          console.log(`  metadata  ${mib(pool.metadataUsedBytes)} / ${mib(pool.metadataTotalBytes)} used (${pct(pool.metadataUsedBytes, pool.metadataTotalBytes)})`);
        }, pool);
        return 0;
      }
      case "runs": {
        const { runs } = await client.listRuns({ fsm: values.fsm ?? "", resourceId: values.id ?? "", limit: nonNegativeInt("--limit", values.limit ?? "0") });
        out(() => {
          for (const r of runs) {
            console.log(`${r.id}  ${r.fsm.padEnd(8)} ${r.resourceId.padEnd(28)} ${RunStatus[r.status].toLowerCase().padEnd(9)} ${r.state.padEnd(12)} attempts=${r.attempts}${r.error ? `  error: ${r.error}` : ""}`);
          }
        }, runs);
        return 0;
      }
      case "doctor": {
        const report = await client.doctor({ repair: values.repair, adoptPool: values["adopt-pool"], wipePool: values["wipe-pool"] });
        out(() => {
          console.log(`thin ids: ${report.poolThinIds} in the pool, ${report.catalogThinIds} in the catalog`);
          for (const f of report.findings) {
            console.log(`${f.kind} ${f.subject}: ${f.detail}`);
            console.log(`  repair: ${f.repair}`);
            if (f.result) console.log(`  ${f.result}: ${f.note}`);
          }
          const repaired = values.repair || values["adopt-pool"] || values["wipe-pool"];
          if (report.clean) console.log(repaired && report.findings.length > 0 ? "clean after repair" : "clean");
        }, report);
        return report.clean ? 0 : 1;
      }
      default:
        console.error(`imgctl: unknown command ${JSON.stringify(command)}\n${USAGE}`);
        return 2;
    }
  } finally {
    channel.close();
  }
}

async function pull(client: ImgdClient, image: string, json: boolean): Promise<number> {
  let last = "";
  for await (const p of client.pullImage({ image })) {
    if (json) {
      console.log(JSON.stringify(p, bigints));
      continue;
    }
    const line =
      p.status === RunStatus.RUNNING
        ? `${p.joined ? "(joined) " : ""}${p.state}${p.layer ? ` layer ${p.layer}/${p.layerCount}` : ""}`
        : "";
    if (line && line !== last) console.log(`pull ${image}: ${line}${p.bytesTotal ? ` ${mib(p.bytesTotal)}` : ""}`);
    last = line || last;
    if (p.status === RunStatus.SUCCEEDED) console.log(`pull ${image}: ready (thin id ${p.image?.thinId}, ${p.image?.layers.length} layers, ${mib(p.image?.size ?? 0n)})`);
    if (p.status === RunStatus.FAILED) console.error(`pull ${image}: failed: ${p.error}`);
  }
  return 0;
}

function printImages(images: Image[]): void {
  if (images.length === 0) return console.log("no images");
  console.log(`${"IMAGE".padEnd(16)} ${"STATE".padEnd(8)} ${"LAYERS".padEnd(6)} ${"SIZE".padEnd(10)} THIN  CHAIN`);
  for (const i of images) {
    console.log(`${i.name.padEnd(16)} ${ImageState[i.state].toLowerCase().padEnd(8)} ${String(i.layers.length).padEnd(6)} ${mib(i.size).padEnd(10)} ${String(i.thinId).padEnd(5)} ${i.chainId.slice(0, 19)}${i.error ? `  error: ${i.error}` : ""}`);
  }
}

function printImage(i: Image): void {
  console.log(`${i.name}: ${ImageState[i.state].toLowerCase()}, thin id ${i.thinId}, ${mib(i.size)}${i.error ? `, error: ${i.error}` : ""}`);
  for (const l of i.layers) console.log(`  ${String(l.position).padStart(3)} ${l.key.padEnd(28)} ${mib(l.size).padEnd(10)} ${l.digest.slice(0, 19)}  thin ${l.thinId}`);
}

function printActivations(activations: Activation[]): void {
  if (activations.length === 0) return console.log("no activations");
  for (const a of activations) console.log(`${a.id}  ${a.image.padEnd(16)} thin ${String(a.thinId).padEnd(5)} ${a.devicePath}`);
}

function one(args: string[], name: string): string {
  if (args.length !== 1) throw new UsageError(`expected exactly one ${name}`);
  return args[0];
}

class UsageError extends Error {}

function nonNegativeInt(flag: string, text: string): number {
  if (!/^[0-9]{1,9}$/.test(text)) throw new UsageError(`${flag} expects a non-negative integer, got ${JSON.stringify(text)}`);
  return Number(text);
}

/** parseArgs, with an unknown or malformed flag as a UsageError (exit 2). */
function parseCommandLine<O extends NonNullable<Parameters<typeof parseArgs>[0]>["options"]>(args: string[], options: O) {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
}
const mib = (n: bigint | number) => `${(Number(n) / 1048576).toFixed(1)} MiB`;
const pct = (a: bigint, b: bigint) => (b === 0n ? "0%" : `${((Number(a) / Number(b)) * 100).toFixed(1)}%`);
const bigints = (_k: string, v: unknown) => (typeof v === "bigint" ? Number(v) : v);

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    if (err instanceof ClientError) console.error(`imgctl: ${err.details} (${err.code})`);
    else console.error(`imgctl: ${err instanceof Error ? err.message : String(err)}`);
    if (err instanceof UsageError) console.error(USAGE.split("\n")[0]);
    process.exit(err instanceof UsageError ? 2 : 1);
  },
);
