// Hashes a downloaded file by reading it back in fixed-size pieces (bounded memory): ranged parts
// arrive out of order, so the digest of the whole is only known once every byte is on disk.
import { createHash } from "node:crypto";
import type { FileHandle } from "node:fs/promises";

const PIECE = 1024 * 1024;

export async function hashFile(file: FileHandle, size: number, withMd5: boolean): Promise<{ sha256Hex: string; md5Hex?: string }> {
  const sha256 = createHash("sha256");
  const md5 = withMd5 ? createHash("md5") : undefined;
  const buffer = Buffer.alloc(Math.min(PIECE, Math.max(size, 1)));
  for (let position = 0; position < size; ) {
    const { bytesRead } = await file.read(buffer, 0, Math.min(buffer.length, size - position), position);
    if (bytesRead === 0) throw new Error(`downloaded file is shorter than ${size} bytes (ends at ${position})`);
    const piece = buffer.subarray(0, bytesRead);
    sha256.update(piece);
    md5?.update(piece);
    position += bytesRead;
  }
  return { sha256Hex: sha256.digest("hex"), ...(md5 ? { md5Hex: md5.digest("hex") } : {}) };
}
