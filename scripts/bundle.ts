// `npm run build`: every program of imgd as one ESM file in dist/ (see privhelper/entry-points.ts
// for why, and for the list). esbuild, not a hand-written concatenation: it resolves the packages'
// CommonJS and ESM the way Node does. Needs the generated code (buf generate, run by `npm run build`
// first). Kept out of the bundle: the native addons (their .node files load from node_modules).
import { rmSync } from "node:fs";
import { join } from "node:path";
import { build } from "esbuild";
import { ENTRY_POINTS } from "../privhelper/entry-points.ts";

const repo = join(import.meta.dirname, "..");
const outdir = join(repo, "dist");
const started = performance.now();
rmSync(outdir, { recursive: true, force: true });
await build({
  absWorkingDir: repo,
  entryPoints: Object.entries(ENTRY_POINTS).map(([out, source]) => ({ out, in: source })),
  outdir,
  outExtension: { ".js": ".mjs" },
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node24",
  external: ["better-sqlite3", "koffi"],
  // Function and class names stay as written (errors and logs name them).
  keepNames: true,
  // The bundled CommonJS packages call require() for Node's own modules: an ESM file has none.
  banner: { js: 'import { createRequire as __imgdCreateRequire } from "node:module"; const require = __imgdCreateRequire(import.meta.url);' },
  logLevel: "warning",
});
console.log(`bundle: ${Object.keys(ENTRY_POINTS).map((name) => `dist/${name}.mjs`).join(", ")} in ${((performance.now() - started) / 1000).toFixed(1)} s`);
