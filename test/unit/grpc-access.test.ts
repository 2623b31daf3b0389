// Who can reach the agent's gRPC API (issue 9, finding 6), and what reflection shows (issue 12).
// The real server (agent/grpc/server.ts) on a real Unix socket and on real TLS; clients are real
// gRPC clients, run as other uids (setpriv) to let the kernel judge the socket's permissions.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile, execFileSync, spawnSync } from "node:child_process";
import { promisify } from "node:util";
import { chmodSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { createClient, type Channel } from "nice-grpc";
import { HealthDefinition } from "nice-grpc-server-health";
import { ServerReflectionService } from "nice-grpc-server-reflection";
import { reflectionAsker } from "../helpers/reflection.ts";
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";
import type { ApiListen } from "../../agent/config.ts";
import type { ImageServiceDeps } from "../../agent/grpc/image-service.ts";
import { CLIENTS_GROUP, startGrpcServer, type AgentServer } from "../../agent/grpc/server.ts";
import { agentChannel } from "../../client/connect.ts";
import { connectImgd } from "../../client/sdk.ts";
import { resolveGroupId } from "../../privhelper/config.ts";

const repo = join(import.meta.dirname, "../..");
const base = mkdtempSync(join(tmpdir(), "imgd-access-"));
chmodSync(base, 0o755); // other uids must reach the socket's directory to be judged by it
const suffix = String(process.pid % 100000);
const GROUP = `imgdacc${suffix}`;
const MEMBER = `imgdaccin${suffix}`;
const OUTSIDER = `imgdaccout${suffix}`;

// Only the image service's catalog is used (ListImages): a real one on a real SQLite file.
const db = openDatabase(join(base, "imgd.db"));
const deps = { catalog: new Catalog(db), log: () => {} } as unknown as ImageServiceDeps;
const servers: AgentServer[] = [];
const serve = async (api: ApiListen) => {
  const s = await startGrpcServer(api, deps);
  servers.push(s);
  return s;
};

before(() => {
  execFileSync("groupadd", [GROUP]);
  execFileSync("useradd", ["--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", "--groups", GROUP, MEMBER]);
  execFileSync("useradd", ["--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", OUTSIDER]);
});

after(async () => {
  for (const s of servers) s.server.forceShutdown();
  db.close();
  for (const user of [MEMBER, OUTSIDER]) spawnSync("userdel", [user]);
  spawnSync("groupdel", [GROUP]);
  rmSync(base, { recursive: true, force: true });
});

// Children run asynchronously: the server under test lives in this process's event loop.
const run = async (file: string, args: string[], env: Record<string, string | undefined>) => {
  try {
    const { stdout, stderr } = await promisify(execFile)(file, args, { encoding: "utf8", env, timeout: 60_000 });
    return { status: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { status: typeof e.code === "number" ? e.code : -1, stdout: e.stdout ?? "", stderr: e.stderr ?? "" };
  }
};

/** Runs a real client (the SDK) as `user`: ListImages, or the error it got. */
async function callAs(user: string, address: string, groups: "init" | "clear"): Promise<{ ok: boolean; out: string }> {
  const script = `
    import { connectImgd } from ${JSON.stringify(join(repo, "client/sdk.ts"))};
    const { client, channel } = connectImgd(${JSON.stringify(address)});
    try {
      const { images } = await client.listImages({}, { signal: AbortSignal.timeout(10000) });
      console.log("OK " + images.length);
    } catch (err) { console.log("ERR " + err.message); process.exitCode = 1; } finally { channel.close(); }`;
  const r = await run("setpriv", [`--reuid=${user}`, `--regid=${user}`, groups === "init" ? "--init-groups" : "--clear-groups", "--", process.execPath, "--input-type=module", "-e", script], { PATH: process.env.PATH, HOME: "/" });
  return { ok: r.status === 0, out: `${r.stdout}${r.stderr}` };
}

test("Unix socket: 0660 and its directory 0750, of the configured group; a member connects, a non-member uid is refused", async () => {
  const path = join(base, "agent", "imgd.sock");
  await serve({ kind: "unix", path, group: GROUP });
  const gid = resolveGroupId(GROUP);
  const sock = statSync(path);
  assert.equal(sock.mode & 0o777, 0o660);
  assert.equal(sock.gid, gid);
  const dir = statSync(join(base, "agent"));
  assert.equal(dir.mode & 0o777, 0o750);
  assert.equal(dir.gid, gid);

  const member = await callAs(MEMBER, `unix:${path}`, "init");
  assert.equal(member.out.trim(), "OK 0", member.out);
  const outsider = await callAs(OUTSIDER, `unix:${path}`, "clear");
  assert.equal(outsider.ok, false, outsider.out);
  assert.match(outsider.out, /EACCES|Permission denied/, outsider.out);
  // The member without its supplementary groups is an outsider too: the group is the gate.
  assert.match((await callAs(MEMBER, `unix:${path}`, "clear")).out, /EACCES|Permission denied/);
});

test("as the agent really runs (not root): the socket in the directory made for it (RuntimeDirectory), given to the agent's own group", async () => {
  const runDir = join(base, "run-imgd"); // like /run/imgd: root's
  execFileSync("install", ["-d", "-m", "0755", runDir]);
  execFileSync("install", ["-d", "-o", OUTSIDER, "-g", OUTSIDER, "-m", "0755", join(runDir, "agent")]);
  const path = join(runDir, "agent", "imgd.sock");
  const script = `
    import { startGrpcServer } from ${JSON.stringify(join(repo, "agent/grpc/server.ts"))};
    const { server } = await startGrpcServer({ kind: "unix", path: ${JSON.stringify(path)}, group: undefined }, {});
    console.log("listening");
    setTimeout(() => { server.forceShutdown(); }, 20000);`;
  const child = execFile("setpriv", [`--reuid=${OUTSIDER}`, `--regid=${OUTSIDER}`, "--clear-groups", "--", process.execPath, "--input-type=module", "-e", script], { env: { PATH: process.env.PATH, HOME: "/" } });
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d));
  try {
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on("data", (d) => String(d).includes("listening") && resolve());
      child.once("exit", (code) => reject(new Error(`agent-side child exited ${code}: ${stderr}`)));
    });
    const gid = Number(execFileSync("id", ["-g", OUTSIDER], { encoding: "utf8" }).trim());
    assert.deepEqual([statSync(path).mode & 0o777, statSync(path).gid], [0o660, gid]);
    assert.deepEqual([statSync(join(runDir, "agent")).mode & 0o777, statSync(join(runDir, "agent")).gid], [0o750, gid]);
    const { client, channel } = connectImgd(`unix:${path}`);
    try {
      await client.listRuns({ pageSize: 1 }).catch((err: Error) => assert.doesNotMatch(err.message, /EACCES|UNAVAILABLE/)); // reached the service (its deps are empty here)
    } finally {
      channel.close();
    }
    assert.match((await callAs(MEMBER, `unix:${path}`, "init")).out, /EACCES|Permission denied/, "not in the agent's group");
  } finally {
    child.kill();
  }
});

test("Unix socket: the group defaults to imgd-clients when it exists, else the agent's own; a stale socket is replaced", async () => {
  const path = join(base, "default", "imgd.sock");
  const first = await serve({ kind: "unix", path, group: undefined });
  let expected: number;
  try {
    expected = resolveGroupId(CLIENTS_GROUP);
  } catch {
    expected = process.getgid!();
  }
  assert.equal(statSync(path).gid, expected);
  // A live socket is not taken over; once its server is gone, the file left behind is replaced.
  await assert.rejects(startGrpcServer({ kind: "unix", path, group: undefined }, deps), /another process is listening/);
  first.server.forceShutdown();
  writeFileSync(join(base, "default", "marker"), "");
  const second = await serve({ kind: "unix", path, group: undefined });
  const { client, channel } = connectImgd(`unix:${path}`);
  try {
    assert.deepEqual((await client.listImages({})).images, []);
  } finally {
    channel.close();
  }
  second.server.forceShutdown();
});

test("TCP with mutual TLS: a client without a certificate, or with one from another CA, or in plain text, is refused; one signed by the CA works", async () => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-tls-"));
  const f = (name: string) => join(dir, name);
  const openssl = (...args: string[]) => execFileSync("openssl", args, { stdio: ["ignore", "ignore", "pipe"] });
  const newCa = (name: string) => openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f(`${name}.key`), "-out", f(`${name}.pem`), "-days", "1", "-subj", `/CN=${name}`);
  const newCert = (name: string, ca: string, san: string) => {
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f(`${name}.key`), "-out", f(`${name}.csr`), "-subj", `/CN=${name}`);
    writeFileSync(f(`${name}.ext`), `subjectAltName=${san}\n`);
    openssl("x509", "-req", "-in", f(`${name}.csr`), "-CA", f(`${ca}.pem`), "-CAkey", f(`${ca}.key`), "-CAcreateserial", "-out", f(`${name}.pem`), "-days", "1", "-extfile", f(`${name}.ext`));
  };
  newCa("ca");
  newCa("rogue-ca");
  newCert("server", "ca", "IP:127.0.0.1,DNS:localhost");
  newCert("client", "ca", "DNS:client");
  newCert("rogue", "rogue-ca", "DNS:rogue");

  const { port } = await serve({ kind: "tcp", host: "127.0.0.1", port: 0, tls: { certFile: f("server.pem"), keyFile: f("server.key"), clientCaFile: f("ca.pem") } });
  const address = `127.0.0.1:${port}`;
  const check = async (channel: Channel) => {
    try {
      return (await createClient(HealthDefinition, channel).check({ service: "" }, { signal: AbortSignal.timeout(10_000) })).status;
    } finally {
      channel.close();
    }
  };
  assert.equal(await check(agentChannel({ address, tls: { caFile: f("ca.pem"), certFile: f("client.pem"), keyFile: f("client.key") } }, {})), 1 /* SERVING */);
  await assert.rejects(check(agentChannel({ address, tls: { caFile: f("ca.pem") } }, {})), /UNAVAILABLE|handshake|certificate/i);
  await assert.rejects(check(agentChannel({ address, tls: { caFile: f("ca.pem"), certFile: f("rogue.pem"), keyFile: f("rogue.key") } }, {})), /UNAVAILABLE|handshake|certificate|alert/i);
  await assert.rejects(check(agentChannel({ address }, {})), /UNAVAILABLE|ECONNRESET|Connection dropped|protocol/i);
  // The clients' settings say the same as the options.
  const env = { IMGD_ADDR: address, IMGD_CLIENT_TLS_CA: f("ca.pem"), IMGD_CLIENT_TLS_CERT: f("client.pem"), IMGD_CLIENT_TLS_KEY: f("client.key") };
  assert.equal(await check(agentChannel({}, env)), 1);
  rmSync(dir, { recursive: true, force: true });
});

test("a TCP listen address without TLS and without the insecure-loopback setting: the agent refuses to start, and says why", () => {
  const run = (env: Record<string, string>) =>
    spawnSync(process.execPath, [join(repo, "agent/main.ts")], { encoding: "utf8", env: { PATH: process.env.PATH!, IMGD_STATE_DIR: join(base, "never"), ...env }, timeout: 60_000 });
  const plain = run({ IMGD_LISTEN: "0.0.0.0:50051" });
  assert.equal(plain.status, 1);
  // A fatal start-up error is one JSON log line, like every other line of the agent.
  const fatal = JSON.parse(plain.stderr) as { level: string; component: string; msg: string; error: string };
  assert.deepEqual([fatal.level, fatal.component, fatal.msg], ["error", "imgd", "imgd failed to start"]);
  assert.match(fatal.error, /^IMGD_LISTEN=0\.0\.0\.0:50051 is a TCP address .*IMGD_TLS_CERT, IMGD_TLS_KEY and IMGD_TLS_CLIENT_CA .*IMGD_LISTEN_INSECURE_LOOPBACK=1/);
  const notLoopback = run({ IMGD_LISTEN: "0.0.0.0:50051", IMGD_LISTEN_INSECURE_LOOPBACK: "1" });
  assert.equal(notLoopback.status, 1);
  assert.match(notLoopback.stderr, /allows only a loopback address/);
});

test("reflection: v1 and v1alpha both list ImageService, health and reflection, and describe each", async () => {
  const server = await serve({ kind: "tcp", host: "127.0.0.1", port: 0, tls: undefined });
  const channel = agentChannel({ address: `127.0.0.1:${server.port}` }, {});
  // v1alpha's messages are v1's on the wire: the same client, asking at the v1alpha path.
  const v1alpha = { serverReflectionInfo: { ...ServerReflectionService.serverReflectionInfo, path: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" } } as unknown as typeof ServerReflectionService;
  try {
    for (const definition of [ServerReflectionService, v1alpha]) {
      const ask = reflectionAsker(channel, definition);
      const listed = (await ask((r) => r.setListServices(""))).getListServicesResponse()!.getServiceList().map((s) => s.getName());
      assert.deepEqual(listed.sort(), ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", "imgd.v1.ImageService"]);
      for (const symbol of listed) {
        const response = await ask((r) => r.setFileContainingSymbol(symbol));
        const files = response.getFileDescriptorResponse()?.getFileDescriptorProtoList_asU8().map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes)) ?? [];
        assert.ok(files.some((file) => file.service.some((s) => `${file.package}.${s.name}` === symbol)), `${definition === v1alpha ? "v1alpha" : "v1"} describes ${symbol}`);
      }
      const health = await ask((r) => r.setFileContainingSymbol("grpc.health.v1.HealthCheckRequest"));
      assert.equal(fromBinary(FileDescriptorProtoSchema, health.getFileDescriptorResponse()!.getFileDescriptorProtoList_asU8()[0]!).name, "health/v1/health.proto");
    }
    assert.equal((await createClient(HealthDefinition, channel).check({ service: "imgd.v1.ImageService" })).status, 1 /* SERVING */);
  } finally {
    channel.close();
  }
});

test("imgctl reaches the agent on a Unix socket through IMGD_ADDR", async () => {
  const path = join(base, "ctl", "imgd.sock");
  await serve({ kind: "unix", path, group: undefined });
  const r = await run(process.execPath, [join(repo, "client/imgctl.ts"), "images"], { PATH: process.env.PATH, IMGD_ADDR: `unix:${path}` });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), "no images");
});
