// Downloads and the sweep of leftover files exclude each other. A download makes a temp file,
// renames it into the blob store and only then records the blob in the catalog; a sweep deletes
// temp files and blob files the catalog has not recorded. Checking "no pull is running" once and
// then deleting loses the file of a download that starts in between, so both sides go through
// this gate: any number of downloads at a time, or one sweep. A sweep never waits for downloads
// (a layer may take minutes): with one in flight it is skipped, and GC or a repair runs it later.
// Downloads that arrive during a sweep (a few readdir and rm calls) wait for it to end.
// Written by hand: a shared/exclusive lock with a try-exclusive is a dozen lines, and no
// dependency of the project offers one.
export class DownloadGate {
  #downloads = 0;
  #sweep: Promise<void> | undefined;

  /** Runs one download (temp file → blob file → catalog record) as a shared holder. */
  async download<T>(fn: () => Promise<T>): Promise<T> {
    while (this.#sweep) await this.#sweep;
    this.#downloads++;
    try {
      return await fn();
    } finally {
      this.#downloads--;
    }
  }

  /** Runs `fn` alone if no download is in flight (and no other sweep); otherwise skips it. */
  async trySweep<T>(fn: () => Promise<T>): Promise<{ swept: true; value: T } | { swept: false }> {
    if (this.#downloads > 0 || this.#sweep) return { swept: false };
    let done!: () => void;
    this.#sweep = new Promise<void>((resolve) => (done = resolve));
    try {
      return { swept: true, value: await fn() };
    } finally {
      this.#sweep = undefined;
      done();
    }
  }

  get downloadsInFlight(): number {
    return this.#downloads;
  }
}
