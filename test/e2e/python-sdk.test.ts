// End to end, inside the VM: the Python SDK (client/python), generated here with Debian's protoc
// and grpc_python_plugin, run by Debian's python3 (python3-protobuf, python3-grpcio) against the
// live agent. client/python/test_sdk.py holds the checks; this file generates the SDK, runs it
// and reads its verdict.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";

const repo = join(import.meta.dirname, "../..");
// Debian's interpreter, not whichever python3 comes first on PATH: the SDK uses Debian's modules.
const python = "/usr/bin/python3";
let out: string;

before(() => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: npm run test:vm");
  // The program pulls python and node itself: start from a fresh agent and pool.
  execFileSync("vm-reset", { stdio: "inherit" });
  out = mkdtempSync("/tmp/imgd-python-sdk-");
});
after(() => rmSync(out, { recursive: true, force: true }));

test("the generated Python SDK pulls, activates, pages, deactivates and reads ErrorInfo against the live agent", () => {
  execFileSync("bash", [join(repo, "client/python/generate.sh"), join(out, "sdk")], { stdio: "inherit" });
  const run = spawnSync(python, [join(repo, "client/python/test_sdk.py"), "python", "node"], {
    encoding: "utf8",
    env: { ...process.env, PYTHONPATH: join(out, "sdk") },
    timeout: 20 * 60_000,
  });
  const output = `${run.stdout}${run.stderr}`;
  console.log(output);
  assert.equal(run.status, 0, `test_sdk.py failed (status ${run.status}, signal ${run.signal}):\n${output}`);
  const verdict = /^python sdk: ([0-9]+) steps passed$/m.exec(run.stdout);
  assert.ok(verdict, "the program ran to its end");
  const passed = run.stdout.split("\n").filter((line) => /^ok step_/.test(line));
  assert.ok(passed.length > 0);
  assert.equal(passed.length, Number(verdict[1]), "every step reported ok");
});
