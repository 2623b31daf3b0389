// Binds protobuf-es (v2) service descriptors to nice-grpc.
//
// nice-grpc understands ts-proto and grpc-js definitions, not protobuf-es ones, and no
// maintained package bridges the two; this is the small adapter: one method definition per RPC,
// serializing with protobuf-es' binary codec. Server and client share it.
import { create, fromBinary, toBinary, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import type { DescFile } from "@bufbuild/protobuf";
import type { MethodDefinition } from "nice-grpc";

type NiceMethod<M> = M extends { input: infer I extends DescMessage; output: infer O extends DescMessage; methodKind: infer K }
  ? MethodDefinition<
      MessageInitShape<I>,
      MessageShape<I>,
      MessageInitShape<O>,
      MessageShape<O>,
      K extends "client_streaming" | "bidi_streaming" ? true : false,
      K extends "server_streaming" | "bidi_streaming" ? true : false
    >
  : never;

export type NiceServiceDefinition<S extends GenServiceMethods> = { [K in keyof S]: NiceMethod<S[K]> };

export function niceDefinition<S extends GenServiceMethods>(service: GenService<S>): NiceServiceDefinition<S> {
  const definition: Record<string, MethodDefinition<unknown, unknown, unknown, unknown>> = {};
  for (const method of service.methods) {
    const { input, output } = method;
    definition[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
      responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
      requestSerialize: (value) => toBinary(input, create(input, value as MessageInitShape<typeof input>)),
      requestDeserialize: (bytes) => fromBinary(input, bytes),
      responseSerialize: (value) => toBinary(output, create(output, value as MessageInitShape<typeof output>)),
      responseDeserialize: (bytes) => fromBinary(output, bytes),
      options: {},
    };
  }
  return definition as NiceServiceDefinition<S>;
}

/** Encodes the files as a google.protobuf.FileDescriptorSet, as gRPC server reflection wants. */
export function descriptorSet(files: DescFile[]): Uint8Array {
  const seen = new Map<string, DescFile>();
  const visit = (file: DescFile) => {
    if (seen.has(file.name)) return;
    file.dependencies.forEach(visit);
    seen.set(file.name, file);
  };
  files.forEach(visit);
  return toBinary(FileDescriptorSetSchema, create(FileDescriptorSetSchema, { file: [...seen.values()].map((f) => f.proto) }));
}
