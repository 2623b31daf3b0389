// The agent's gRPC server: imgd.v1.ImageService, the standard health service, and server
// reflection v1 and v1alpha (so grpcurl and other tools list and call everything, health and
// reflection included, without the .proto files).
//
// Who may call it (config.ts's ApiListen): on a Unix socket, whoever the socket's group lets in
// (the socket 0660 and its directory 0750, both of that group); on TCP, only clients with a
// certificate signed by IMGD_TLS_CLIENT_CA, or anyone on the host when an operator set
// IMGD_LISTEN_INSECURE_LOOPBACK for development.
import { chmod, chown, lstat, mkdir, readFile, unlink } from "node:fs/promises";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { dirname } from "node:path";
import { ServerCredentials } from "@grpc/grpc-js";
import { createServer, type Server } from "nice-grpc";
import { HealthDefinition, HealthServiceImpl, HealthState } from "nice-grpc-server-health";
import { ServerReflection, ServerReflectionService } from "nice-grpc-server-reflection";
import { ImageService, file_imgd_v1_imgd } from "../../client/gen/imgd/v1/imgd_pb.js";
import { file_health_v1_health } from "../../client/gen/health/v1/health_pb.js";
import { file_grpc_reflection_v1_reflection } from "../../client/gen/grpc/reflection/v1/reflection_pb.js";
import { file_grpc_reflection_v1alpha_reflection } from "../../client/gen/grpc/reflection/v1alpha/reflection_pb.js";
import { descriptorSet, niceDefinition } from "../../client/grpc-binding.ts";
import { resolveGroupId } from "../../privhelper/config.ts";
import type { ApiListen } from "../config.ts";
import { imageService, type ImageServiceDeps } from "./image-service.ts";
import { errorMiddleware } from "./errors.ts";
import { poolGuard } from "./pool-guard.ts";
import { rpcObserver, type RpcCounter } from "./rpc-observer.ts";

export interface AgentServer {
  server: Server;
  health: HealthState;
  /** The TCP port (0 on a Unix socket). */
  port: number;
}

/** Default group of the API socket when IMGD_SOCKET_GROUP is unset, if the host has it. */
export const CLIENTS_GROUP = "imgd-clients";

// v1alpha is v1 under another name (the messages are the same on the wire); many clients
// (grpcurl before 1.8, older SDKs) only ask v1alpha.
const ReflectionV1Alpha = {
  serverReflectionInfo: { ...ServerReflectionService.serverReflectionInfo, path: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" },
} as unknown as typeof ServerReflectionService;

export const SERVICE_NAMES = [ImageService.typeName, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

export async function startGrpcServer(api: ApiListen, deps: ImageServiceDeps, options: { countRpc?: RpcCounter } = {}): Promise<AgentServer> {
  // Every call, whatever its service, is logged and counted (rpc-observer.ts) with the status
  // it leaves with: every error gets its code and ErrorInfo from the one table (errors.ts);
  // calls that would change a pool the catalog does not describe are refused (pool-guard.ts).
  const server = createServer().use(rpcObserver(deps.log, options.countRpc)).use(errorMiddleware).use(poolGuard(deps.poolGate));
  server.add(niceDefinition(ImageService), imageService(deps));
  const health = HealthState();
  server.add(HealthDefinition, HealthServiceImpl(health));
  const files = descriptorSet([file_imgd_v1_imgd, file_health_v1_health, file_grpc_reflection_v1_reflection, file_grpc_reflection_v1alpha_reflection]);
  const reflection = ServerReflection(files, SERVICE_NAMES);
  server.add(ServerReflectionService, reflection);
  server.add(ReflectionV1Alpha, reflection);
  let port = 0;
  if (api.kind === "unix") {
    await listenOnUnixSocket(server, api.path, api.group);
  } else {
    const credentials = api.tls
      ? ServerCredentials.createSsl(await readFile(api.tls.clientCaFile), [{ cert_chain: await readFile(api.tls.certFile), private_key: await readFile(api.tls.keyFile) }], true)
      : ServerCredentials.createInsecure();
    port = await server.listen(`${api.host.includes(":") ? `[${api.host}]` : api.host}:${api.port}`, credentials);
  }
  health.setStatus("healthy", ImageService.typeName);
  health.setStatus("healthy");
  return { server, health, port };
}

/**
 * Binds the socket in a directory only the agent can enter (0700) and opens both to the group
 * afterwards, so no one outside the group connects in between (grpc-js creates the socket with
 * the process umask).
 */
async function listenOnUnixSocket(server: Server, path: string, group: string | undefined): Promise<void> {
  const gid = socketGroupId(group);
  const dir = dirname(path);
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new Error(`cannot create the API socket's directory ${dir} (${(err as Error).message}): create it for the agent's user (systemd: RuntimeDirectory=imgd/agent)`);
  }
  const info = await lstat(dir);
  if (!info.isDirectory() || info.uid !== process.getuid!()) throw new Error(`the API socket's directory ${dir} must be a directory owned by the agent's user (uid ${process.getuid!()})`);
  await chmod(dir, 0o700);
  await removeStaleSocket(path);
  await server.listen(`unix:${path}`, ServerCredentials.createInsecure());
  try {
    await chown(path, -1, gid);
    await chown(dir, -1, gid);
  } catch (err) {
    throw new Error(`cannot give the API socket to group ${group ?? gid} (${(err as Error).message}): the agent's user must be a member of it (systemd: SupplementaryGroups=)`);
  }
  await chmod(path, 0o660);
  await chmod(dir, 0o750);
}

function socketGroupId(group: string | undefined): number {
  if (group !== undefined) return resolveGroupId(group);
  try {
    return resolveGroupId(CLIENTS_GROUP);
  } catch {
    return process.getgid!();
  }
}

/** A socket file left by a killed agent is removed; one that still answers belongs to a running agent. */
async function removeStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  const info = await lstat(path);
  if (!info.isSocket()) throw new Error(`${path} exists and is not a socket`);
  const answers = await new Promise<boolean>((resolve) => {
    const socket = connect({ path });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
  if (answers) throw new Error(`another process is listening on ${path}`);
  await unlink(path);
}
