// Will a layer fit? Checked before its device is made, so a layer that cannot fit is refused
// with a clear reason instead of filling the pool (which error_if_no_space turns into a failed
// write mid-apply) or, worse, running its metadata out of space, which can leave a pool that
// needs repair. The estimate is deliberately generous; the kernel remains the hard limit.
import type { PoolUsage } from "../../privhelper/protocol.ts";
import type { LayerSummary } from "../layers/validate.ts";

export interface LayerSize {
  /** Bytes of file content the layer writes (for sparse files, with a block per data region). */
  fileBytes: number;
  /** Entries (each costs at least an inode and often a block). */
  entries: number;
}

const FS_BLOCK = 4096;

/**
 * What a validated layer writes: its files' stored bytes (a sparse file's holes are never
 * written, however large its real size), plus a filesystem block for each sparse data region,
 * which may start and end inside partly written blocks.
 */
export function layerSizeOf(summary: Pick<LayerSummary, "fileBytes" | "entries" | "sparseRegions">): LayerSize {
  return { fileBytes: summary.fileBytes + summary.sparseRegions * FS_BLOCK, entries: summary.entries };
}
const MiB = 1024 * 1024;
/** Journal, directory and bitmap blocks copied on write when a snapshot is modified. */
const FIXED_OVERHEAD = 16 * MiB;
/**
 * A first layer also pays for mkfs: superblock copies, group descriptors, bitmaps and inode
 * table heads spread over an 8 GiB filesystem each take a whole pool block, and the journal's
 * first blocks are provisioned as it is written. Measured in the VM (1 MiB pool blocks): a
 * first layer of one 8 MiB file cost 27 MiB, 11 MiB more than FIXED_OVERHEAD alone allowed.
 */
const FRESH_FILESYSTEM_OVERHEAD = 16 * MiB;
/** Metadata kept free: a thin pool out of metadata space may need offline repair. */
const METADATA_RESERVE = 0.1;
/** btree mapping cost per data block, generously (each mapping is ~16 bytes in a leaf). */
const METADATA_PER_BLOCK = 64;

/** freshFilesystem: the layer is the first of its chain, applied to a new device after mkfs. */
export function estimatedDataBytes(layer: LayerSize, pool: Pick<PoolUsage, "blockSizeBytes">, freshFilesystem = false): number {
  const fs = layer.fileBytes + layer.entries * FS_BLOCK + FIXED_OVERHEAD + (freshFilesystem ? FRESH_FILESYSTEM_OVERHEAD : 0);
  return Math.ceil(fs / pool.blockSizeBytes) * pool.blockSizeBytes;
}

/** Why the layer cannot be applied to the pool now, or undefined when it fits. */
export function spaceProblem(layer: LayerSize, pool: PoolUsage, freshFilesystem = false): string | undefined {
  const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
  if (pool.mode !== "rw") return `pool ${pool.name} is ${pool.mode}, not writable`;
  const needData = estimatedDataBytes(layer, pool, freshFilesystem);
  const freeData = pool.dataTotalBytes - pool.dataUsedBytes;
  if (needData > freeData) return `pool ${pool.name} has ${mib(freeData)} of data space free; the layer needs about ${mib(needData)}`;
  const needMeta = (needData / pool.blockSizeBytes) * METADATA_PER_BLOCK;
  const usableMeta = pool.metaTotalBytes * (1 - METADATA_RESERVE) - pool.metaUsedBytes;
  if (needMeta > usableMeta) {
    return `pool ${pool.name} has ${mib(Math.max(0, usableMeta))} of metadata space free above its ${METADATA_RESERVE * 100}% reserve; the layer needs about ${mib(needMeta)}`;
  }
  return undefined;
}
