// Agent configuration. Every setting has one name, IMGD_*; it can come from a KEY=VALUE file
// (--config FILE or IMGD_CONFIG, the format systemd's EnvironmentFile= reads), from the
// environment, or from a command-line flag, in increasing order of precedence.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

export interface AgentConfig {
  stateDir: string;
  listen: string;
  helperSocket: string;
  logLevel: "debug" | "info" | "warn" | "error";
  downloadConcurrency: number;
  applyConcurrency: number;
  /** Finished FSM runs kept: at most this many (IMGD_RUN_HISTORY_MAX)... */
  runHistoryMax: number;
  /** ...and none older than this many days (IMGD_RUN_HISTORY_DAYS). */
  runHistoryDays: number;
  /**
   * Raw settings, for the modules that read their own: agent/s3/config.ts reads IMGD_S3_* (endpoint,
   * bucket, timeouts, max layer count) and IMGD_DOWNLOAD_* (retries, backoff, ranged GETs).
   */
  settings: Record<string, string | undefined>;
}

const FLAGS: Record<string, string> = {
  "state-dir": "IMGD_STATE_DIR",
  listen: "IMGD_LISTEN",
  "helper-socket": "IMGD_HELPER_SOCKET",
  "s3-endpoint": "IMGD_S3_ENDPOINT",
  bucket: "IMGD_S3_BUCKET",
  prefix: "IMGD_S3_PREFIX",
  region: "IMGD_S3_REGION",
  "log-level": "IMGD_LOG_LEVEL",
};

export function loadAgentConfig(argv: string[], env: NodeJS.ProcessEnv): AgentConfig {
  const options = Object.fromEntries(Object.keys(FLAGS).map((f) => [f, { type: "string" as const }]));
  const { values } = parseArgs({ args: argv, options: { ...options, config: { type: "string" } }, strict: true }) as { values: Record<string, string | undefined> };
  const file = values.config ?? env.IMGD_CONFIG;
  const settings: Record<string, string | undefined> = { ...(file ? readEnvFile(file) : {}), ...env };
  for (const [flag, key] of Object.entries(FLAGS)) {
    if (values[flag] !== undefined) settings[key] = values[flag];
  }
  const logLevel = settings.IMGD_LOG_LEVEL ?? "info";
  if (!["debug", "info", "warn", "error"].includes(logLevel)) throw new Error(`IMGD_LOG_LEVEL: unknown level ${JSON.stringify(logLevel)}`);
  return {
    stateDir: absolutePath("IMGD_STATE_DIR", settings.IMGD_STATE_DIR ?? "/var/lib/imgd"),
    listen: settings.IMGD_LISTEN ?? "127.0.0.1:50051",
    helperSocket: absolutePath("IMGD_HELPER_SOCKET", settings.IMGD_HELPER_SOCKET ?? "/run/imgd/privhelper.sock"),
    logLevel: logLevel as AgentConfig["logLevel"],
    downloadConcurrency: positiveInt("IMGD_DOWNLOAD_CONCURRENCY", settings.IMGD_DOWNLOAD_CONCURRENCY ?? "4"),
    applyConcurrency: positiveInt("IMGD_APPLY_CONCURRENCY", settings.IMGD_APPLY_CONCURRENCY ?? "1"),
    runHistoryMax: boundedInt("IMGD_RUN_HISTORY_MAX", settings.IMGD_RUN_HISTORY_MAX ?? "1000", 1, 10_000_000),
    runHistoryDays: boundedInt("IMGD_RUN_HISTORY_DAYS", settings.IMGD_RUN_HISTORY_DAYS ?? "30", 1, 36_500),
    settings,
  };
}

/** Reads KEY=VALUE lines; blank lines and # comments are skipped; only IMGD_* and AWS_* keys. */
export function readEnvFile(path: string): Record<string, string> {
  const out: Record<string, string> = {};
  readFileSync(path, "utf8").split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const match = /^((?:IMGD|AWS)_[A-Z0-9_]+)=(.*)$/.exec(line);
    if (!match) throw new Error(`${path}:${i + 1}: expected IMGD_*=value or AWS_*=value`);
    out[match[1]] = match[2].replace(/^"(.*)"$/, "$1");
  });
  return out;
}

function absolutePath(name: string, value: string): string {
  if (!value.startsWith("/") || value.includes("\0")) throw new Error(`${name} must be an absolute path, got ${JSON.stringify(value)}`);
  return value;
}

function positiveInt(name: string, value: string): number {
  if (!/^[1-9][0-9]{0,3}$/.test(value)) throw new Error(`${name} must be an integer from 1 to 9999, got ${JSON.stringify(value)}`);
  return Number(value);
}

function boundedInt(name: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!/^[0-9]+$/.test(value) || n < min || n > max) throw new Error(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(value)}`);
  return n;
}
