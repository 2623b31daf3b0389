// Fills Node's compile cache (NODE_COMPILE_CACHE = .vm/node-compile-cache) on the host before the
// VM boots, so that the guest's many node starts (services restarted by the tests, imgctl, test
// files) skip TypeScript stripping and JS compilation: that is about half of a node start's CPU,
// and seconds each under emulation. The guest reads the same cache over 9p: same paths, same
// Node. Node keeps a cache directory per user id, so test/vm/run runs this as root (`root`) and
// as the guest's service user (`agent`). Importing is enough: Node writes the cache at exit.
//
//   NODE_COMPILE_CACHE=DIR node test/vm/warm-compile-cache.ts root|agent
//
// The programs themselves run from the bundle (dist/): each is compiled by a `--version` start.
// Of the sources, only modules without side effects are imported (what the test files load);
// each pulls in its own imports. A module that no longer exists is skipped.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

// A start that only prints its version or usage (the helper has no --version: it stops at its
// configuration, after compiling).
const BUNDLES = { agent: [["imgd", "--version"]], root: [["imgd-privhelper", "--version"], ["imgctl", "--help"]] };
const ROOT = [
  "agent/app.ts",
  "agent/config.ts",
  "agent/log.ts",
  "client/sdk.ts",
  "agent/helper-client.ts",
  "privhelper/config.ts",
  "privhelper/operations.ts",
  "privhelper/run.ts",
  "privhelper/server.ts",
  "privhelper/apply/oci-apply.ts",
  "privhelper/apply/decompress.ts",
  "privhelper/apply/libc.ts",
  "test/fixtures/s3rver-store.ts",
  "test/fixtures/hostile-corpus.ts",
  "test/fixtures/tree.ts",
  "test/helpers/crash-harness.ts",
  "test/helpers/soak.ts",
];
const PACKAGES = ["s3rver", "@aws-sdk/client-s3", "better-sqlite3", "tar-stream"];

const which = process.argv[2];
if (which !== "root" && which !== "agent") throw new Error("usage: warm-compile-cache.ts root|agent");
const repo = new URL("../../", import.meta.url);
const missing: string[] = [];
for (const [name, arg] of BUNDLES[which]) {
  const file = fileURLToPath(new URL(`dist/${name}.mjs`, repo));
  if (existsSync(file)) spawnSync(process.execPath, [file, arg], { stdio: "ignore" });
  else missing.push(`dist/${name}.mjs`);
}
for (const path of which === "agent" ? [] : ROOT) {
  await import(new URL(path, repo).href).catch((err: { code?: string }) => {
    if (err.code !== "ERR_MODULE_NOT_FOUND") throw err;
    missing.push(path);
  });
}
if (which === "root") for (const name of PACKAGES) createRequire(import.meta.url)(name);
if (missing.length > 0) console.error(`warm-compile-cache: skipped ${missing.join(", ")} (not found)`);
process.exit(0);
