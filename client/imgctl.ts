#!/usr/bin/env node
// imgctl: command-line client of the imgd agent.
import { parseArgs } from "node:util";
import { ClientError, Status } from "nice-grpc";
import { create, toJson, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { versionLine, version } from "./version.ts";
import {
  connectImgd,
  DEFAULT_ADDR,
  FindingKind,
  ImageState,
  ImgdError,
  PoolMode,
  RepairResult,
  RunKind,
  RunStatus,
  ActivateImageResponseSchema,
  CollectGarbageResponseSchema,
  DeactivateImageResponseSchema,
  DeleteImageResponseSchema,
  DoctorResponseSchema,
  GetImageResponseSchema,
  GetPoolResponseSchema,
  GetVersionResponseSchema,
  ListActivationsResponseSchema,
  ListImagesResponseSchema,
  ListRunsResponseSchema,
  PullImageResponseSchema,
  type Activation,
  type Image,
  type ImgdClient,
  type PullImageResponse,
} from "./sdk.ts";
import { jsonLine } from "./proto-json.ts";
import { logView, quietView, terminalView, type PullView } from "./pull-output.ts";

const USAGE = `usage: imgctl [--addr unix:/PATH|HOST:PORT] [--tls-ca F --tls-cert F --tls-key F] [--json | --quiet] COMMAND
commands:
  version               print imgctl's version (and git commit)
  pull IMAGE            download and unpack IMAGE (a folder of layers in the bucket)
  activate [--name NAME] [--label KEY=VALUE]... IMAGE
                        create and activate a thin snapshot of IMAGE (pulls it first if
                        needed); with --name, running it again returns the same activation
  deactivate ID | --name NAME [--allow-missing]
                        remove an activation's device and snapshot (--allow-missing: one
                        that does not exist is not an error)
  delete [--force] IMAGE  forget IMAGE and remove its devices no other image uses; refused
                        while it has activations unless --force (which deactivates them)
  gc                    remove layer devices, blobs and temp files nothing references
  images                list images
  image IMAGE           show one image and its layers
  activations [IMAGE]   list activations
  pool                  show thin pool usage
  runs [--fsm pull|activate|deactivate|delete] [--id ID] [--limit N]
                        FSM run history, newest first (default 100 runs)
  doctor [--repair]     compare the agent's database with the thin pool and its temp files,
                        and say what a repair would do (read only); --repair carries the
                        repairs out (safe while the agent works); exit 0 when clean
                        (after the repairs), 1 when something disagrees
  doctor --adopt-pool | --wipe-pool   decide about a pool this agent's database does not
                        describe (POOL_MISMATCH: nothing is changed until then; either
                        takes the pool as the database's) and about thin ids it never
                        allocated (FOREIGN_THIN_ID; never repaired otherwise): keep them
                        reserved, or delete them from the pool; then repair the rest
--json prints each answer as proto3 JSON (as grpcurl does), one message per line (pull: one
line per stream message); --quiet prints nothing but errors (the exit code says how it went).
pull draws its progress in place on a terminal, and writes one line per layer change otherwise.
The agent address defaults to $IMGD_ADDR or ${DEFAULT_ADDR} (the agent's Unix socket);
TLS files default to $IMGD_CLIENT_TLS_CA, $IMGD_CLIENT_TLS_CERT, $IMGD_CLIENT_TLS_KEY.
A failed call prints "error: REASON: message" (REASON from the agent's google.rpc.ErrorInfo, or
the gRPC status name) on stderr and exits by its status:
  0 done          1 failed (ABORTED, INTERNAL, ...; doctor: not clean)
  2 usage error or INVALID_ARGUMENT           3 NOT_FOUND
  4 FAILED_PRECONDITION or ALREADY_EXISTS (conflicts with the current state)
  5 RESOURCE_EXHAUSTED (pool full)            6 UNAVAILABLE or DEADLINE_EXCEEDED (try again)`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandLine(argv, {
      addr: { type: "string" },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      json: { type: "boolean", default: false },
      quiet: { type: "boolean", short: "q", default: false },
      fsm: { type: "string" },
      id: { type: "string" },
      limit: { type: "string" },
      name: { type: "string" },
      label: { type: "string", multiple: true },
      "allow-missing": { type: "boolean", default: false },
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
  if (values.json && values.quiet) throw new UsageError("--json and --quiet exclude each other");
  const tlsGiven = values["tls-ca"] !== undefined || values["tls-cert"] !== undefined || values["tls-key"] !== undefined;
  const tls = tlsGiven ? { caFile: values["tls-ca"], certFile: values["tls-cert"], keyFile: values["tls-key"] } : undefined;
  const { client, channel } = connectImgd(values.addr, tls ? { tls } : {});
  if (command === "version") {
    try {
      return await printVersions(client, Boolean(values.json));
    } finally {
      channel.close();
    }
  }
  // The answer as proto3 JSON, or for people (or nothing with --quiet).
  const out = <Desc extends DescMessage>(human: () => void, schema: Desc, message: MessageShape<Desc>) => {
    if (values.json) console.log(jsonLine(schema, message));
    else if (!values.quiet) human();
  };
  try {
    switch (command) {
      case "pull":
        return await pull(client, one(args, "IMAGE"), values.json ? "json" : values.quiet ? "quiet" : process.stdout.isTTY ? "terminal" : "log");
      case "activate": {
        const labels = Object.fromEntries((values.label ?? []).map(label));
        const answer = await client.activateImage({ image: one(args, "IMAGE"), name: values.name ?? "", labels });
        const activation = answer.activation!;
        out(() => console.log(`activated ${activation.image}: ${activation.name} ${activation.id} ${activation.devicePath}`), ActivateImageResponseSchema, answer);
        return 0;
      }
      case "deactivate": {
        if (values.name !== undefined && args.length > 0) throw new UsageError("give an activation ID or --name NAME, not both");
        const target = values.name !== undefined ? { name: values.name } : { activationId: one(args, "ID") };
        const answer = await client.deactivateImage({ ...target, allowMissing: values["allow-missing"] });
        const activation = answer.activation;
        out(
          () => console.log(activation ? `deactivated ${activation.image}: ${activation.name} ${activation.id} (${activation.devicePath} removed)` : `no such activation: nothing to do`),
          DeactivateImageResponseSchema,
          answer,
        );
        return 0;
      }
      case "delete": {
        const image = one(args, "IMAGE");
        const result = await client.deleteImage({ image, force: values.force });
        out(() => {
          for (const id of result.deactivated) console.log(`deactivated ${id}`);
          console.log(`deleted ${image}: ${result.removedDevices.length} device(s) removed${result.removedDevices.length ? ` (${result.removedDevices.join(", ")})` : ""}`);
        }, DeleteImageResponseSchema, result);
        return 0;
      }
      case "gc": {
        const result = await client.collectGarbage({});
        out(() => {
          console.log(`removed ${result.removedDevices.length} device(s), ${result.removedBlobs.length} blob(s) (${mib(result.freedBlobBytes)}), ${result.removedTempFiles} temp file(s)`);
          for (const name of result.removedDevices) console.log(`  device ${name}`);
          for (const digest of result.removedBlobs) console.log(`  blob ${digest}`);
        }, CollectGarbageResponseSchema, result);
        return 0;
      }
      case "images": {
        const images = await allPages(async (pageToken) => {
          const page = await client.listImages({ pageToken });
          return [page.images, page.nextPageToken];
        });
        out(() => printImages(images), ListImagesResponseSchema, create(ListImagesResponseSchema, { images }));
        return 0;
      }
      case "image": {
        const answer = await client.getImage({ image: one(args, "IMAGE") });
        out(() => printImage(answer.image!), GetImageResponseSchema, answer);
        return 0;
      }
      case "activations": {
        const activations = await allPages(async (pageToken) => {
          const page = await client.listActivations({ image: args[0] ?? "", pageToken });
          return [page.activations, page.nextPageToken];
        });
        // All pages as one answer: --json prints what one call with a large enough page would.
        out(() => printActivations(activations), ListActivationsResponseSchema, create(ListActivationsResponseSchema, { activations }));
        return 0;
      }
      case "pool": {
        const pool = await client.getPool({});
        out(() => {
          console.log(`pool ${pool.name} (${POOL_MODE_WORDS[pool.mode]}${pool.errorIfNoSpace ? ", error_if_no_space" : ""}, block ${mib(pool.blockSizeBytes)})`);
          console.log(`  data      ${mib(pool.dataUsedBytes)} / ${mib(pool.dataTotalBytes)} used (${pct(pool.dataUsedBytes, pool.dataTotalBytes)})`);
          console.log(`  metadata  ${mib(pool.metadataUsedBytes)} / ${mib(pool.metadataTotalBytes)} used (${pct(pool.metadataUsedBytes, pool.metadataTotalBytes)})`);
        }, GetPoolResponseSchema, pool);
        return 0;
      }
      case "runs": {
        const fsm = values.fsm === undefined ? RunKind.UNSPECIFIED : runKind(values.fsm);
        const limit = nonNegativeInt("--limit", values.limit ?? "100");
        const runs = await allPages(async (pageToken, wanted) => {
          const page = await client.listRuns({ fsm, resourceId: values.id ?? "", pageSize: Math.min(wanted, 1000), pageToken });
          return [page.runs, page.nextPageToken];
        }, limit);
        out(() => {
          for (const r of runs) {
            console.log(`${r.id}  ${RunKind[r.fsm].toLowerCase().padEnd(10)} ${r.resourceId.padEnd(28)} ${RunStatus[r.status].toLowerCase().padEnd(9)} ${r.state.padEnd(12)} attempts=${r.attempts}${r.error ? `  error: ${r.error}` : ""}`);
          }
        }, ListRunsResponseSchema, create(ListRunsResponseSchema, { runs }));
        return 0;
      }
      case "doctor": {
        const report = await client.doctor({ repair: values.repair, adoptPool: values["adopt-pool"], wipePool: values["wipe-pool"] });
        out(() => {
          console.log(`thin ids: ${report.poolThinIds} in the pool, ${report.catalogThinIds} in the catalog`);
          for (const f of report.findings) {
            console.log(`${FindingKind[f.kind]} ${f.subject}: ${f.detail}`);
            console.log(`  repair: ${f.repair}`);
            if (f.result !== RepairResult.UNSPECIFIED) console.log(`  ${RepairResult[f.result].toLowerCase()}: ${f.note}`);
          }
          const repaired = values.repair || values["adopt-pool"] || values["wipe-pool"];
          if (report.clean) console.log(repaired && report.findings.length > 0 ? "clean after repair" : "clean");
        }, DoctorResponseSchema, report);
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

/** Follows the pull's stream; a failed pull ends it with an error (exit 1, printed by main). */
async function pull(client: ImgdClient, image: string, mode: "json" | "quiet" | "terminal" | "log"): Promise<number> {
  const json: PullView = { update: (m) => console.log(jsonLine(PullImageResponseSchema, m)), finish() {} };
  const views = {
    json: () => json,
    quiet: quietView,
    terminal: () => terminalView(image, process.stdout),
    log: () => logView(image, (line) => console.log(line)),
  };
  const view = views[mode]();
  let last: PullImageResponse | undefined;
  try {
    for await (const message of client.pullImage({ image })) {
      last = message;
      view.update(message);
    }
  } finally {
    view.finish(last);
  }
  return last?.status === RunStatus.SUCCEEDED ? 0 : 1;
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
  for (const a of activations) {
    const labels = Object.entries(a.labels).map(([k, v]) => `${k}=${v}`).join(",");
    console.log(`${a.id}  ${a.name.padEnd(16)} ${a.image.padEnd(16)} thin ${String(a.thinId).padEnd(5)} ${a.devicePath}${labels ? `  ${labels}` : ""}`);
  }
}

/**
 * imgctl's own version, then the agent's (GetVersion), as kubectl does: a mismatch is the first
 * thing to rule out. An agent that does not answer within 3 s is reported, not an error: exit 0.
 */
async function printVersions(client: ImgdClient, json: boolean): Promise<number> {
  const agent = await client.getVersion({}, { signal: AbortSignal.timeout(3000) }).then(
    (answer) => ({ answer }),
    (err: unknown) => ({ error: err instanceof Error ? err.message.split("\n")[0]! : String(err) }),
  );
  if (json) {
    const agentJson = "answer" in agent ? toJson(GetVersionResponseSchema, agent.answer) : { error: agent.error };
    console.log(JSON.stringify({ imgctl: version(), agent: agentJson }));
  } else {
    console.log(versionLine("imgctl"));
    console.log("answer" in agent ? `agent: imgd ${agent.answer.version}, API ${agent.answer.api}` : `agent: not reachable (${agent.error})`);
  }
  return 0;
}

/** Every item of a paged list (at most `limit`), following next_page_token; `wanted` is what is still missing. */
async function allPages<T>(page: (pageToken: string, wanted: number) => Promise<[T[], string]>, limit = Infinity): Promise<T[]> {
  const items: T[] = [];
  let pageToken = "";
  while (items.length < limit) {
    const [more, next] = await page(pageToken, limit - items.length);
    items.push(...more);
    pageToken = next;
    if (!pageToken) break;
  }
  return items;
}

function label(text: string): [string, string] {
  const eq = text.indexOf("=");
  if (eq <= 0) throw new UsageError(`--label expects KEY=VALUE, got ${JSON.stringify(text)}`);
  return [text.slice(0, eq), text.slice(eq + 1)];
}

function runKind(text: string): RunKind {
  const kinds: Record<string, RunKind> = { pull: RunKind.PULL, activate: RunKind.ACTIVATE, deactivate: RunKind.DEACTIVATE, delete: RunKind.DELETE };
  const kind = kinds[text];
  if (kind === undefined) throw new UsageError(`--fsm expects pull, activate, deactivate or delete, got ${JSON.stringify(text)}`);
  return kind;
}

/** The kernel's words for the pool's mode, as dmsetup status shows them. */
const POOL_MODE_WORDS: Record<PoolMode, string> = {
  [PoolMode.UNSPECIFIED]: "unknown mode",
  [PoolMode.READ_WRITE]: "rw",
  [PoolMode.READ_ONLY]: "ro",
  [PoolMode.OUT_OF_DATA_SPACE]: "out_of_data_space",
  [PoolMode.FAILED]: "fail",
};

/** imgctl's exit code for a failed call, by status class (documented in USAGE and the README). */
function exitCodeFor(code: Status): number {
  switch (code) {
    case Status.INVALID_ARGUMENT:
      return 2;
    case Status.NOT_FOUND:
      return 3;
    case Status.FAILED_PRECONDITION:
    case Status.ALREADY_EXISTS:
      return 4;
    case Status.RESOURCE_EXHAUSTED:
      return 5;
    case Status.UNAVAILABLE:
    case Status.DEADLINE_EXCEEDED:
      return 6;
    default:
      return 1;
  }
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

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    if (err instanceof ClientError) {
      const reason = err instanceof ImgdError ? err.reason : Status[err.code];
      console.error(`error: ${reason}: ${err.details}`);
      process.exit(exitCodeFor(err.code));
    }
    console.error(`imgctl: ${err instanceof Error ? err.message : String(err)}`);
    if (err instanceof UsageError) console.error(USAGE.split("\n")[0]);
    process.exit(err instanceof UsageError ? 2 : 1);
  },
);
