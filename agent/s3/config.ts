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
}

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

  if (problems.length > 0) throw new S3ConfigError(`invalid S3 settings: ${problems.join("; ")}`);
  return { ...(endpoint !== undefined ? { endpoint } : {}), bucket, prefix, region, ...(credentials ? { credentials } : {}) };
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
