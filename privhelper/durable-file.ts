// Small files the helper must never lose or find half-written (thin origin records, the pool's
// identity): written under a temporary name, fsynced, renamed over the old one, and the
// directory fsynced, so after a crash or a power cut the file is either the old one or the new.
import { mkdir, open, rename } from "node:fs/promises";
import { dirname } from "node:path";

export async function writeFileDurably(path: string, content: string): Promise<void> {
  const folder = dirname(path);
  await mkdir(folder, { recursive: true, mode: 0o700 });
  const temp = `${path}.tmp`;
  const file = await open(temp, "w", 0o600);
  try {
    await file.writeFile(content);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(temp, path);
  await syncDir(folder);
}

export async function syncDir(path: string): Promise<void> {
  const handle = await open(path, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
