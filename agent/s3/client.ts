// The agent's S3 client: anonymous unless credentials are configured, path-style for custom
// endpoints, bounded timeouts so a stalled server fails instead of hanging (connect, first byte,
// idle socket), and NO SDK retries: downloads retry and resume ranges themselves
// (../blobs/range-retry.ts) and the pull FSM retries whole steps, so one request on the wire is
// one attempt that we count and log.
import { S3Client } from "@aws-sdk/client-s3";
import { NodeHttpHandler } from "@smithy/node-http-handler";
import type { HttpRequest, HttpSigner, Identity } from "@smithy/types";
import { DEFAULT_TIMEOUTS, type S3Config } from "./config.ts";

export { loadS3Config, S3ConfigError, S3_DEFAULTS, DOWNLOAD_DEFAULTS, DEFAULT_TIMEOUTS } from "./config.ts";
export type { S3Config, S3Credentials, S3Timeouts, DownloadPolicy } from "./config.ts";


const SDK_MAX_ATTEMPTS = 1;

// Anonymous access the way the SDK itself makes unsigned calls (operations modelled with
// smithy.api#noAuth, e.g. STS AssumeRoleWithWebIdentity): one auth scheme that needs no identity
// and leaves the request untouched. No credential provider chain is ever consulted, so a stray
// ~/.aws/credentials or an instance role cannot sign our requests, and nothing probes the
// instance metadata service.
const NO_AUTH = "smithy.api#noAuth";
const unsignedSigner: HttpSigner = {
  sign: async (request: HttpRequest, _identity: Identity) => request,
};

export function createS3Client(cfg: S3Config): S3Client {
  const timeouts = { ...DEFAULT_TIMEOUTS, ...cfg.timeouts };
  return new S3Client({
    region: cfg.region,
    ...(cfg.endpoint !== undefined ? { endpoint: cfg.endpoint, forcePathStyle: true } : {}),
    ...(cfg.credentials
      ? { credentials: { ...cfg.credentials } }
      : {
          httpAuthSchemes: [{ schemeId: NO_AUTH, identityProvider: () => async () => ({}), signer: unsignedSigner }],
          httpAuthSchemeProvider: () => [{ schemeId: NO_AUTH }],
        }),
    maxAttempts: SDK_MAX_ATTEMPTS,
    followRegionRedirects: false,
    // We never upload; do not let the SDK add checksum trailers to anything.
    requestChecksumCalculation: "WHEN_REQUIRED",
    requestHandler: new NodeHttpHandler({
      connectionTimeout: timeouts.connectMs,
      requestTimeout: timeouts.requestMs,
      throwOnRequestTimeout: true,
      socketTimeout: timeouts.idleMs,
    }),
  });
}
