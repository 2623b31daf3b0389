// The programs imgd is made of, and where each one's file is. They run either from the sources
// (Node strips the types of each .ts file as it loads it) or from the bundle that `npm run build`
// writes (scripts/bundle.ts: one .mjs file per program in dist/, the dependencies inside it but
// the native ones). The deployed units and the test VM run the bundle: a node start there loads one
// file instead of ~900 modules (under the VM's emulation, an agent start took 14-23 s from the
// sources and 7.5-10.5 s from the bundle; imgctl 9 s and 2-3 s).
import { fileURLToPath } from "node:url";

/** Bundle name (dist/NAME.mjs) -> source entry point, relative to the repository. */
export const ENTRY_POINTS = {
  imgd: "agent/main.ts",
  "imgd-privhelper": "privhelper/main.ts",
  imgctl: "client/imgctl.ts",
  "imgd-check-worker": "agent/blobs/check-worker.ts",
  "imgd-applier": "privhelper/apply/child.ts",
} as const;

export type EntryPoint = keyof typeof ENTRY_POINTS;

/**
 * The file of a program another one starts (a worker thread, the applier): the same kind the
 * caller runs from. This module is part of every bundle, so from a bundle it names its sibling in
 * dist/; from the sources, the .ts file.
 */
export function entryPointPath(name: EntryPoint): string {
  const here = import.meta.url;
  return fileURLToPath(here.endsWith(".ts") ? new URL(`../${ENTRY_POINTS[name]}`, here) : new URL(`./${name}.mjs`, here));
}
