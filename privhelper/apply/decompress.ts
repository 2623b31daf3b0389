// The applier's view of a blob: gzip and zstd blobs are decompressed, told by their magic bytes
// (never by a name: the helper only knows digests); anything else is passed on as a plain tar.
// Written independently of the agent's validator (agent/layers/compression.ts), on purpose: the
// helper trusts nothing the agent says about a blob, and must stand on its own.
//
// - MAX_DECOMPRESSED_BYTES caps what a blob may decompress to, so a small hostile blob (a "bomb")
//   cannot fill the shared thin pool even if the agent's limit were missing or larger. 8 GiB is
//   the default virtual size of one thin device (IMGD_THIN_SIZE): no layer can usefully unpack
//   to more. Reaching it refuses the layer (rule DECOMPRESSION_LIMIT).
// - A corrupt or truncated stream is refused (BAD_COMPRESSION, with zlib's message).
// - Concatenated gzip members are one stream; raw bytes the decoder did not consume (a second
//   zstd frame, which Node's decoder ignores, padding, junk) are refused (TRAILING_DATA).
import { Readable } from "node:stream";
import { createGunzip, createZstdDecompress } from "node:zlib";
import { LayerRefused } from "./oci-apply.ts";

export const MAX_DECOMPRESSED_BYTES = 8 * 1024 * 1024 * 1024;

export type BlobCompression = "none" | "gzip" | "zstd";

export function blobCompression(head: Buffer): BlobCompression {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.length >= 4 && head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd) return "zstd";
  return "none";
}

/** The tar bytes of `raw`; read errors of `raw` itself come out unchanged. */
export function tarStream(raw: Readable, maxDecompressedBytes = MAX_DECOMPRESSED_BYTES): Readable {
  return Readable.from(tarChunks(raw, maxDecompressedBytes));
}

async function* tarChunks(raw: Readable, maxDecompressedBytes: number): AsyncGenerator<Buffer> {
  const iterator = raw[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let rawBytes = 0;
  const head: Buffer[] = [];
  let ended = false;
  while (rawBytes < 4) {
    const next = await iterator.next();
    if (next.done) {
      ended = true;
      break;
    }
    head.push(next.value);
    rawBytes += next.value.length;
  }
  const first = Buffer.concat(head);
  const rest = async function* (): AsyncGenerator<Buffer> {
    if (first.length > 0) yield first;
    while (!ended) {
      const next = await iterator.next();
      if (next.done) return;
      rawBytes += next.value.length;
      yield next.value;
    }
  };
  const compression = blobCompression(first);
  if (compression === "none") {
    yield* rest();
    return;
  }

  const decoder = compression === "gzip" ? createGunzip() : createZstdDecompress();
  const source = Readable.from(rest());
  let readError: unknown = undefined;
  source.on("error", (err) => {
    readError = err;
    decoder.destroy(err);
  });
  source.pipe(decoder);
  let produced = 0;
  try {
    for await (const chunk of decoder) {
      produced += (chunk as Buffer).length;
      if (produced > maxDecompressedBytes) {
        throw new LayerRefused("DECOMPRESSION_LIMIT", "", `${compression} blob decompresses to more than ${maxDecompressedBytes} bytes`);
      }
      yield chunk as Buffer;
    }
  } catch (err) {
    if (err instanceof LayerRefused || err === readError) throw err;
    throw new LayerRefused("BAD_COMPRESSION", "", `${compression} blob is corrupt or truncated: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    source.destroy();
    decoder.destroy();
  }
  if (decoder.bytesWritten < rawBytes) {
    throw new LayerRefused("TRAILING_DATA", "", `data after the end of the ${compression} stream at byte ${decoder.bytesWritten} of ${rawBytes}`);
  }
}
