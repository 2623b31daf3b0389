// The agent's gRPC server: imgd.v1.ImageService, the standard health service, and server
// reflection (so grpcurl can list and call the API without the .proto files).
import { createServer, type Server } from "nice-grpc";
import { HealthDefinition, HealthServiceImpl, HealthState } from "nice-grpc-server-health";
import { ServerReflection, ServerReflectionService } from "nice-grpc-server-reflection";
import { ImageService, file_imgd_v1_imgd } from "../../client/gen/imgd/v1/imgd_pb.js";
import { descriptorSet, niceDefinition } from "../../client/grpc-binding.ts";
import { imageService, type ImageServiceDeps } from "./image-service.ts";

export interface AgentServer {
  server: Server;
  health: HealthState;
  port: number;
}

export async function startGrpcServer(listen: string, deps: ImageServiceDeps): Promise<AgentServer> {
  const server = createServer();
  server.add(niceDefinition(ImageService), imageService(deps));
  const health = HealthState();
  server.add(HealthDefinition, HealthServiceImpl(health));
  server.add(ServerReflectionService, ServerReflection(descriptorSet([file_imgd_v1_imgd]), [ImageService.typeName]));
  const port = await server.listen(listen);
  health.setStatus("healthy", ImageService.typeName);
  health.setStatus("healthy");
  return { server, health, port };
}
