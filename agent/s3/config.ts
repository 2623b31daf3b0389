// Where the images live in S3 and how layers are downloaded: the S3 part of the agent's settings
// schema, and the S3Config read from it.
import { int, optional, parseValues, setting, text } from "../../privhelper/settings.ts";

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3Timeouts {
  /** Time allowed to establish the TCP/TLS connection. */
  connectMs: number;
  /** Time allowed from sending a request until the response headers arrive. */
  requestMs: number;
  /** Longest silence allowed on the socket at any time, response body included. */
  idleMs: number;
}

export interface S3Config {
  /** Custom endpoint (s3rver, MinIO, a proxy); unset = AWS. Implies path-style addressing. */
  endpoint?: string;
  bucket: string;
  /** Key prefix of the image folders: "" or ends with "/". */
  prefix: string;
  region: string;
  /** Unset = anonymous, unsigned requests (the challenge bucket is public). */
  credentials?: S3Credentials;
  /** Overrides of the client's timeouts; tests shorten them. */
  timeouts?: Partial<S3Timeouts>;
  /** Most objects an image folder may hold; a larger folder is refused after listing at most this many (default MAX_LAYERS_DEFAULT). */
  maxLayers?: number;
  /** Overrides of how layers are downloaded (DOWNLOAD_DEFAULTS). */
  download?: Partial<DownloadPolicy>;
}

/** How one layer object is downloaded: retries inside the download, and parallel ranged GETs. */
export interface DownloadPolicy {
  /** Tries of each byte range before the download gives up (the pull FSM may then retry it all). */
  attempts: number;
  /** Backoff: the n-th retry waits a random time in [0, min(backoffMaxMs, backoffMs * 2^n)] (full jitter). */
  backoffMs: number;
  backoffMaxMs: number;
  /** A server's Retry-After is honoured up to this long. */
  retryAfterMaxMs: number;
  /** Times the object may be replaced during one download before it is refused as unstable. */
  maxObjectChanges: number;
  /** Objects of at least this many bytes are fetched as parallel ranged GETs. */
  parallelThreshold: number;
  partSize: number;
  partConcurrency: number;
}

/** The S3 and download settings: name → type/range, default, meaning (part of the agent's schema, agent/config.ts). */
export const S3_SETTINGS = {
  IMGD_S3_ENDPOINT: optional(text("http(s) URL", endpointProblem), "custom S3 endpoint (s3rver, MinIO, a proxy; path-style addressing); unset = AWS"),
  IMGD_S3_BUCKET: setting(text("bucket name", (v) => bucketNameProblem(v)), "flyio-platform-hiring-challenge", "bucket holding the images"),
  IMGD_S3_PREFIX: setting(text('"" or a key prefix ending in /', prefixProblem, "", { emptyIsValue: true }), "images/", "an image is the folder <prefix><image>/ (\"\" = the bucket's root)"),
  IMGD_S3_REGION: setting(text("region name", /^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$/, "expected a region name such as us-east-1"), "us-east-1", "the bucket's region"),
  AWS_ACCESS_KEY_ID: optional(text("printable ASCII", /^[\x21-\x7e]*$/, "must be printable ASCII without spaces"), "S3 credentials, with AWS_SECRET_ACCESS_KEY; both unset = anonymous, unsigned requests", { secret: true }),
  AWS_SECRET_ACCESS_KEY: optional(text("printable ASCII", /^[\x21-\x7e]*$/, "must be printable ASCII without spaces"), "S3 secret key (never logged; keep it in the config file, mode 0600)", { secret: true }),
  AWS_SESSION_TOKEN: optional(text("printable ASCII", /^[\x21-\x7e]*$/, "must be printable ASCII without spaces"), "S3 session token, for temporary credentials", { secret: true }),
  IMGD_S3_MAX_LAYERS: setting(int(1, 1_000_000), "1000", "an image folder with more objects is refused after listing this many, before any download"),
  IMGD_S3_CONNECT_TIMEOUT_MS: setting(int(1, 3_600_000), "10000", "S3 timeout: TCP/TLS connect"),
  IMGD_S3_FIRST_BYTE_TIMEOUT_MS: setting(int(1, 3_600_000), "60000", "S3 timeout: request sent to response headers"),
  IMGD_S3_IDLE_TIMEOUT_MS: setting(int(1, 3_600_000), "30000", "S3 timeout: longest silence on the socket, mid-body included"),
  IMGD_DOWNLOAD_ATTEMPTS: setting(int(1, 100), "6", "tries of each byte range of a layer before the download gives up (the pull FSM may retry the step)"),
  IMGD_DOWNLOAD_BACKOFF_MS: setting(int(0, 600_000), "200", "retry n waits a random time in [0, min(max, base*2^n)] (full jitter): the base"),
  IMGD_DOWNLOAD_BACKOFF_MAX_MS: setting(int(0, 3_600_000), "10000", "the longest backoff between two tries"),
  IMGD_DOWNLOAD_RETRY_AFTER_MAX_MS: setting(int(0, 3_600_000), "30000", "a server's Retry-After is honoured up to this long"),
  IMGD_DOWNLOAD_MAX_OBJECT_CHANGES: setting(int(0, 100), "3", "times a layer object may be replaced during one download before it is refused"),
  IMGD_DOWNLOAD_PARALLEL_THRESHOLD: setting(int(1, Number.MAX_SAFE_INTEGER), String(64 * 1024 * 1024), "layers of at least this many bytes are fetched as parallel ranged GETs"),
  IMGD_DOWNLOAD_PART_SIZE: setting(int(1024, 5 * 1024 ** 3), String(16 * 1024 * 1024), "bytes per ranged GET of a parallel download"),
  IMGD_DOWNLOAD_PART_CONCURRENCY: setting(int(1, 64), "4", "ranged GETs at once per layer (at most IMGD_DOWNLOAD_CONCURRENCY times this many connections)"),
};

// Where each numeric setting goes.
const TIMEOUT_FIELDS: Array<[keyof typeof S3_SETTINGS, keyof S3Timeouts]> = [
  ["IMGD_S3_CONNECT_TIMEOUT_MS", "connectMs"],
  ["IMGD_S3_FIRST_BYTE_TIMEOUT_MS", "requestMs"],
  ["IMGD_S3_IDLE_TIMEOUT_MS", "idleMs"],
];
const DOWNLOAD_FIELDS: Array<[keyof typeof S3_SETTINGS, keyof DownloadPolicy]> = [
  ["IMGD_DOWNLOAD_ATTEMPTS", "attempts"],
  ["IMGD_DOWNLOAD_BACKOFF_MS", "backoffMs"],
  ["IMGD_DOWNLOAD_BACKOFF_MAX_MS", "backoffMaxMs"],
  ["IMGD_DOWNLOAD_RETRY_AFTER_MAX_MS", "retryAfterMaxMs"],
  ["IMGD_DOWNLOAD_MAX_OBJECT_CHANGES", "maxObjectChanges"],
  ["IMGD_DOWNLOAD_PARALLEL_THRESHOLD", "parallelThreshold"],
  ["IMGD_DOWNLOAD_PART_SIZE", "partSize"],
  ["IMGD_DOWNLOAD_PART_CONCURRENCY", "partConcurrency"],
];

const DEFAULTS = parseValues(S3_SETTINGS, {}, []);
export const DOWNLOAD_DEFAULTS: DownloadPolicy = Object.fromEntries(DOWNLOAD_FIELDS.map(([key, field]) => [field, DEFAULTS[key]])) as unknown as DownloadPolicy;
export const DEFAULT_TIMEOUTS: S3Timeouts = Object.fromEntries(TIMEOUT_FIELDS.map(([key, field]) => [field, DEFAULTS[key]])) as unknown as S3Timeouts;
export const MAX_LAYERS_DEFAULT = DEFAULTS.IMGD_S3_MAX_LAYERS;

export const S3_DEFAULTS = {
  bucket: DEFAULTS.IMGD_S3_BUCKET,
  prefix: DEFAULTS.IMGD_S3_PREFIX,
  region: DEFAULTS.IMGD_S3_REGION,
} as const;

export class S3ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "S3ConfigError";
  }
}

type Settings = Record<string, string | undefined>;

/**
 * Reads the S3 settings (S3_SETTINGS) from the agent's merged settings; throws S3ConfigError
 * naming every setting that is wrong. Timeouts, download policy and max layers appear in the
 * result only when set (the client's defaults apply otherwise).
 */
export function loadS3Config(env: Settings): S3Config {
  const problems: string[] = [];
  const v = parseValues(S3_SETTINGS, env, problems);
  const isSet = (key: string) => env[key] !== undefined && env[key] !== "";

  let credentials: S3Credentials | undefined;
  const { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey, AWS_SESSION_TOKEN: sessionToken } = v;
  if (accessKeyId !== undefined || secretAccessKey !== undefined || sessionToken !== undefined) {
    // Secrets are never echoed, only said to be missing or malformed.
    if (accessKeyId === undefined || secretAccessKey === undefined) {
      problems.push("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (leave both unset for anonymous access)");
    } else {
      credentials = { accessKeyId, secretAccessKey, ...(sessionToken !== undefined ? { sessionToken } : {}) };
    }
  }
  const timeouts: Partial<S3Timeouts> = {};
  for (const [key, field] of TIMEOUT_FIELDS) if (isSet(key)) timeouts[field] = v[key] as number;
  const download: Partial<DownloadPolicy> = {};
  for (const [key, field] of DOWNLOAD_FIELDS) if (isSet(key)) download[field] = v[key] as number;

  if (problems.length > 0) throw new S3ConfigError(`invalid S3 settings: ${problems.join("; ")}`);
  return {
    ...(v.IMGD_S3_ENDPOINT !== undefined ? { endpoint: v.IMGD_S3_ENDPOINT } : {}),
    bucket: v.IMGD_S3_BUCKET,
    prefix: v.IMGD_S3_PREFIX,
    region: v.IMGD_S3_REGION,
    ...(credentials ? { credentials } : {}),
    ...(Object.keys(timeouts).length > 0 ? { timeouts } : {}),
    ...(isSet("IMGD_S3_MAX_LAYERS") ? { maxLayers: v.IMGD_S3_MAX_LAYERS } : {}),
    ...(Object.keys(download).length > 0 ? { download } : {}),
  };
}

/** S3 bucket naming rules (the current ones, without legacy uppercase/underscore names). */
export function bucketNameProblem(name: string): string | undefined {
  if (name.length < 3 || name.length > 63) return "bucket names are 3 to 63 characters long";
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(name)) return "bucket names use a-z, 0-9, '.' and '-', and start and end with a letter or digit";
  if (/\.\.|\.-|-\./.test(name)) return "bucket names have no '..', '.-' or '-.'";
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(name)) return "bucket names are not IP addresses";
  if (/^(xn--|sthree-|amzn-s3-demo-)/.test(name) || /(-s3alias|--ol-s3|\.mrap|--x-s3|--table-s3)$/.test(name)) return "reserved bucket name prefix or suffix";
  return undefined;
}

export function prefixProblem(prefix: string): string | undefined {
  if (prefix === "") return undefined;
  if (prefix.length > 512) return "longer than 512 characters";
  if (!prefix.endsWith("/")) return 'must be empty or end with "/"';
  if (!/^[\x21-\x7e]+$/.test(prefix)) return "printable ASCII without spaces only";
  const segments = prefix.slice(0, -1).split("/");
  if (segments.some((s) => s === "" || s === "." || s === "..")) return 'no leading "/", no "//", no "." or ".." segments';
  return undefined;
}

export function endpointProblem(endpoint: string): string | undefined {
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    return "not a URL";
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return "must be an http:// or https:// URL";
  if (url.username || url.password) return "must not carry credentials (use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)";
  if (url.search || url.hash) return "must not have a query or fragment";
  return undefined;
}
