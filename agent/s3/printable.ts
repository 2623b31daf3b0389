// Renders untrusted text (S3 keys, ETags) for error messages and logs: quoted, with everything
// outside printable ASCII escaped, so a hostile key cannot forge log lines, move the cursor or
// reorder text (bidi controls), and cut short so it cannot flood a message.

const MAX_SHOWN = 200;

export function printable(text: string): string {
  let out = "";
  let shown = 0;
  for (const ch of text) {
    if (shown === MAX_SHOWN) return `"${out}"...(${[...text].length} chars)`;
    const cp = ch.codePointAt(0)!;
    if (ch === '"' || ch === "\\") out += `\\${ch}`;
    else if (cp >= 0x20 && cp <= 0x7e) out += ch;
    else out += `\\u{${cp.toString(16)}}`;
    shown++;
  }
  return `"${out}"`;
}
