// Page tokens of the List RPCs: opaque to clients, made and checked only here. A token names the
// list and the filters it was made for and the last item of its page (the next page starts after
// it), with a checksum, so a token from elsewhere, edited, or made for other filters is refused
// (INVALID_ARGUMENT) rather than silently paging something else. Not a secret: a client that
// forges one only pages from another place of a list it may read anyway.
import { createHash } from "node:crypto";
import { invalidArgument } from "./errors.ts";

export const DEFAULT_PAGE_SIZE = 100;
export const MAX_PAGE_SIZE = 1000;

interface TokenBody {
  list: string;
  filters: Record<string, string>;
  after: string;
}

const checksum = (payload: string) => createHash("sha256").update(`imgd page token\0${payload}`).digest("base64url").slice(0, 16);

/** page_size: 0 is the default, above the maximum is the maximum, negative is refused. */
export function pageSize(requested: number): number {
  if (!Number.isInteger(requested) || requested < 0) throw invalidArgument("page_size", `page_size must be 0 (default ${DEFAULT_PAGE_SIZE}) or positive, got ${requested}`);
  return requested === 0 ? DEFAULT_PAGE_SIZE : Math.min(requested, MAX_PAGE_SIZE);
}

export function makePageToken(list: string, filters: Record<string, string>, after: string): string {
  const payload = Buffer.from(JSON.stringify({ list, filters, after } satisfies TokenBody)).toString("base64url");
  return `${payload}.${checksum(payload)}`;
}

/**
 * The item a page token says to start after ("" for no token). `validAfter` checks the item's
 * form (an image name, an id).
 */
export function readPageToken(token: string, list: string, filters: Record<string, string>, validAfter: (after: string) => boolean): string {
  if (token === "") return "";
  const refuse = (why: string) => invalidArgument("page_token", `page_token ${why}: pass the next_page_token of the previous call with the same filters, or none`);
  const [payload, sum, extra] = token.split(".");
  if (!payload || !sum || extra !== undefined || token.length > 4096 || checksum(payload) !== sum) throw refuse("was not made by this agent");
  let body: TokenBody;
  try {
    body = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as TokenBody;
  } catch {
    throw refuse("was not made by this agent");
  }
  if (body.list !== list) throw refuse(`was made for another list (${String(body.list)})`);
  if (JSON.stringify(body.filters) !== JSON.stringify(filters)) throw refuse("was made for other filters");
  if (typeof body.after !== "string" || !validAfter(body.after)) throw refuse("was not made by this agent");
  return body.after;
}

/** One page of `rows` (fetched with one more than the page size): the page and its next token. */
export function page<T>(rows: T[], size: number, next: (last: T) => string): { items: T[]; nextPageToken: string } {
  if (rows.length <= size) return { items: rows, nextPageToken: "" };
  const items = rows.slice(0, size);
  return { items, nextPageToken: next(items[items.length - 1]!) };
}
