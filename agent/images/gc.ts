// Garbage collection: layer devices, blobs and temp files that nothing references any more.
//
// Safe beside running pulls and activations: a device is judged and removed under the lock the
// pull takes to build it (`chain <id>`), a blob under the locks a pull takes to download it
// (`object <etag> <size>`, for every S3 object it is known as), each re-checked under its lock.
// References: any image row (pulling, ready or failed) and its layer list, the chains a running
// pull is building, activations (even half-made), devices built on a device. A device is removed
// through thin-devices.ts: marked "removing" first, so a removal cut short is finished (by the
// next GC or deletion, a pull of its chain, or reconciliation), never taken for a usable device.
import { readdir, rm } from "node:fs/promises";
import { join } from "node:path";
import type { BlobStore } from "../blobs/store.ts";
import type { Catalog } from "../catalog.ts";
import { chainsBeingBuilt } from "../doctor.ts";
import type { Fsm } from "../fsm/engine.ts";
import type { HelperClient } from "../helper-client.ts";
import type { KeyedLock } from "../keyed-lock.ts";
import type { Logger } from "../log.ts";
import { chainLock, MAINTENANCE_LOCK, objectLock } from "../lock-keys.ts";
import { removeLayerDevice } from "../thin-devices.ts";
import type { DownloadGate } from "./download-gate.ts";

export interface GcDeps {
  catalog: Catalog;
  helper: HelperClient;
  blobs: BlobStore;
  locks: KeyedLock;
  /** Shared with the pulls' downloads: the sweep of leftover files runs only between them. */
  downloads: DownloadGate;
  pull: Pick<Fsm<any, any>, "list">;
  log: Logger;
}

export interface GcReport {
  removedDevices: string[];
  removedBlobs: string[];
  freedBlobBytes: number;
  removedTempFiles: number;
}

/**
 * Removes the device of `chainId` from the pool and the catalog if nothing references it.
 * Returns the reason it was kept, or undefined once it is gone. "Ready" devices, and removals
 * cut short ("removing": nothing may use it any more); an "allocated" one is a build in progress
 * or a crash's leftover, which reconciliation handles.
 */
export async function removeDeviceIfUnreferenced(deps: Omit<GcDeps, "blobs" | "downloads">, chainId: string): Promise<string | undefined> {
  const { catalog, locks } = deps;
  return locks.run(chainLock(chainId), async () => {
    const row = catalog.getDevice(chainId);
    if (!row) return "already gone";
    if (row.state === "allocated") return "it is being built";
    const reference = catalog.deviceReference(chainId);
    if (reference) return reference;
    const running = deps.pull.list({ status: "running", limit: 100_000 }).map((run) => run.resourceId);
    if (row.state === "ready" && chainsBeingBuilt(catalog, running).has(chainId)) return "a running pull uses it";
    await removeLayerDevice(deps, row);
    deps.log("info", "removed unreferenced layer device", { chainId, name: row.name, thinId: row.thinId });
    return undefined;
  });
}

export async function collectGarbage(deps: GcDeps): Promise<GcReport> {
  return deps.locks.run(MAINTENANCE_LOCK, async () => {
    const report: GcReport = { removedDevices: [], removedBlobs: [], freedBlobBytes: 0, removedTempFiles: 0 };
    // Top-most devices first; removing one may free its parent, so go until nothing moves.
    for (let removed = true; removed; ) {
      removed = false;
      for (const device of deps.catalog.listDevices().reverse()) {
        if (device.state === "allocated" || deps.catalog.deviceReference(device.chainId)) continue;
        if ((await removeDeviceIfUnreferenced(deps, device.chainId)) === undefined) {
          report.removedDevices.push(device.name);
          removed = true;
        }
      }
    }
    for (const blob of deps.catalog.listBlobs()) {
      if (deps.catalog.blobReferenced(blob.digest)) continue;
      if (await removeBlobIfUnreferenced(deps, blob.digest)) {
        report.removedBlobs.push(blob.digest);
        report.freedBlobBytes += blob.size;
      }
    }
    // Files are made only inside downloads: between them, files in tmp/ are leftovers, and so
    // are blob files the catalog never recorded (a crash between rename and record). With a
    // download in flight the sweep is skipped (download-gate.ts).
    const swept = await deps.downloads.trySweep(() => removeLeftoverFiles(deps));
    if (swept.swept) {
      report.removedTempFiles = swept.value.tempFiles;
      report.removedBlobs.push(...swept.value.blobs);
    } else deps.log("info", "leftover files not swept: a download is in flight", { downloads: deps.downloads.downloadsInFlight });
    deps.log("info", "garbage collected", { ...report });
    return report;
  });
}

/** Under every download lock of the blob's S3 objects: no pull is fetching or recording it. */
async function removeBlobIfUnreferenced(deps: GcDeps, digest: string): Promise<boolean> {
  const keys = [...new Set(deps.catalog.blobObjects(digest).map(objectLock))].sort();
  const underLocks = (i: number): Promise<boolean> =>
    i < keys.length
      ? deps.locks.run(keys[i]!, () => underLocks(i + 1))
      : (async () => {
          if (deps.catalog.blobReferenced(digest)) return false;
          deps.catalog.forgetBlob(digest);
          await deps.blobs.remove(digest);
          deps.log("info", "removed unreferenced blob", { digest });
          return true;
        })();
  return underLocks(0);
}

async function removeLeftoverFiles({ catalog, blobs }: GcDeps): Promise<{ tempFiles: number; blobs: string[] }> {
  let tempFiles = 0;
  for (const entry of await readdir(blobs.tmpDir, { withFileTypes: true })) {
    if (!entry.isFile()) continue;
    await rm(join(blobs.tmpDir, entry.name), { force: true });
    tempFiles++;
  }
  const known = new Set(catalog.listBlobs().map((b) => b.digest.slice("sha256:".length)));
  const removed: string[] = [];
  for (const entry of await readdir(blobs.blobDir, { withFileTypes: true })) {
    if (!entry.isFile() || known.has(entry.name) || !/^[0-9a-f]{64}$/.test(entry.name)) continue;
    await blobs.remove(`sha256:${entry.name}`);
    removed.push(`sha256:${entry.name}`);
  }
  return { tempFiles, blobs: removed };
}
