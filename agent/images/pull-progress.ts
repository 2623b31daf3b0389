// What each layer of a running pull is doing, and the whole image's bytes: the state behind the
// PullImage stream (one per run, so every caller following the run sees the same). It is also
// the one place that decides how often the stream hears about it: at once when a layer changes
// phase, otherwise at most once per PROGRESS_INTERVAL_MS while bytes move.
//
// Applying is measured per layer: the root helper's layer.apply answers once, at the end, so an
// applying layer reports 0 bytes applied until it is done (then its size).

export type LayerPhase = "pending" | "reused" | "downloading" | "applying" | "done";

export type LayerProgress = {
  position: number;
  digest: string;
  phase: LayerPhase;
  /** The phase's bytes: downloaded, or applied; the size once done or reused; 0 while pending. */
  bytesDone: number;
  /** The layer's size. */
  bytesTotal: number;
};

export type PullProgress = {
  layers: LayerProgress[];
  /** Downloaded plus applied bytes of the whole image, of ... */
  bytesDone: number;
  /** ... twice the size of every layer still to fetch and apply (once when its blob is stored, 0 when reused). */
  bytesTotal: number;
};

/** How a layer starts, as the pull's plan found it. */
export interface PlannedLayer {
  position: number;
  size: number;
  digest?: string;
  /** Its blob is already in the store: nothing to download. */
  stored: boolean;
  /** Its device (and every one before it) already exists: nothing to do at all. */
  reused: boolean;
}

export const PROGRESS_INTERVAL_MS = 250;

interface LayerState {
  position: number;
  digest: string;
  size: number;
  phase: LayerPhase;
  downloadDone: number;
  downloadTotal: number;
  applyDone: number;
  applyTotal: number;
}

/** One run's layers. Every change goes through #changed, which throttles what is emitted. */
export class RunProgress {
  readonly #layers: LayerState[];
  #emit: (progress: PullProgress) => void = () => {};
  #lastEmit = 0;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(plan: PlannedLayer[]) {
    this.#layers = plan.map((l) => ({
      position: l.position,
      digest: l.digest ?? "",
      size: l.size,
      phase: l.reused ? "reused" : "pending",
      downloadDone: 0,
      downloadTotal: l.reused || l.stored ? 0 : l.size,
      applyDone: 0,
      applyTotal: l.reused ? 0 : l.size,
    }));
  }

  /** Where updates go: the step running now (its ctx.progress). Emits the current state at once. */
  attach(emit: (progress: PullProgress) => void): void {
    this.#emit = emit;
    this.#flush();
  }

  /** Bytes of the layer downloaded so far (called per chunk). */
  downloading(position: number, bytes: number): void {
    const layer = this.#layer(position);
    const phaseChange = layer.phase !== "downloading";
    layer.phase = "downloading";
    layer.downloadDone = Math.max(layer.downloadDone, Math.min(bytes, layer.downloadTotal));
    this.#changed(phaseChange);
  }

  /** The layer's blob is stored (downloaded now, or found stored): its download part is done. */
  stored(position: number, digest: string, size: number): void {
    const layer = this.#layer(position);
    layer.digest = digest;
    if (size !== layer.size && layer.applyTotal > 0) {
      // The object was replaced since it was listed: the stored version is what gets applied.
      if (layer.downloadTotal > 0) layer.downloadTotal = size;
      layer.size = layer.applyTotal = size;
    }
    layer.downloadDone = layer.downloadTotal;
    this.#changed(false);
  }

  applying(position: number): void {
    const layer = this.#layer(position);
    this.#finishDownload(layer);
    layer.phase = "applying";
    this.#changed(true);
  }

  applied(position: number): void {
    const layer = this.#layer(position);
    this.#finishDownload(layer);
    layer.phase = "done";
    layer.applyDone = layer.applyTotal;
    this.#changed(true);
  }

  /** Its device turned out to exist already (made by another image's pull meanwhile). */
  reused(position: number): void {
    const layer = this.#layer(position);
    // "done": this run built it, in an attempt before a retry that now finds it ready.
    if (layer.phase === "reused" || layer.phase === "done") return;
    this.#finishDownload(layer);
    layer.phase = "reused";
    layer.applyTotal = layer.applyDone = 0;
    this.#changed(true);
  }

  snapshot(): PullProgress {
    let bytesDone = 0;
    let bytesTotal = 0;
    const layers = this.#layers.map((l): LayerProgress => {
      bytesDone += l.downloadDone + l.applyDone;
      bytesTotal += l.downloadTotal + l.applyTotal;
      const phaseBytes = { pending: 0, reused: l.size, downloading: l.downloadTotal === 0 ? l.size : l.downloadDone, applying: l.applyDone, done: l.size }[l.phase];
      return { position: l.position, digest: l.digest, phase: l.phase, bytesDone: phaseBytes, bytesTotal: l.size };
    });
    return { layers, bytesDone, bytesTotal };
  }

  /** Sends what is pending and stops: nothing is emitted after this. */
  close(): void {
    if (this.#timer) this.#flush();
    this.#closed = true;
  }

  /** A layer that starts applying has its blob: any download bytes not counted yet are done. */
  #finishDownload(layer: LayerState): void {
    layer.downloadDone = layer.downloadTotal;
  }

  #layer(position: number): LayerState {
    const layer = this.#layers.find((l) => l.position === position);
    if (!layer) throw new Error(`pull progress: no layer ${position}`);
    return layer;
  }

  #changed(phaseChange: boolean): void {
    if (this.#closed) return;
    const wait = this.#lastEmit + PROGRESS_INTERVAL_MS - Date.now();
    if (phaseChange || wait <= 0) return this.#flush();
    // Bytes moved within the interval: one trailing update carries them (and any that follow).
    this.#timer ??= setTimeout(() => this.#flush(), wait).unref();
  }

  #flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#closed) return;
    this.#lastEmit = Date.now();
    this.#emit(this.snapshot());
  }
}

/** The progress of every pull run in this process, by run id. */
export class PullProgressBoard {
  readonly #runs = new Map<string, RunProgress>();

  get(runId: string): RunProgress | undefined {
    return this.#runs.get(runId);
  }

  /** Starts tracking a run (again, after a restart) from its plan. */
  open(runId: string, plan: PlannedLayer[]): RunProgress {
    this.#runs.get(runId)?.close();
    const run = new RunProgress(plan);
    this.#runs.set(runId, run);
    return run;
  }

  /** The run has finished: flush its last update and forget it. */
  close(runId: string): void {
    this.#runs.get(runId)?.close();
    this.#runs.delete(runId);
  }
}
