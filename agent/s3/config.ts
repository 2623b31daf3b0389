// Where the images live in S3, read from the agent's settings (environment, config file, flags).
import { printable } from "./printable.ts";

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

export const DOWNLOAD_DEFAULTS: DownloadPolicy = {
  attempts: 6,
  backoffMs: 200,
  backoffMaxMs: 10_000,
  retryAfterMaxMs: 30_000,
  maxObjectChanges: 3,
  parallelThreshold: 64 * 1024 * 1024,
  partSize: 16 * 1024 * 1024,
  partConcurrency: 4,
};

export const MAX_LAYERS_DEFAULT = 1000;

// Numeric settings: name → where it goes, and its allowed range.
const TIMEOUT_SETTINGS: Array<[string, keyof S3Timeouts]> = [
  ["IMGD_S3_CONNECT_TIMEOUT_MS", "connectMs"],
  ["IMGD_S3_FIRST_BYTE_TIMEOUT_MS", "requestMs"],
  ["IMGD_S3_IDLE_TIMEOUT_MS", "idleMs"],
];
const DOWNLOAD_SETTINGS: Array<[string, keyof DownloadPolicy, number, number]> = [
  ["IMGD_DOWNLOAD_ATTEMPTS", "attempts", 1, 100],
  ["IMGD_DOWNLOAD_BACKOFF_MS", "backoffMs", 0, 600_000],
  ["IMGD_DOWNLOAD_BACKOFF_MAX_MS", "backoffMaxMs", 0, 3_600_000],
  ["IMGD_DOWNLOAD_RETRY_AFTER_MAX_MS", "retryAfterMaxMs", 0, 3_600_000],
  ["IMGD_DOWNLOAD_MAX_OBJECT_CHANGES", "maxObjectChanges", 0, 100],
  ["IMGD_DOWNLOAD_PARALLEL_THRESHOLD", "parallelThreshold", 1, Number.MAX_SAFE_INTEGER],
  ["IMGD_DOWNLOAD_PART_SIZE", "partSize", 1024, 5 * 1024 ** 3],
  ["IMGD_DOWNLOAD_PART_CONCURRENCY", "partConcurrency", 1, 64],
];

export const S3_DEFAULTS = {
  bucket: "flyio-platform-hiring-challenge",
  prefix: "images/",
  region: "us-east-1",
} as const;

export class S3ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "S3ConfigError";
  }
}

type Settings = Record<string, string | undefined>;

/** Reads IMGD_S3_* and AWS_* settings; throws S3ConfigError naming every setting that is wrong. */
export function loadS3Config(env: Settings): S3Config {
  const get = (name: string) => (env[name] === "" ? undefined : env[name]);
  const problems: string[] = [];
  const check = (name: string, value: string, problem: string | undefined) => {
    if (problem) problems.push(`${name}=${printable(value)}: ${problem}`);
  };

  const endpoint = get("IMGD_S3_ENDPOINT");
  const bucket = get("IMGD_S3_BUCKET") ?? S3_DEFAULTS.bucket;
  const prefix = env.IMGD_S3_PREFIX ?? S3_DEFAULTS.prefix; // "" is a valid prefix: images at the bucket root
  const region = get("IMGD_S3_REGION") ?? S3_DEFAULTS.region;
  if (endpoint !== undefined) check("IMGD_S3_ENDPOINT", endpoint, endpointProblem(endpoint));
  check("IMGD_S3_BUCKET", bucket, bucketNameProblem(bucket));
  check("IMGD_S3_PREFIX", prefix, prefixProblem(prefix));
  check("IMGD_S3_REGION", region, /^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$/.test(region) ? undefined : "expected a region name such as us-east-1");

  const accessKeyId = get("AWS_ACCESS_KEY_ID");
  const secretAccessKey = get("AWS_SECRET_ACCESS_KEY");
  const sessionToken = get("AWS_SESSION_TOKEN");
  let credentials: S3Credentials | undefined;
  if (accessKeyId !== undefined || secretAccessKey !== undefined || sessionToken !== undefined) {
    // Secrets are never echoed, only said to be missing or malformed.
    if (accessKeyId === undefined || secretAccessKey === undefined) {
      problems.push("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (leave both unset for anonymous access)");
    } else if (![accessKeyId, secretAccessKey, sessionToken ?? ""].every((v) => /^[\x21-\x7e]*$/.test(v))) {
      problems.push("AWS credentials must be printable ASCII without spaces");
    } else {
      credentials = { accessKeyId, secretAccessKey, ...(sessionToken !== undefined ? { sessionToken } : {}) };
    }
  }

  const int = (name: string, min: number, max: number): number | undefined => {
    const raw = get(name);
    if (raw === undefined) return undefined;
    const value = /^[0-9]{1,16}$/.test(raw) ? Number(raw) : NaN;
    if (value >= min && value <= max) return value;
    problems.push(`${name}=${printable(raw)}: expected an integer from ${min} to ${max}`);
    return undefined;
  };
  const timeouts: Partial<S3Timeouts> = {};
  for (const [name, field] of TIMEOUT_SETTINGS) {
    const value = int(name, 1, 3_600_000);
    if (value !== undefined) timeouts[field] = value;
  }
  const download: Partial<DownloadPolicy> = {};
  for (const [name, field, min, max] of DOWNLOAD_SETTINGS) {
    const value = int(name, min, max);
    if (value !== undefined) download[field] = value;
  }
  const maxLayers = int("IMGD_S3_MAX_LAYERS", 1, 1_000_000);

  if (problems.length > 0) throw new S3ConfigError(`invalid S3 settings: ${problems.join("; ")}`);
  return {
    ...(endpoint !== undefined ? { endpoint } : {}),
    bucket,
    prefix,
    region,
    ...(credentials ? { credentials } : {}),
    ...(Object.keys(timeouts).length > 0 ? { timeouts } : {}),
    ...(maxLayers !== undefined ? { maxLayers } : {}),
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

function prefixProblem(prefix: string): string | undefined {
  if (prefix === "") return undefined;
  if (prefix.length > 512) return "longer than 512 characters";
  if (!prefix.endsWith("/")) return 'must be empty or end with "/"';
  if (!/^[\x21-\x7e]+$/.test(prefix)) return "printable ASCII without spaces only";
  const segments = prefix.slice(0, -1).split("/");
  if (segments.some((s) => s === "" || s === "." || s === "..")) return 'no leading "/", no "//", no "." or ".." segments';
  return undefined;
}

function endpointProblem(endpoint: string): string | undefined {
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
