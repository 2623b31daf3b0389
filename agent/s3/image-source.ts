// Reads an image's layer list from S3.
//
// Policy: the folder IS the image. `<prefix><image>/` must hold only layers, each an object
// named `<n>.tar` directly in the folder (no deeper "/"), n a canonical positive decimal (no
// leading zeros, no sign, at most 6 digits). The positions must be exactly 1..N, N >= 1, with no
// gap and no duplicate, and no layer may be empty (0 bytes). Anything else - a README, "01.tar",
// "1.TAR", "a/1.tar", a gap - REFUSES the whole image, with an error naming the offending key:
// guessing which objects were meant to be layers could build an image nobody published. Layers
// are ordered numerically (1, 2, ... 9, 10, 11), never by string.
// Sizes are not checked against the tar block size: layers may later be compressed.
// An empty folder is "image not found". A folder holding more than cfg.maxLayers objects is refused
// as soon as the listing passes that count (pages are read one at a time, so memory stays
// bounded), before anything is downloaded. All of these are permanent errors.
// Keys: a key is only ever compared, shown (escaped, by printable()) and sent back to S3 as the
// object name; it never becomes a local path (blobs are named by digest). Keys with "..", spaces,
// control or non-ASCII characters cannot match <n>.tar and so refuse the image, by name.
import { ListObjectsV2Command } from "@aws-sdk/client-s3";
import type { S3Client, _Object } from "@aws-sdk/client-s3";
import { MAX_LAYERS_DEFAULT } from "./config.ts";
import type { S3Config } from "./config.ts";
import { classifyS3Error, S3PermanentError } from "./errors.ts";
import { printable } from "./printable.ts";

export interface LayerObject {
  /** 1-based position in the image: layer 1 is applied first. */
  position: number;
  /** Full S3 key. Never used to build a local path. */
  key: string;
  size: number;
  /** ETag exactly as listed (normally a quoted MD5). */
  etag: string;
}

const IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,127}$/;
const LAYER_NAME = /^([1-9][0-9]{0,5})\.tar$/;

/** Throws a permanent INVALID_IMAGE_NAME error unless `name` is a valid image name. */
export function validateImageName(name: unknown): string {
  if (typeof name !== "string") throw new S3PermanentError("INVALID_IMAGE_NAME", "image name must be a string");
  if (!IMAGE_NAME.test(name) || name.includes("..")) {
    throw new S3PermanentError(
      "INVALID_IMAGE_NAME",
      `invalid image name ${printable(name)}: expected 1 to 128 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit, without ".."`,
    );
  }
  return name;
}

export interface ListOptions {
  signal?: AbortSignal;
  /** Keys per ListObjectsV2 page (S3 and s3rver cap it at 1000); tests make it small. */
  pageSize?: number;
}

/** Lists and checks the layers of `image`, in application order. */
export async function listImageLayers(client: S3Client, cfg: S3Config, image: string, opts: ListOptions = {}): Promise<LayerObject[]> {
  validateImageName(image);
  const folder = `${cfg.prefix}${image}/`;
  const where = `s3://${cfg.bucket}/${folder}`;
  const layers = new Map<number, LayerObject>();
  let token: string | undefined;
  const tokensSeen = new Set<string>();
  let objectCount = 0;
  const maxLayers = cfg.maxLayers ?? MAX_LAYERS_DEFAULT;
  let markerSeen = false;

  do {
    let page;
    try {
      page = await client.send(
        new ListObjectsV2Command({ Bucket: cfg.bucket, Prefix: folder, ContinuationToken: token, MaxKeys: opts.pageSize, EncodingType: "url" }),
        { abortSignal: opts.signal },
      );
    } catch (err) {
      throw classifyS3Error(err, `listing ${where}`, opts.signal);
    }
    const urlEncoded = page.EncodingType === "url"; // servers that ignore the request send raw keys
    for (const entry of page.Contents ?? []) {
      // The folder's own marker object ("<folder>/", made by consoles and sync tools) holds no layer.
      const rawKey = typeof entry.Key === "string" && urlEncoded ? decodeKey(entry.Key, where) : entry.Key;
      if (rawKey === folder && entry.Size === 0) {
        markerSeen = true;
        continue;
      }
      if (++objectCount > maxLayers) throw refuse(where, `more than ${maxLayers} objects; an image may have at most ${maxLayers} layers (IMGD_S3_MAX_LAYERS)`);
      const layer = checkEntry(entry, folder, where, urlEncoded);
      const twin = layers.get(layer.position);
      if (twin) throw refuse(where, `${printable(layer.key)} duplicates position ${layer.position} of ${printable(twin.key)}`);
      layers.set(layer.position, layer);
    }
    if (!page.IsTruncated) break;
    token = page.NextContinuationToken;
    if (!token || tokensSeen.has(token)) throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: truncated page without a new continuation token`);
    tokensSeen.add(token);
  } while (true);

  if (layers.size === 0) {
    throw new S3PermanentError("IMAGE_NOT_FOUND", markerSeen ? `image not found: ${where} exists but holds no layers (only its folder marker)` : `image not found: no objects under ${where}`);
  }
  const ordered = [...layers.values()].sort((a, b) => a.position - b.position);
  ordered.forEach((layer, i) => {
    if (layer.position !== i + 1) throw refuse(where, `layer ${i + 1}.tar is missing (next is ${printable(layer.key)}); layers must be numbered 1..N without gaps`);
  });
  return ordered;
}

function checkEntry(entry: _Object, folder: string, where: string, urlEncoded: boolean): LayerObject {
  if (typeof entry.Key !== "string") throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: an entry has no key`);
  const key = urlEncoded ? decodeKey(entry.Key, where) : entry.Key;
  if (!key.startsWith(folder)) throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: server returned ${printable(key)}, outside the requested prefix`);
  const name = key.slice(folder.length);
  if (name.includes("/")) throw refuse(where, `${printable(key)} is nested below the image folder; only <n>.tar layers may be in it`);
  const match = LAYER_NAME.exec(name);
  if (!match) throw refuse(where, `${printable(key)} is not a layer: expected <n>.tar with n from 1 to 999999 written without leading zeros`);
  const size = entry.Size;
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: ${printable(key)} has no valid size`);
  if (size === 0) throw refuse(where, `${printable(key)} is empty (0 bytes): an empty object is not a layer`);
  const etag = entry.ETag;
  if (typeof etag !== "string" || !/^[\x21-\x7e]{1,200}$/.test(etag)) throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: ${printable(key)} has no valid ETag`);
  return { position: Number(match[1]), key, size, etag };
}

// S3 url-encodes keys as a form would: "+" for a space, %XX for the rest.
function decodeKey(encoded: string, where: string): string {
  try {
    return decodeURIComponent(encoded.replaceAll("+", " "));
  } catch {
    throw new S3PermanentError("BAD_RESPONSE", `listing ${where}: undecodable key ${printable(encoded)}`);
  }
}

function refuse(where: string, why: string): S3PermanentError {
  return new S3PermanentError("BAD_LAYOUT", `image refused: ${where}: ${why}`);
}
