// Fills Node's compile cache (NODE_COMPILE_CACHE = .vm/node-compile-cache) on the host before the
// VM boots, so that the guest's many node starts (services restarted by the tests, imgctl, test
// files) skip TypeScript stripping and JS compilation: that is about half of a node start's CPU,
// and seconds each under emulation. The guest reads the same cache over 9p: same paths, same
// Node. Node keeps a cache directory per user id, so test/vm/run runs this as root (`root`) and
// as the guest's service user (`agent`). Importing is enough: Node writes the cache at exit.
//
//   NODE_COMPILE_CACHE=DIR node test/vm/warm-compile-cache.ts root|agent
//
// Only modules without side effects are imported (not the programs' main files, which are
// small); each pulls in its own imports. A module that no longer exists is skipped.
import { createRequire } from "node:module";

const AGENT = ["agent/app.ts", "agent/config.ts", "agent/log.ts"];
const ROOT = [
  ...AGENT,
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
for (const path of which === "agent" ? AGENT : ROOT) {
  await import(new URL(path, repo).href).catch((err: { code?: string }) => {
    if (err.code !== "ERR_MODULE_NOT_FOUND") throw err;
    missing.push(path);
  });
}
if (which === "root") for (const name of PACKAGES) createRequire(import.meta.url)(name);
if (missing.length > 0) console.error(`warm-compile-cache: skipped ${missing.join(", ")} (not found)`);
process.exit(0);
