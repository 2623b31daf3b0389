// TypeScript SDK for imgd: a typed nice-grpc client over the protobuf-es code generated from
// proto/ (other languages generate their own SDKs from the same files with buf).
import { createChannel, createClient, type Channel, type Client } from "nice-grpc";
import { ImageService } from "./gen/imgd/v1/imgd_pb.js";
import { niceDefinition, type NiceServiceDefinition } from "./grpc-binding.ts";

export * from "./gen/imgd/v1/imgd_pb.js";

const definition = niceDefinition(ImageService);
export type ImgdClient = Client<NiceServiceDefinition<typeof ImageService.method>>;

export function connectImgd(address = process.env.IMGD_ADDR ?? "127.0.0.1:50051"): { client: ImgdClient; channel: Channel } {
  const channel = createChannel(address);
  return { client: createClient(definition, channel) as ImgdClient, channel };
}
