// privhelper/main.ts as systemd runs it: JSON log lines with a level, READY=1 on NOTIFY_SOCKET
// once it listens (a real Unix datagram socket, bound by python3 as systemd would), the state
// directory's mode left as the unit made it, and a fatal start-up error as a JSON line, exit 1.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";

const MAIN = join(import.meta.dirname, "../../privhelper/main.ts");
const opts = { skip: process.getuid?.() !== 0 ? "the helper runs as root" : false };

test("ready: READY=1 on NOTIFY_SOCKET once it listens, JSON lines with a level, the state directory's mode untouched", opts, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "imgd-helper-main-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const state = join(dir, "state");
  mkdirSync(state);
  chmodSync(state, 0o750); // not the 0700 it would create: it must stay what the unit made
  const notify = join(dir, "notify.sock");
  // systemd's side of the notify socket: one datagram, printed.
  const receiver = spawn("python3", ["-c", `import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint("bound",flush=True)\nprint(s.recv(4096).decode(),flush=True)`, notify], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => receiver.kill());
  let received = "";
  receiver.stdout.setEncoding("utf8").on("data", (chunk: string) => (received += chunk));
  while (!received.includes("bound")) await once(receiver.stdout, "data");

  const env = { PATH: process.env.PATH, NOTIFY_SOCKET: notify, IMGD_HELPER_SOCKET: join(dir, "h.sock"), IMGD_HELPER_GROUP: "0", IMGD_HELPER_STATE_DIR: state, IMGD_AGENT_USER: "nobody", IMGD_BLOB_DIR: join(dir, "blobs") };
  const helper = spawn(process.execPath, [MAIN], { env, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  helper.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  t.after(() => helper.kill("SIGKILL"));
  const deadline = Date.now() + 30_000;
  while (!received.includes("READY=1") && Date.now() < deadline && helper.exitCode === null) await new Promise((r) => setTimeout(r, 50));
  assert.match(received, /^READY=1\nSTATUS=listening on /m, stderr);
  assert.ok(existsSync(join(dir, "h.sock")), "ready only once the socket exists");
  assert.equal(statSync(state).mode & 0o777, 0o750);

  helper.kill("SIGTERM");
  await once(helper, "exit");
  const lines = stderr.trim().split("\n").map((l) => JSON.parse(l) as { level: string; component: string; msg: string });
  assert.deepEqual(lines.map((l) => [l.level, l.component, l.msg]), [
    ["info", "imgd-privhelper", "imgd-privhelper listening"],
    ["info", "imgd-privhelper", "shutting down"],
  ]);
});

test("a fatal start-up error is one JSON line at level error, exit 1", opts, () => {
  const r = spawnSync(process.execPath, [MAIN], { encoding: "utf8", env: { PATH: process.env.PATH, IMGD_HELPER_GROUP: "no-such-group-imgd" }, timeout: 60_000 });
  assert.equal(r.status, 1);
  const line = JSON.parse(r.stderr) as Record<string, string>;
  assert.deepEqual([line.level, line.component, line.msg], ["error", "imgd-privhelper", "imgd-privhelper failed to start"]);
  assert.match(line.error!, /group no-such-group-imgd not found/);
});
