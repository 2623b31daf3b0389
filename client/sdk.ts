// TypeScript SDK for imgd: a typed nice-grpc client over the protobuf-es code generated from
// proto/ (other languages generate their own SDKs from the same files with buf).
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { ClientError, createClientFactory, type CallOptions, type Channel, type Client, type ClientMiddlewareCall, type Metadata } from "nice-grpc";
import { agentChannel, type ConnectOptions } from "./connect.ts";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "./gen/google/rpc/status_pb.js";
import { ImageService } from "./gen/imgd/v1/imgd_pb.js";
import { niceDefinition, type NiceServiceDefinition } from "./grpc-binding.ts";

export * from "./gen/imgd/v1/imgd_pb.js";
export { DEFAULT_ADDR, type ConnectOptions } from "./connect.ts";

const definition = niceDefinition(ImageService);
export type ImgdClient = Client<NiceServiceDefinition<typeof ImageService.method>>;

/**
 * A failed call, with the google.rpc.ErrorInfo the agent sent (domain "imgd"): `reason` is
 * stable (IMAGE_NOT_FOUND, LAYER_REFUSED, POOL_FULL, ...), `metadata` says about what.
 */
export class ImgdError extends ClientError {
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Record<string, string>;
  constructor(err: ClientError, info: { reason: string; domain: string; metadata: Record<string, string> }) {
    super(err.path, err.code, err.details);
    this.name = "ImgdError";
    this.reason = info.reason;
    this.domain = info.domain;
    this.metadata = info.metadata;
  }
}

/** The ErrorInfo in a grpc-status-details-bin trailer (a google.rpc.Status), if any. */
export function errorInfoOf(trailer: Metadata | undefined): { reason: string; domain: string; metadata: Record<string, string> } | undefined {
  const bytes = trailer?.get("grpc-status-details-bin");
  if (!(bytes instanceof Uint8Array)) return undefined;
  try {
    const status = fromBinary(StatusSchema, bytes);
    for (const any of status.details) {
      const info = anyUnpack(any, ErrorInfoSchema);
      if (info) return { reason: info.reason, domain: info.domain, metadata: { ...info.metadata } };
    }
  } catch {
    // not a google.rpc.Status: no details
  }
  return undefined;
}

/** Turns a failed call's ClientError into an ImgdError when the agent sent an ErrorInfo. */
async function* errorDetails<Req, Res>(call: ClientMiddlewareCall<Req, Res>, options: CallOptions) {
  let trailer: Metadata | undefined;
  try {
    return yield* call.next(call.request, {
      ...options,
      onTrailer: (t) => {
        trailer = t;
        options.onTrailer?.(t);
      },
    });
  } catch (err) {
    const info = err instanceof ClientError ? errorInfoOf(trailer) : undefined;
    throw info ? new ImgdError(err as ClientError, info) : err;
  }
}

/**
 * Connects to the agent: `address` (unix:/path or host:port) or $IMGD_ADDR, else the agent's
 * default Unix socket; TLS from `options.tls` or $IMGD_CLIENT_TLS_*. Failed calls throw ImgdError.
 */
export function connectImgd(address?: string, options: Omit<ConnectOptions, "address"> = {}): { client: ImgdClient; channel: Channel } {
  const channel = agentChannel({ ...options, ...(address !== undefined ? { address } : {}) });
  return { client: createClientFactory().use(errorDetails).create(definition, channel) as ImgdClient, channel };
}
