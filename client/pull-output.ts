// What `imgctl pull` prints while it follows a pull stream, in the three human forms:
// terminal: a status line and one line per layer, redrawn in place (bytes, percentage, rate),
//           then a summary line;
// log:      one line per layer phase change (a handful per image), then the summary line;
// quiet:    nothing (the exit code, and errors on stderr, say how it went).
// (--json is not here: each stream message is printed as it comes, see proto-json.ts.)
import type { WriteStream } from "node:tty";
import { LayerPhase, RunStatus, type LayerProgress, type PullImageResponse } from "./sdk.ts";

export type PullView = { update(message: PullImageResponse): void; finish(last: PullImageResponse | undefined): void };

const PHASE_NAMES: Record<LayerPhase, string> = {
  [LayerPhase.UNSPECIFIED]: "?",
  [LayerPhase.PENDING]: "pending",
  [LayerPhase.REUSED]: "reused",
  [LayerPhase.DOWNLOADING]: "downloading",
  [LayerPhase.APPLYING]: "applying",
  [LayerPhase.DONE]: "done",
};

/** When each layer entered its phase (as this client saw it), and what the pull downloaded. */
class Timeline {
  readonly started = Date.now();
  readonly #since = new Map<number, { phase: LayerPhase; at: number }>();
  readonly downloaded = new Map<number, bigint>();

  /** Records the layer's phase; true when it changed. */
  see(layer: LayerProgress): boolean {
    if (layer.phase === LayerPhase.DOWNLOADING) this.downloaded.set(layer.position, layer.bytesTotal);
    const seen = this.#since.get(layer.position);
    if (seen?.phase === layer.phase) return false;
    this.#since.set(layer.position, { phase: layer.phase, at: Date.now() });
    return true;
  }

  /** Seconds since the layer entered its current phase. */
  inPhase(layer: LayerProgress): number {
    return (Date.now() - (this.#since.get(layer.position)?.at ?? Date.now())) / 1000;
  }

  elapsed(): number {
    return (Date.now() - this.started) / 1000;
  }

  summary(image: string, last: PullImageResponse): string {
    const reused = last.layers.filter((l) => l.phase === LayerPhase.REUSED).length;
    const downloaded = [...this.downloaded.values()].reduce((a, b) => a + b, 0n);
    const what = last.runId === "" ? "already ready" : `ready in ${this.elapsed().toFixed(1)} s`;
    return `pull ${image}: ${what}: ${last.layers.length} layers (${reused} reused), ${size(downloaded)} downloaded, ${size(last.image?.size ?? 0n)}, thin id ${last.image?.thinId ?? 0}`;
  }
}

export function quietView(): PullView {
  return { update() {}, finish() {} };
}

/** One line per layer phase change, for logs. */
export function logView(image: string, write: (line: string) => void): PullView {
  const timeline = new Timeline();
  let said = false;
  return {
    update(m) {
      if (!said && m.runId) {
        write(`pull ${image}: ${m.joined ? "following run" : "run"} ${m.runId}${m.joined ? " (started by another caller)" : ""}`);
        said = true;
      }
      for (const layer of m.layers) {
        const took = timeline.inPhase(layer);
        if (!timeline.see(layer)) continue;
        if (layer.phase === LayerPhase.PENDING) continue; // where every layer starts: nothing happened
        const detail =
          layer.phase === LayerPhase.DONE ? `${size(layer.bytesTotal)}, applied in ${took.toFixed(1)} s` :
          layer.phase === LayerPhase.APPLYING ? `${size(layer.bytesTotal)}` :
          `${size(layer.bytesTotal)}${layer.digest ? `, ${shortDigest(layer.digest)}` : ""}`;
        write(`pull ${image}: layer ${layer.position}/${m.layers.length} ${PHASE_NAMES[layer.phase]} (${detail})`);
      }
    },
    finish(last) {
      if (last?.status === RunStatus.SUCCEEDED) {
        for (const layer of last.layers) timeline.see(layer);
        write(timeline.summary(image, last));
      }
    },
  };
}

/** A status line and one line per layer, redrawn in place. */
export function terminalView(image: string, out: WriteStream): PullView {
  const timeline = new Timeline();
  let drawn = 0;
  const draw = (m: PullImageResponse) => {
    for (const layer of m.layers) timeline.see(layer);
    const lines = [statusLine(image, m, timeline), ...m.layers.map((l) => layerLine(l, m.layers.length, timeline))];
    const width = Math.max(20, (out.columns || 100) - 1); // a wrapped line would break the redraw
    if (drawn > 0) out.moveCursor(0, -drawn);
    for (const line of lines) {
      out.clearLine(0);
      out.write(`${line.slice(0, width)}\n`);
    }
    drawn = lines.length;
  };
  return {
    update: draw,
    finish(last) {
      if (last === undefined) return;
      draw(last);
      if (last.status === RunStatus.SUCCEEDED) out.write(`${timeline.summary(image, last)}\n`);
    },
  };
}

function statusLine(image: string, m: PullImageResponse, timeline: Timeline): string {
  const state = m.status === RunStatus.SUCCEEDED ? "ready" : m.state || "starting";
  if (m.bytesTotal === 0n) return `pull ${image}: ${state}`;
  const rate = Number(m.bytesDone) / Math.max(timeline.elapsed(), 0.001);
  return `pull ${image}: ${state.padEnd(8)} ${size(m.bytesDone)} / ${size(m.bytesTotal)}  ${percent(m.bytesDone, m.bytesTotal)}  ${size(rate)}/s`;
}

function layerLine(l: LayerProgress, count: number, timeline: Timeline): string {
  // A layer downloaded in full waits for its turn to be applied.
  const downloaded = l.phase === LayerPhase.DOWNLOADING && l.bytesDone === l.bytesTotal;
  const phase = downloaded ? "downloaded" : PHASE_NAMES[l.phase];
  const head = `  ${`${l.position}/${count}`.padStart(5)} ${(l.digest ? shortDigest(l.digest) : "").padEnd(19)} ${phase.padEnd(11)}`;
  switch (l.phase) {
    case LayerPhase.DOWNLOADING: {
      if (downloaded) return `${head} ${size(l.bytesTotal).padStart(21)}`;
      const rate = Number(l.bytesDone) / Math.max(timeline.inPhase(l), 0.001);
      return `${head} ${`${size(l.bytesDone)} / ${size(l.bytesTotal)}`.padStart(21)}  ${percent(l.bytesDone, l.bytesTotal).padStart(4)}  ${size(rate)}/s`;
    }
    case LayerPhase.APPLYING:
      return `${head} ${size(l.bytesTotal).padStart(21)}  ${timeline.inPhase(l).toFixed(1)} s`;
    default:
      return `${head} ${size(l.bytesTotal).padStart(21)}`;
  }
}

const shortDigest = (digest: string) => digest.slice(0, "sha256:".length + 12);

function percent(done: bigint, total: bigint): string {
  return total === 0n ? "100%" : `${Math.floor((Number(done) / Number(total)) * 100)}%`;
}

/** Bytes for people: B, KiB, MiB or GiB with one decimal. */
export function size(n: bigint | number): string {
  const v = Number(n);
  if (v < 1024) return `${Math.round(v)} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let x = v / 1024;
  let u = 0;
  while (x >= 1024 && u < units.length - 1) {
    x /= 1024;
    u++;
  }
  return `${x.toFixed(1)} ${units[u]}`;
}
