// Tells, at any moment of one step attempt, whether the step is WORKING (a process death now is
// an interruption) or only WAITING for a queue slot, a lock or another run (a death now costs
// nothing: the resumed step simply waits again).
//
// Waits are nested through AsyncLocalStorage: a wait or hold started while holding a slot or
// lock belongs to that hold (its frame; the step body is the root frame). The rule: a frame
// works unless something started inside it (a wait, or a nested hold) is still going on; the
// step works when any frame works. So concurrent branches that all wait make the step waiting,
// one branch holding a slot and working makes it working, and a run that holds a lock while it
// waits for a queue slot is waiting.
// Written by hand: this is the engine's own bookkeeping, no package models it.
import { AsyncLocalStorage } from "node:async_hooks";

interface Frame {
  /** Waits and holds started inside this frame and not yet over. */
  inner: number;
}

export class WorkTracker {
  readonly #als = new AsyncLocalStorage<Frame>();
  readonly #root: Frame = { inner: 0 };
  /** Frames of the holds whose fn is running, plus the root. */
  readonly #frames = new Set<Frame>([this.#root]);
  /** Labels of the waits in progress, in start order. */
  readonly #waits: { label: string }[] = [];
  readonly #onChange: (working: boolean, waitingFor: string | undefined) => void;
  #working = true;
  #frozen = false;

  /** `onChange` is called (synchronously) whenever working flips. The attempt starts working. */
  constructor(onChange: (working: boolean, waitingFor: string | undefined) => void) {
    this.#onChange = onChange;
  }

  get working(): boolean {
    return this.#working;
  }

  /** Stops reporting changes (the attempt is over, or the engine is stopping). */
  freeze(): void {
    this.#frozen = true;
  }

  /** Runs `acquire` as a wait, then `fn` as a hold; `release` comes from acquire. */
  async hold<T>(label: string, acquire: () => Promise<() => void>, fn: () => Promise<T>): Promise<T> {
    const parent = this.#als.getStore() ?? this.#root;
    parent.inner++; // for the whole hold: the parent awaits it
    try {
      const release = await this.wait(label, acquire);
      const frame: Frame = { inner: 0 };
      this.#frames.add(frame);
      this.#update();
      try {
        return await this.#als.run(frame, fn);
      } finally {
        this.#frames.delete(frame);
        release();
      }
    } finally {
      parent.inner--;
      this.#update();
    }
  }

  /** Awaits `fn()` as waiting (not working). */
  async wait<T>(label: string, fn: () => Promise<T>): Promise<T> {
    const parent = this.#als.getStore() ?? this.#root;
    const entry = { label };
    this.#waits.push(entry);
    parent.inner++;
    this.#update();
    try {
      return await fn();
    } finally {
      this.#waits.splice(this.#waits.indexOf(entry), 1);
      parent.inner--;
      this.#update();
    }
  }

  #compute(): boolean {
    for (const frame of this.#frames) if (frame.inner === 0) return true;
    return false;
  }

  #update(): void {
    const working = this.#compute();
    if (this.#frozen || working === this.#working) return;
    this.#working = working;
    this.#onChange(working, working ? undefined : this.#waits[0]?.label);
  }
}
