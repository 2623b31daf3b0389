// ext4 on thin devices: making the filesystem of a new base layer. (The helper mounts nothing in
// the host's namespace: the layer applier mounts in a private one, and nothing else needs to.)
import type { HelperConfig } from "./config.ts";
import { HelperFailure } from "./errors.ts";
import { ownLayerDevice } from "./ownership.ts";
import { run } from "./run.ts";

export async function makeFilesystem(config: HelperConfig, name: string): Promise<void> {
  const { path } = await ownLayerDevice(config, name);
  // blkid exit 2 = no signature found. Anything found (ext4, swap, a partition table) means the
  // device is not fresh; formatting it would destroy data, so refuse.
  const probe = await run("blkid", ["--probe", "--output", "export", path], { allowExitCodes: [2] });
  if (probe.exitCode === 0) {
    const type = /^TYPE=(.*)$/m.exec(probe.stdout)?.[1] ?? /^PTTYPE=(.*)$/m.exec(probe.stdout)?.[1] ?? "a signature";
    throw new HelperFailure("HAS_FILESYSTEM", `device ${name} already carries ${type}; refusing to format it`);
  }
  // Options chosen so that mkfs provisions only the metadata it writes, not the virtual size:
  // - lazy_itable_init=1: inode tables are not zeroed. Costs nothing here because unprovisioned
  //   thin blocks read as zeros; the applier mounts with noinit_itable so the kernel never zeroes
  //   them either.
  // - lazy_journal_init=1: the journal is not zeroed (same reasoning). On a device that could hold
  //   stale data this would risk replaying garbage after a crash; a fresh thin device cannot.
  // - nodiscard: no discard pass over 8 GiB of nothing (it would be slow and pointless).
  // - -m 0: no blocks reserved for root; images are read-only, the default 5% would be wasted.
  // - inline_data: a file of up to ~150 bytes lives in its inode instead of a 4 KiB block of its
  //   own. A root filesystem has thousands of such files: on golang's real layers, replayed with
  //   GNU tar on a loop file and counted in 1 MiB chunks as the thin pool would, the chain costs
  //   1.135x its tar bytes instead of 1.166x (node 1.146x instead of 1.175x). Flex_bg sizes,
  //   packed metadata, a smaller journal and 1-2 KiB blocks were measured the same way and gained
  //   nothing or lost. Any kernel since 3.8 mounts it (the guests that boot an activation too).
  await run("mkfsExt4", ["-q", "-m", "0", "-O", "inline_data", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path], { timeoutMs: 10 * 60_000 });
}
