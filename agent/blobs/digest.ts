// Blob digests: "sha256:" + 64 lowercase hex. The hex part is the only thing a blob's file name
// is ever made of.

const DIGEST = /^sha256:([0-9a-f]{64})$/;

export class InvalidDigestError extends Error {
  constructor(value: unknown) {
    super(`invalid digest ${JSON.stringify(String(value)).slice(0, 100)}: expected "sha256:" and 64 lowercase hex digits`);
    this.name = "InvalidDigestError";
  }
}

export function isDigest(value: unknown): value is string {
  return typeof value === "string" && DIGEST.test(value);
}

/** The 64-hex part of a digest; throws InvalidDigestError for anything else. */
export function digestHex(digest: unknown): string {
  const match = typeof digest === "string" ? DIGEST.exec(digest) : null;
  if (!match) throw new InvalidDigestError(digest);
  return match[1];
}
