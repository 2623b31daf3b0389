// Agent configuration. AGENT_SETTINGS is the one list of the agent's settings: each has one
// name, IMGD_* (AWS_* for S3 credentials), a type with its range, a default and a meaning. A
// setting can come from a KEY=VALUE file (--config FILE or IMGD_CONFIG, the format systemd's
// EnvironmentFile= reads), from the environment, or from its flag (--state-dir for
// IMGD_STATE_DIR), in increasing order of precedence. The README's table is generated from it
// (node agent/config-doc.ts).
//
// Adding a setting: one line in AGENT_SETTINGS, e.g.
//   IMGD_RUN_HISTORY_MAX: setting(int(1, 1_000_000), "10000", "finished runs kept in the database"),
// then read it as config.values.IMGD_RUN_HISTORY_MAX (typed) and run `node agent/config-doc.ts`.
import { isIP } from "node:net";
import { CLIENT_SETTINGS } from "../client/connect.ts";
import { HELPER_SETTINGS } from "../privhelper/config.ts";
import { flag, int, loadSettings, oneOf, optional, parseFlags, path, setting, SettingsError, text, type Values } from "../privhelper/settings.ts";
import { DEFAULT_LAYER_LIMITS, type LayerLimits } from "./layers/validate.ts";
import { loadS3Config, S3_SETTINGS, type S3Config } from "./s3/config.ts";
import type { InterruptionPolicy } from "./fsm/types.ts";

const group = text("group name or gid", /^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$/, "is not a group name or gid");
const bytes = int(1, Number.MAX_SAFE_INTEGER);

export const DEFAULT_LISTEN = "unix:/run/imgd/agent/imgd.sock";
/** host:port, the host a name, an IPv4 address or a bracketed IPv6 address. */
const HOST_PORT = /^(\[[0-9a-fA-F:.]+\]|[^:\s/\[\]]+):[0-9]{1,5}$/;

/** Every setting of the agent: name → type/range, default, meaning. Adding one is one line here. */
export const AGENT_SETTINGS = {
  IMGD_CONFIG: optional(path(), "KEY=VALUE file of settings (the environment and flags override it); unknown keys in it are refused", { notInFile: true }),
  IMGD_STATE_DIR: setting(path(), "/var/lib/imgd", "SQLite database, blob store (blobs/), temporary downloads"),
  IMGD_LISTEN: setting(text("unix:/path or host:port", /^(unix:\/.+|\[[0-9a-fA-F:.]+\]:[0-9]{1,5}|[^:\s/]+:[0-9]{1,5})$/), DEFAULT_LISTEN, "gRPC address: a Unix socket (the default), or TCP with mutual TLS (IMGD_TLS_*) or IMGD_LISTEN_INSECURE_LOOPBACK"),
  IMGD_SOCKET_GROUP: optional(group, "group of the gRPC Unix socket (mode 0660): who may use the API", { defaultText: "imgd-clients if it exists, else the agent's group" }),
  IMGD_TLS_CERT: optional(path(), "TCP listen: the server's certificate chain (PEM)"),
  IMGD_TLS_KEY: optional(path(), "TCP listen: the server's private key (PEM)"),
  IMGD_TLS_CLIENT_CA: optional(path(), "TCP listen: CA (PEM) that signs the client certificates; a client without one is refused"),
  IMGD_LISTEN_INSECURE_LOOPBACK: setting(flag(), "0", "development only: plain TCP without TLS, on a loopback address (127.0.0.0/8, ::1) only"),
  IMGD_HELPER_SOCKET: setting(path(), "/run/imgd/privhelper.sock", "the root helper's socket"),
  IMGD_METRICS_LISTEN: optional(text("host:port", HOST_PORT), "Prometheus metrics over plain HTTP at http://host:port/metrics (read-only, no authentication: a loopback address, or one only the scraper reaches)", { defaultText: "off" }),
  IMGD_LOG_LEVEL: setting(oneOf("debug", "info", "warn", "error"), "info", "least severe log level written"),
  IMGD_DOWNLOAD_CONCURRENCY: setting(int(1, 9999), "4", "layers downloaded at once"),
  IMGD_APPLY_CONCURRENCY: setting(int(1, 9999), "1", "layers applied at once"),
  IMGD_FSM_MAX_QUICK_INTERRUPTIONS: setting(int(1, 1000), "5", "a run fails as a poison step after its step was interrupted this many times in a row, each soon after it began (IMGD_FSM_QUICK_INTERRUPTION_MS)"),
  IMGD_FSM_QUICK_INTERRUPTION_MS: setting(int(0, 86_400_000), "60000", "an interruption is quick when the agent died within this many ms of the step beginning to work"),
  IMGD_FSM_STOP_TIMEOUT_MS: setting(int(0, 600_000), "10000", "on SIGTERM, how long steps get to stop after their abort signal (those still working are recorded as interrupted)"),
  IMGD_RUN_HISTORY_MAX: setting(int(1, 10_000_000), "1000", "finished FSM runs kept for imgctl runs (with their events); pruned at start and hourly"),
  IMGD_RUN_HISTORY_DAYS: setting(int(1, 36_500), "30", "finished FSM runs older than this many days are pruned"),
  ...S3_SETTINGS,
  IMGD_LAYER_MAX_ENTRIES: setting(bytes, String(DEFAULT_LAYER_LIMITS.maxEntries), "most entries in one layer"),
  IMGD_LAYER_MAX_ENTRY_BYTES: setting(bytes, String(DEFAULT_LAYER_LIMITS.maxEntryBytes), "largest file in a layer, in bytes"),
  IMGD_LAYER_MAX_BYTES: setting(bytes, String(DEFAULT_LAYER_LIMITS.maxLayerBytes), "largest layer (the object as stored, and its tar), in bytes"),
  IMGD_LAYER_MAX_DECOMPRESSED_BYTES: setting(bytes, String(DEFAULT_LAYER_LIMITS.maxDecompressedBytes), "most bytes a compressed layer may decompress to"),
};

export type AgentSettings = Values<typeof AGENT_SETTINGS>;

/** Where the gRPC API listens, and who may reach it. */
export type ApiListen =
  | { kind: "unix"; path: string; group: string | undefined }
  | { kind: "tcp"; host: string; port: number; tls: { certFile: string; keyFile: string; clientCaFile: string } | undefined };

export interface AgentConfig {
  stateDir: string;
  /** IMGD_LISTEN as given (for logs); `api` is what it means. */
  listen: string;
  api: ApiListen;
  helperSocket: string;
  /** Where /metrics is served (IMGD_METRICS_LISTEN); undefined: not served. */
  metricsListen: { host: string; port: number } | undefined;
  logLevel: "debug" | "info" | "warn" | "error";
  downloadConcurrency: number;
  applyConcurrency: number;
  /** The FSM engine's policy for interruptions (poison steps) and graceful stops. */
  fsm: { interruptions: InterruptionPolicy; stopTimeoutMs: number };
  /** Finished FSM runs kept: at most this many (IMGD_RUN_HISTORY_MAX)... */
  runHistoryMax: number;
  /** ...and none older than this many days (IMGD_RUN_HISTORY_DAYS). */
  runHistoryDays: number;
  s3: S3Config;
  layerLimits: Pick<LayerLimits, "maxEntries" | "maxEntryBytes" | "maxLayerBytes" | "maxDecompressedBytes">;
  /** Every setting, typed, defaults applied. */
  values: AgentSettings;
  /** Raw settings after precedence, for the modules that still read keys (IMGD_LAYER_MAX_*, ...). */
  settings: Record<string, string | undefined>;
}

/** A command line the agent does not understand (main exits 2 with its usage). */
export class UsageError extends Error {}

export const AGENT_USAGE = "usage: imgd [--config FILE] [--SETTING VALUE]... [--version] [--help]   (settings: README.md, Configuration)";

/** Other imgd programs' names, tolerated in the agent's environment (one shell often serves all). */
const OTHER_PROGRAMS = [...Object.keys(HELPER_SETTINGS), ...Object.keys(CLIENT_SETTINGS)];

export function parseAgentArgs(argv: string[]): { flags: Record<string, string>; version: boolean; help: boolean } {
  try {
    const { flags, extra } = parseFlags(AGENT_SETTINGS, argv, { version: { type: "boolean" }, help: { type: "boolean" } });
    return { flags, version: extra.version === true, help: extra.help === true };
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
}

export function loadAgentConfig(argv: string[], env: NodeJS.ProcessEnv): AgentConfig {
  const { flags } = parseAgentArgs(argv);
  const file = flags.IMGD_CONFIG ?? (env.IMGD_CONFIG || undefined);
  const { values: v, raw } = loadSettings(AGENT_SETTINGS, { file, env, flags, otherPrograms: OTHER_PROGRAMS });
  return {
    stateDir: v.IMGD_STATE_DIR,
    listen: v.IMGD_LISTEN,
    api: apiListen(v),
    helperSocket: v.IMGD_HELPER_SOCKET,
    metricsListen: v.IMGD_METRICS_LISTEN === undefined ? undefined : hostPort("IMGD_METRICS_LISTEN", v.IMGD_METRICS_LISTEN),
    logLevel: v.IMGD_LOG_LEVEL,
    downloadConcurrency: v.IMGD_DOWNLOAD_CONCURRENCY,
    applyConcurrency: v.IMGD_APPLY_CONCURRENCY,
    fsm: {
      interruptions: { maxQuick: v.IMGD_FSM_MAX_QUICK_INTERRUPTIONS, quickWindowMs: v.IMGD_FSM_QUICK_INTERRUPTION_MS },
      stopTimeoutMs: v.IMGD_FSM_STOP_TIMEOUT_MS,
    },
    runHistoryMax: v.IMGD_RUN_HISTORY_MAX,
    runHistoryDays: v.IMGD_RUN_HISTORY_DAYS,
    s3: loadS3Config(raw),
    layerLimits: {
      maxEntries: v.IMGD_LAYER_MAX_ENTRIES,
      maxEntryBytes: v.IMGD_LAYER_MAX_ENTRY_BYTES,
      maxLayerBytes: v.IMGD_LAYER_MAX_BYTES,
      maxDecompressedBytes: v.IMGD_LAYER_MAX_DECOMPRESSED_BYTES,
    },
    values: v,
    settings: raw,
  };
}

/**
 * The API's access rule (one home): a Unix socket (mode 0660, a group), or TCP only with mutual
 * TLS, or plain TCP on a loopback address when the operator says so for development.
 */
function apiListen(v: AgentSettings): ApiListen {
  const tlsFiles = { IMGD_TLS_CERT: v.IMGD_TLS_CERT, IMGD_TLS_KEY: v.IMGD_TLS_KEY, IMGD_TLS_CLIENT_CA: v.IMGD_TLS_CLIENT_CA };
  const given = Object.entries(tlsFiles).filter(([, f]) => f !== undefined);
  if (v.IMGD_LISTEN.startsWith("unix:")) {
    const socketPath = v.IMGD_LISTEN.slice("unix:".length);
    const problem = path().schema.safeParse(socketPath);
    if (!problem.success) throw new SettingsError(`IMGD_LISTEN=${v.IMGD_LISTEN}: the socket ${problem.error.issues[0]?.message}`);
    if (given.length > 0) throw new SettingsError(`${given.map(([k]) => k).join(", ")}: TLS applies to a TCP IMGD_LISTEN only (the Unix socket is guarded by its group)`);
    return { kind: "unix", path: socketPath, group: v.IMGD_SOCKET_GROUP };
  }
  const { host, port } = hostPort("IMGD_LISTEN", v.IMGD_LISTEN);
  if (given.length === 3) {
    return { kind: "tcp", host, port, tls: { certFile: v.IMGD_TLS_CERT!, keyFile: v.IMGD_TLS_KEY!, clientCaFile: v.IMGD_TLS_CLIENT_CA! } };
  }
  if (given.length > 0) {
    const missing = Object.keys(tlsFiles).filter((k) => !given.some(([g]) => g === k));
    throw new SettingsError(`mutual TLS needs IMGD_TLS_CERT, IMGD_TLS_KEY and IMGD_TLS_CLIENT_CA together; missing ${missing.join(", ")}`);
  }
  if (!v.IMGD_LISTEN_INSECURE_LOOPBACK) {
    throw new SettingsError(
      `IMGD_LISTEN=${v.IMGD_LISTEN} is a TCP address and would let anyone who reaches it drive imgd: set IMGD_TLS_CERT, IMGD_TLS_KEY and IMGD_TLS_CLIENT_CA (mutual TLS), ` +
        `or listen on a Unix socket (unix:/path, the default ${DEFAULT_LISTEN}), or for development on a loopback address set IMGD_LISTEN_INSECURE_LOOPBACK=1`,
    );
  }
  if (!isLoopback(host)) {
    throw new SettingsError(`IMGD_LISTEN_INSECURE_LOOPBACK=1 allows only a loopback address (127.0.0.0/8 or ::1), not ${JSON.stringify(host)}`);
  }
  return { kind: "tcp", host, port, tls: undefined };
}

/** Splits a host:port setting (brackets off an IPv6 host); the port must be 0..65535. */
function hostPort(name: string, value: string): { host: string; port: number } {
  const colon = value.lastIndexOf(":");
  const host = value.slice(0, colon).replace(/^\[(.*)\]$/, "$1");
  const port = Number(value.slice(colon + 1));
  if (port > 65535) throw new SettingsError(`${name}=${value}: port out of range`);
  return { host, port };
}

/** A literal loopback address: names are refused, what they resolve to can change. */
export function isLoopback(host: string): boolean {
  if (isIP(host) === 4) return host.startsWith("127.");
  if (isIP(host) === 6) return host === "::1" || /^(0{1,4}:){7}0{0,3}1$/.test(host);
  return false;
}

function boundedInt(name: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!/^[0-9]+$/.test(value) || n < min || n > max) throw new Error(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(value)}`);
  return n;
}
