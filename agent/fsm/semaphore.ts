// Counting semaphore with FIFO fairness and AbortSignal support, used to bound how many steps
// do one kind of work at once (downloads, device operations) inside FSM steps.

export interface SemaphoreSlot {
  /** Gives the slot back; calling it again does nothing. */
  release(): void;
  [Symbol.dispose](): void;
  [Symbol.asyncDispose](): Promise<void>;
}

interface Waiter {
  grant(): void;
}

export class Semaphore {
  readonly name: string;
  readonly limit: number;
  #inUse = 0;
  readonly #waiters: Waiter[] = [];

  constructor(name: string, limit: number) {
    if (!Number.isInteger(limit) || limit < 1) {
      throw new RangeError(`queue "${name}": limit must be an integer >= 1, got ${limit}`);
    }
    this.name = name;
    this.limit = limit;
  }

  /** Slots currently held. */
  get inUse(): number {
    return this.#inUse;
  }

  /** Callers blocked in acquire(). */
  get waiting(): number {
    return this.#waiters.length;
  }

  /** A slot if one is free right now, otherwise undefined (never waits). */
  tryAcquire(): SemaphoreSlot | undefined {
    if (this.#inUse >= this.limit) return undefined;
    this.#inUse++;
    return this.#slot();
  }

  /**
   * Waits for a slot in FIFO order. Rejects with `signal.reason` if the signal fires first
   * (the caller then holds nothing).
   */
  acquire(signal?: AbortSignal): Promise<SemaphoreSlot> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    const slot = this.tryAcquire();
    if (slot) return Promise.resolve(slot);
    return new Promise((resolve, reject) => {
      const onAbort = (): void => {
        const index = this.#waiters.indexOf(waiter);
        if (index >= 0) this.#waiters.splice(index, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter = {
        grant: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve(this.#slot());
        },
      };
      this.#waiters.push(waiter);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  #slot(): SemaphoreSlot {
    let held = true;
    const release = (): void => {
      if (!held) return;
      held = false;
      const next = this.#waiters.shift();
      // Hand the slot straight to the next waiter, so nobody can overtake the queue.
      if (next) next.grant();
      else this.#inUse--;
    };
    return {
      release,
      [Symbol.dispose]: release,
      [Symbol.asyncDispose]: async () => release(),
    };
  }
}
