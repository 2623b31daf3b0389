// TypeScript SDK for imgd: a typed nice-grpc client over the protobuf-es code generated from
// proto/ (other languages generate their own SDKs from the same files with buf).
import { createClient, type Channel, type Client } from "nice-grpc";
import { agentChannel, type ConnectOptions } from "./connect.ts";
import { ImageService } from "./gen/imgd/v1/imgd_pb.js";
import { niceDefinition, type NiceServiceDefinition } from "./grpc-binding.ts";

export * from "./gen/imgd/v1/imgd_pb.js";
export { DEFAULT_ADDR, type ConnectOptions } from "./connect.ts";

const definition = niceDefinition(ImageService);
export type ImgdClient = Client<NiceServiceDefinition<typeof ImageService.method>>;

/**
 * Connects to the agent: `address` (unix:/path or host:port) or $IMGD_ADDR, else the agent's
 * default Unix socket; TLS from `options.tls` or $IMGD_CLIENT_TLS_*.
 */
export function connectImgd(address?: string, options: Omit<ConnectOptions, "address"> = {}): { client: ImgdClient; channel: Channel } {
  const channel = agentChannel({ ...options, ...(address !== undefined ? { address } : {}) });
  return { client: createClient(definition, channel) as ImgdClient, channel };
}
