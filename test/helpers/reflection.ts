// One server-reflection request and its answer, as grpcurl asks them (tests of the agent's API).
import { createClient, type Channel } from "nice-grpc";
import { ServerReflectionService } from "nice-grpc-server-reflection";
import reflectionMessages from "nice-grpc-server-reflection/lib/proto/grpc/reflection/v1/reflection_pb.js";

const { ServerReflectionRequest } = reflectionMessages;
type Request = InstanceType<typeof ServerReflectionRequest>;

/** `ask(fill)` sends one request (filled by `fill`) on `definition`'s path and returns the first response. */
export function reflectionAsker(channel: Channel, definition: typeof ServerReflectionService = ServerReflectionService) {
  const reflection = createClient(definition, channel);
  return async (fill: (r: Request) => void) => {
    const request = new ServerReflectionRequest();
    fill(request);
    async function* one() {
      yield request;
    }
    for await (const response of reflection.serverReflectionInfo(one())) return response;
    throw new Error("no reflection response");
  };
}
