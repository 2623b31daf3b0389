// Entry-name normalization shared by the validator and the applier, so both see the same path.
import { LayerValidationError, printable, type LayerRule } from "./errors.ts";

export interface PathLimits {
  /** Longest normalized path, in bytes (PATH_MAX - 1). */
  maxPathBytes: number;
  /** Longest single component, in bytes (NAME_MAX). */
  maxComponentBytes: number;
  /** Most components in one path. */
  maxDepth: number;
}

export const DEFAULT_PATH_LIMITS: PathLimits = { maxPathBytes: 4095, maxComponentBytes: 255, maxDepth: 256 };

/**
 * Turns a raw tar member name into the relative path it denotes inside the image root:
 * "./usr/bin/" -> "usr/bin". Empty and "." components are dropped (the kernel ignores them too),
 * so "a//./b" -> "a/b"; the root itself ("./", ".") normalizes to "" and the CALLER decides
 * whether that is acceptable (the validator accepts it only for a directory entry).
 *
 * Refused (LayerValidationError): "" (EMPTY_NAME), a NUL byte (NUL_IN_NAME), U+FFFD from bytes
 * that were not UTF-8 (BAD_ENCODING: two different byte names must not decode to one path), a
 * leading "/" (ABSOLUTE_PATH: never stripped, an absolute name is a sign of a hostile or broken
 * writer), any ".." component (DOTDOT), and paths beyond the limits (PATH_TOO_LONG,
 * NAME_COMPONENT_TOO_LONG, TOO_DEEP), measured in UTF-8 bytes on the normalized path.
 */
export function normalizeEntryName(raw: string, limits: PathLimits = DEFAULT_PATH_LIMITS): string {
  // The printable name only for an error: this runs for every member of every layer.
  const refuse = (rule: LayerRule, message: string) => new LayerValidationError(rule, printable(raw), message);
  if (raw.length === 0) throw refuse("EMPTY_NAME", "entry has an empty name");
  if (raw.includes("\0")) throw refuse("NUL_IN_NAME", "name contains a NUL byte");
  if (raw.includes("\uFFFD")) {
    throw refuse("BAD_ENCODING", "name is not valid UTF-8 (or contains U+FFFD)");
  }
  if (raw.startsWith("/")) throw refuse("ABSOLUTE_PATH", "name is an absolute path");
  // Cheap guard before splitting a hostile multi-megabyte PAX path.
  if (raw.length > limits.maxPathBytes * 2 + 2) {
    throw refuse("PATH_TOO_LONG", `name is longer than ${limits.maxPathBytes} bytes`);
  }

  const components: string[] = [];
  for (const part of raw.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") throw refuse("DOTDOT", 'name has a ".." component');
    if (Buffer.byteLength(part) > limits.maxComponentBytes) {
      throw refuse("NAME_COMPONENT_TOO_LONG", `a name component is longer than ${limits.maxComponentBytes} bytes`);
    }
    components.push(part);
  }
  if (components.length > limits.maxDepth) {
    throw refuse("TOO_DEEP", `name is deeper than ${limits.maxDepth} components`);
  }
  const name = components.join("/");
  if (Buffer.byteLength(name) > limits.maxPathBytes) {
    throw refuse("PATH_TOO_LONG", `name is longer than ${limits.maxPathBytes} bytes`);
  }
  return name;
}

/** "a/b/c" -> "a/b"; "c" -> "" (the root). */
export function parentOf(name: string): string {
  const slash = name.lastIndexOf("/");
  return slash === -1 ? "" : name.slice(0, slash);
}

/** "a/b/c" -> "c". */
export function baseOf(name: string): string {
  return name.slice(name.lastIndexOf("/") + 1);
}

export function joinName(parent: string, base: string): string {
  return parent === "" ? base : `${parent}/${base}`;
}
