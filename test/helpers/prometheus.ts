// Reading a /metrics scrape in tests: Prometheus' own `promtool check metrics` (Debian package
// prometheus) checks the exposition text, then the samples are read from the checked lines.
// (parse-prometheus-text-format was tried: it drops the labels of labelled histograms.)
import { spawnSync } from "node:child_process";
import { debianTool } from "./debian-tool.ts";

export const promtool = debianTool("promtool", "prometheus");

/**
 * promtool's verdict: throws when the text does not parse (exit 1); returns the lint problems
 * (exit 3: naming, help, types), one per line, [] when there is none.
 */
export function promtoolLint(text: string): string[] {
  const r = spawnSync(promtool!, ["check", "metrics"], { input: text, encoding: "utf8" });
  if (r.status === 0) return [];
  const out = `${r.stdout}${r.stderr}`.trim();
  if (r.status !== 3) throw new Error(`promtool check metrics: the text does not parse (exit ${r.status}): ${out}`);
  return out.split("\n");
}

export type Sample = { name: string; labels: Record<string, string>; value: number };

// name{a="x",b="y"} value — label values as the format escapes them (\\, \", \n).
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function samples(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) throw new Error(`not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const [, key, raw] of (m[2] ?? "").matchAll(LABEL)) labels[key!] = raw!.replace(/\\(.)/g, (_, c: string) => (c === "n" ? "\n" : c));
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

/** The value of the one sample `name` whose labels include `labels` (NaN when there is none). */
export function sampleValue(all: Sample[], name: string, labels: Record<string, string> = {}): number {
  const found = all.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (found.length > 1) throw new Error(`${name} ${JSON.stringify(labels)}: ${found.length} samples`);
  return found[0]?.value ?? NaN;
}
