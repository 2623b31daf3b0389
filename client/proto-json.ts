// imgctl --json: every answer printed as proto3 JSON (what grpcurl prints: camelCase names, enum
// names, 64-bit integers as strings, fields at their default value left out, no $typeName), one
// message per line, so a script reads a pull's stream and a unary answer the same way (jq -c,
// JSON Lines).
import { toJsonString, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

export function jsonLine<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>): string {
  return toJsonString(schema, message);
}
