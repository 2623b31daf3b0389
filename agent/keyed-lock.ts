// In-process mutual exclusion per key: two runs that need the same chain device or the same
// blob wait for each other instead of building it twice. The agent is the only writer of its
// state directory, so a process-local lock is enough. FSM steps take these locks through the
// engine (ctx.withLock), so that waiting for one is not counted as work.
export class KeyedLock {
  private readonly tails = new Map<string, Promise<void>>();

  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire(key);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /**
   * Waits for the key (FIFO) and resolves with its release function. If `signal` fires first,
   * rejects with its reason; the queue behind this caller is not disturbed.
   */
  async acquire(key: string, signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted();
    const previous = this.tails.get(key) ?? Promise.resolve();
    let open!: () => void;
    const current = new Promise<void>((resolve) => (open = resolve));
    const tail = previous.then(() => current);
    this.tails.set(key, tail);
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      open();
      // Forget the key once everyone before (and including) this holder is done.
      void tail.then(() => {
        if (this.tails.get(key) === tail) this.tails.delete(key);
      });
    };
    if (!signal) {
      await previous;
      return release;
    }
    try {
      await new Promise<void>((resolve, reject) => {
        const onAbort = (): void => reject(signal.reason);
        signal.addEventListener("abort", onAbort, { once: true });
        void previous.then(() => {
          signal.removeEventListener("abort", onAbort);
          resolve();
        });
      });
    } catch (err) {
      release(); // gave up its turn: those behind still wait for the holders before it
      throw err;
    }
    return release;
  }
}
