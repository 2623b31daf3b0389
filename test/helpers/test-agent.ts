// A real agent on the host for the unit tests: real s3rver (optionally behind the fault-injecting
// proxy), real SQLite in a fresh temp state directory, real gRPC client. The root helper is the
// TEST DOUBLE of fake-helper.ts (this kernel has no device-mapper; the VM tests run the real one).
// One harness, so each test file only says what differs: its agent settings, its images, its log.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startAgent, type RunningAgent } from "../../agent/app.ts";
import { loadAgentConfig } from "../../agent/config.ts";
import type { Logger } from "../../agent/log.ts";
import { connectImgd, type ImgdClient } from "../../client/sdk.ts";
import { packTar } from "../fixtures/tar-bytes.ts";
import { startFakeHelper, type FakeHelper } from "./fake-helper.ts";
import { startFaultProxy, type TamperProxy } from "./fault-proxy.ts";
import { startS3rver, type TestS3 } from "./s3rver.ts";

/** A layer as a map of file path to content (regular files, mode 0644). */
export type Files = Record<string, string>;
export const tarOf = (files: Files) => packTar(Object.entries(files).map(([name, body]) => ({ header: { name, mode: 0o644 }, body })));

export interface TestAgentOptions {
  /** In the temp state directory's name: imgd-<name>-XXXXXX. */
  name: string;
  /** Puts the fault-injecting proxy between the agent and s3rver (test.proxy). */
  proxy?: boolean;
  /** Agent settings beyond state dir, listen address, helper socket and S3 endpoint and bucket. */
  env?: Record<string, string>;
  log?: Logger;
  /** Uploaded as images/<name>/<n>.tar before the agent starts. */
  images?: Record<string, Files[]>;
}

export class TestAgent {
  readonly stateDir: string;
  s3!: TestS3;
  proxy!: TamperProxy;
  helper!: FakeHelper;
  agent!: RunningAgent;
  client!: ImgdClient;
  readonly options: TestAgentOptions;
  #closeClient = () => {};

  constructor(options: TestAgentOptions) {
    this.options = options;
    this.stateDir = mkdtempSync(join(tmpdir(), `imgd-${options.name}-`));
  }

  /** Starts S3 (and the proxy), uploads the images, starts the helper double and the agent. */
  async setUp(): Promise<this> {
    this.s3 = await startS3rver();
    if (this.options.proxy) this.proxy = await startFaultProxy(this.s3.endpoint);
    for (const [image, layers] of Object.entries(this.options.images ?? {})) await this.putImage(image, layers);
    this.helper = await startFakeHelper(join(this.stateDir, "blobs"));
    await this.start();
    return this;
  }

  /** (Re)starts the agent on the same state directory and connects a new client. */
  async start(): Promise<void> {
    const config = loadAgentConfig([], {
      IMGD_STATE_DIR: this.stateDir,
      IMGD_LISTEN: "127.0.0.1:0",
      IMGD_LISTEN_INSECURE_LOOPBACK: "1", // plain TCP on loopback: the access rules are test/unit/grpc-access.test.ts's
      IMGD_HELPER_SOCKET: this.helper.socketPath,
      IMGD_S3_ENDPOINT: this.options.proxy ? this.proxy.endpoint : this.s3.endpoint,
      IMGD_S3_BUCKET: this.s3.bucket,
      ...this.options.env,
    });
    this.agent = await startAgent(config, this.options.log ?? (() => {}), { poolWaitAttempts: 1 });
    const c = connectImgd(`127.0.0.1:${this.agent.port}`);
    this.client = c.client;
    this.#closeClient = () => c.channel.close();
  }

  /** Stops the agent (runs resume at the next start); S3 and the helper keep running. */
  async stop(): Promise<void> {
    this.#closeClient();
    await this.agent.stop();
  }

  async tearDown(): Promise<void> {
    await this.stop();
    await this.helper.close();
    await this.proxy?.close();
    await this.s3.close();
  }

  async putImage(image: string, layers: Files[]): Promise<void> {
    for (const [i, files] of layers.entries()) await this.s3.put(`images/${image}/${i + 1}.tar`, await tarOf(files));
  }
}
