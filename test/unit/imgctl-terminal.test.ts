// imgctl pull on a terminal: the real imgctl runs in a tmux pane (a real pseudo-terminal) against
// the agent on the host (real s3rver behind the throttling proxy, so a download lasts; the root
// helper is the TEST DOUBLE of test/helpers/fake-helper.ts), and the pane is read as a person
// would see it: one status line and one line per layer, redrawn in place, then a summary.
// The captures it prints are the ones shown in the README (imgctl section).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { debianTool } from "../helpers/debian-tool.ts";
import { isObjectGet } from "../helpers/fault-proxy.ts";
import { TestAgent, type Files } from "../helpers/test-agent.ts";

const MiB = 1024 * 1024;
const base: Files[] = [{ "usr/lib/libc.so": "c".repeat(3 * MiB) }, { "etc/os-release": "debian\n" }, { "usr/bin/sh": "s".repeat(MiB / 2) }];
const harness = new TestAgent({
  name: "terminal",
  proxy: true,
  images: {
    golang: [...base, { "usr/local/go/bin/go": "g".repeat(2 * MiB) }, { "usr/local/go/VERSION": "go1.23\n" }],
    node: [...base, { "usr/local/bin/node": "n".repeat(MiB) }, { "usr/local/node/VERSION": "v22\n" }],
  },
});
const socket = `imgd-progress-test-${process.pid}`;
// A fresh machine may lack it: the suite installs what it uses (as root).
const tmuxPath = debianTool("tmux", "tmux");
const tmux = (...args: string[]) => execFileSync(tmuxPath ?? "tmux", ["-L", socket, ...args], { encoding: "utf8" });
const repo = join(import.meta.dirname, "../..");

before(async () => {
  await harness.setUp();
  // Slow S3 down for the big layers: 64 KiB every 40 ms (about 1.6 MiB/s).
  harness.proxy.tamper = (r) => (isObjectGet(r) && /\/(1|4)\.tar/.test(r.url) ? { throttle: { bytes: 65536, delayMs: 40 } } : undefined);
});
after(async () => {
  try {
    tmux("kill-server");
  } catch {
    // no server left
  }
  await harness.tearDown();
});

/** Runs imgctl pull IMAGE in a fresh 100x10 tmux pane; returns a reader of the pane's text. */
function pullInPane(image: string): () => string {
  const cmd = `${process.execPath} ${join(repo, "client/imgctl.ts")} --addr 127.0.0.1:${harness.agent.port} pull ${image}; echo "exit=$?"; sleep 120`;
  tmux("new-session", "-d", "-s", image, "-x", "100", "-y", "10", cmd);
  return () => tmux("capture-pane", "-p", "-t", image).replace(/\s+$/gm, "").trimEnd();
}

async function until(read: () => string, ok: (text: string) => boolean, what: string): Promise<string> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const text = read();
    if (ok(text)) return text;
    if (Date.now() > deadline) assert.fail(`${what}; the pane shows:\n${text}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("imgctl pull on a terminal redraws one line per layer in place, with bytes, percentage and rate", async () => {
  const read = pullInPane("golang");
  const partWay = /^ +1\/5 +downloading +\d+\.\d MiB \/ 3\.0 MiB +([1-9]\d?)% +\d+\.\d [KM]iB\/s$/m;
  const during = await until(read, (t) => partWay.test(t), "layer 1 is never shown part-way with a percentage and a rate");
  console.log(`--- during\n${during}`);
  assert.match(during, /^pull golang: layers +\d+\.\d [KM]iB \/ 11\.0 MiB +\d+% +\d+\.\d [KM]iB\/s$/m);

  const done = await until(read, (t) => t.includes("exit="), "imgctl never finished");
  console.log(`--- done\n${done}`);
  const lines = done.split("\n");
  assert.equal(lines.at(-1), "exit=0");
  // (11.0 MiB: each of the 5.5 MiB of layers is downloaded and applied.)
  // Redrawn in place: each layer has exactly one line on the screen, the status line one.
  for (const n of [1, 2, 3, 4, 5]) assert.equal(lines.filter((l) => new RegExp(`^ +${n}/5 `).test(l)).length, 1, `layer ${n} has one line`);
  assert.equal(lines.filter((l) => l.startsWith("pull golang: ")).length, 2, "the status line and the summary");
  assert.match(done, /^pull golang: ready +11\.0 MiB \/ 11\.0 MiB +100%/m);
  for (const n of [1, 2, 3, 4, 5]) assert.match(done, new RegExp(`^ +${n}/5 sha256:[0-9a-f]{12} +done +\\d+\\.\\d [KM]iB$`, "m"));
  assert.match(done, /^pull golang: ready in \d+\.\d s: 5 layers \(0 reused\), 5\.5 MiB downloaded, 5\.5 MiB, thin id \d+$/m);
});

test("a second image shows the layers it shares as reused", async () => {
  const read = pullInPane("node");
  const done = await until(read, (t) => t.includes("exit="), "imgctl never finished");
  console.log(`--- node\n${done}`);
  for (const n of [1, 2, 3]) assert.match(done, new RegExp(`^ +${n}/5 sha256:[0-9a-f]{12} +reused `, "m"));
  for (const n of [4, 5]) assert.match(done, new RegExp(`^ +${n}/5 sha256:[0-9a-f]{12} +done `, "m"));
  assert.match(done, /^pull node: ready in \d+\.\d s: 5 layers \(3 reused\), 1\.0 MiB downloaded, 4\.5 MiB, thin id \d+$/m);
});
