// The one error a refused layer produces: which entry, which rule (a short stable code that
// callers and tests match on), and a sentence for humans.

export type LayerRule =
  // whole-archive structure
  | "NOT_A_TAR"
  | "TRUNCATED"
  | "TRAILING_GARBAGE"
  | "HEADER_TOO_LARGE"
  | "LAYER_TOO_LARGE"
  | "TOO_MANY_ENTRIES"
  // compression (gzip, zstd)
  | "BAD_COMPRESSION"
  | "DECOMPRESSION_LIMIT"
  // names
  | "EMPTY_NAME"
  | "ABSOLUTE_PATH"
  | "DOTDOT"
  | "NUL_IN_NAME"
  | "BAD_ENCODING"
  | "PATH_TOO_LONG"
  | "NAME_COMPONENT_TOO_LONG"
  | "TOO_DEEP"
  // entry types and their fields
  | "UNKNOWN_TYPE"
  | "NONZERO_SIZE"
  | "ENTRY_TOO_LARGE"
  | "BAD_OWNER"
  | "BAD_PAX"
  | "BAD_XATTR"
  | "BAD_SPARSE_MAP"
  | "SYMLINK_TARGET_INVALID"
  | "THROUGH_SYMLINK"
  | "PARENT_NOT_DIR"
  | "HARDLINK_TARGET_INVALID"
  | "HARDLINK_TO_MISSING"
  | "BAD_WHITEOUT";

/** `entry` for failures that concern the archive as a whole rather than one member. */
export const WHOLE_ARCHIVE = "(archive)";

export class LayerValidationError extends Error {
  /** The entry's raw name, escaped so that it prints safely on one line. */
  readonly entry: string;
  readonly rule: LayerRule;

  constructor(rule: LayerRule, entry: string, message: string) {
    super(message);
    this.name = "LayerValidationError";
    this.rule = rule;
    this.entry = entry;
  }
}

const MAX_PRINTED_CHARS = 200;

/**
 * Escapes a name from an untrusted archive for logs and error messages: control characters,
 * backslash, C1 controls, line/paragraph separators and bidi overrides become \xNN / \u{...},
 * and very long names are cut (with their full length noted).
 */
export function printable(raw: string): string {
  let out = "";
  let shown = 0;
  for (const ch of raw) {
    if (shown === MAX_PRINTED_CHARS) {
      out += `...(${Buffer.byteLength(raw)} bytes)`;
      break;
    }
    out += escapeChar(ch);
    shown++;
  }
  return out;
}

function escapeChar(ch: string): string {
  const cp = ch.codePointAt(0)!;
  if (ch === "\\") return "\\\\";
  if (cp < 0x20 || cp === 0x7f) return `\\x${cp.toString(16).padStart(2, "0")}`;
  const invisible =
    (cp >= 0x80 && cp <= 0x9f) ||
    cp === 0x2028 ||
    cp === 0x2029 ||
    (cp >= 0x202a && cp <= 0x202e) ||
    (cp >= 0x2066 && cp <= 0x2069) ||
    cp === 0x200e ||
    cp === 0x200f ||
    cp === 0xfeff;
  return invisible ? `\\u{${cp.toString(16)}}` : ch;
}
