// A fault-injecting HTTP proxy for the tests, put between the agent and s3rver. Every request is
// recorded (method, url, headers, status sent, start and end time); a plan chosen per request
// (`proxy.tamper`, or a per-request script with `proxy.script`) says what to do to it:
// reply with an error (403, 404, 412, 500, 503 with or without Retry-After), replace headers
// (e.g. a changed ETag), replace the body, cut the connection or go silent after N bytes, never
// send headers, send the body slowly, or lie about the body's length.
//
// It also emulates what real S3 does and s3rver does not (see /work/shared/docs/s3-notes.md):
// a GET carrying If-Match whose value is not the object's ETag (as the client will see it, after
// header replacement) is answered 412 PreconditionFailed. Range is left to s3rver, which answers
// 206 with a correct Content-Range.
import { createServer, request as httpRequest } from "node:http";
import type { IncomingHttpHeaders, IncomingMessage, OutgoingHttpHeaders, Server, ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";

/** What the proxy does to one response; undefined = pass it through untouched. */
export interface Tamper {
  /** Reply with this status and body instead of asking the upstream. */
  reply?: { status: number; body?: string; headers?: Record<string, string> };
  /** Never answer: no status line, no headers (the connection stays open). */
  stallHeaders?: boolean;
  /** Response headers to replace (lowercase names); null removes the header. */
  headers?: Record<string, string | null>;
  /** Replace the body with these bytes (Content-Length follows them unless `contentLength` says otherwise). */
  body?: Buffer;
  /** Declare this Content-Length whatever the body holds (a body longer or shorter than announced). */
  contentLength?: number;
  /** Send no Content-Length: the body ends when the connection closes. */
  noContentLength?: boolean;
  /** Send only this many body bytes, let the client read them, then reset the connection (TCP RST). */
  cutAfter?: number;
  /** Send only this many body bytes, then close the connection normally (a body shorter than its Content-Length). */
  truncateAfter?: number;
  /** Send only this many body bytes, then go silent (connection left open). */
  stallAfter?: number;
  /** Send the body in pieces of `bytes`, waiting `delayMs` before each. */
  throttle?: { bytes: number; delayMs: number };
}

export interface RecordedRequest {
  method: string;
  url: string;
  headers: IncomingHttpHeaders;
  /** Status the proxy sent (undefined while headers are not sent, or never were). */
  status?: number;
  /** performance.now() when the request arrived and when its response ended or broke. */
  start: number;
  /** Response body bytes handed to the connection so far (passed through or sent raw). */
  bytesSent: number;
  end?: number;
}

export interface TamperProxy {
  endpoint: string;
  /** Every request seen, in order. */
  requests: RecordedRequest[];
  /** Decides per request; replace it at will during a test. */
  tamper: (req: RecordedRequest) => Tamper | undefined;
  /**
   * Plans the next requests that `match` accepts: the first gets plans[0], the second plans[1],
   * ...; undefined entries and those after the list pass through. Replaces `tamper`.
   */
  script(match: (req: RecordedRequest) => boolean, plans: Array<Tamper | undefined>): void;
  /** The most requests accepted by `match` that were in flight at one time. */
  maxConcurrent(match: (req: RecordedRequest) => boolean): number;
  close(): Promise<void>;
}

/** Object downloads (listings are GETs too, with list-type in the query). */
export const isObjectGet = (req: RecordedRequest) => req.method === "GET" && !req.url.includes("list-type");

const PRECONDITION_FAILED = "<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>";

export async function startFaultProxy(upstream: string): Promise<TamperProxy> {
  const target = new URL(upstream);
  const sockets = new Set<Socket>();
  const proxy: TamperProxy = {
    endpoint: "",
    requests: [],
    tamper: () => undefined,
    script(match, plans) {
      const queue = [...plans];
      proxy.tamper = (req) => (match(req) ? queue.shift() : undefined);
    },
    maxConcurrent(match) {
      const edges = proxy.requests.filter(match).flatMap((r) => [[r.start, 1], [r.end ?? Infinity, -1]] as const);
      edges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      let now = 0;
      let most = 0;
      for (const [, delta] of edges) most = Math.max(most, (now += delta));
      return most;
    },
    close: async () => {},
  };

  const server: Server = createServer((req, res) => {
    const seen: RecordedRequest = { method: req.method ?? "GET", url: req.url ?? "/", headers: req.headers, start: performance.now(), bytesSent: 0 };
    proxy.requests.push(seen);
    const finished = () => (seen.end ??= performance.now());
    res.once("close", finished); // also when the connection is cut or reset
    const plan = proxy.tamper(seen) ?? {};
    if (plan.stallHeaders) return void req.resume();
    if (plan.reply) {
      seen.status = plan.reply.status;
      res.writeHead(plan.reply.status, plan.reply.headers ?? { "content-type": "application/xml" });
      res.end(plan.reply.body ?? "");
      req.resume();
      return;
    }
    const upstreamReq = httpRequest(
      { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: withoutIfMatch(req.headers) },
      (upstreamRes: IncomingMessage) => answer(seen, plan, req, res, upstreamRes),
    );
    upstreamReq.on("error", () => res.destroy());
    req.pipe(upstreamReq);
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return proxy;
}

// s3rver ignores If-Match; the proxy judges it (against the ETag the client will be shown).
function withoutIfMatch(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const { "if-match": _ifMatch, ...rest } = headers;
  return rest;
}

function answer(seen: RecordedRequest, plan: Tamper, req: IncomingMessage, res: ServerResponse, upstreamRes: IncomingMessage): void {
  const headers: OutgoingHttpHeaders = { ...upstreamRes.headers };
  for (const [name, value] of Object.entries(plan.headers ?? {})) {
    if (value === null) delete headers[name];
    else headers[name] = value;
  }
  const status = upstreamRes.statusCode ?? 502;
  const ifMatch = req.headers["if-match"];
  if (ifMatch !== undefined && (status === 200 || status === 206) && headers.etag !== undefined && ifMatch !== headers.etag) {
    upstreamRes.resume();
    seen.status = 412;
    res.writeHead(412, { "content-type": "application/xml" });
    res.end(PRECONDITION_FAILED);
    return;
  }
  const touchesBody = ["body", "contentLength", "noContentLength", "cutAfter", "truncateAfter", "stallAfter", "throttle"].some((k) => plan[k as keyof Tamper] !== undefined);
  seen.status = status;
  if (!touchesBody) {
    res.writeHead(status, headers);
    upstreamRes.on("data", (c: Buffer) => (seen.bytesSent += c.length));
    upstreamRes.pipe(res);
    return;
  }
  const chunks: Buffer[] = [];
  upstreamRes.on("data", (c: Buffer) => chunks.push(c));
  upstreamRes.on("end", () => void sendRaw(res.socket!, status, headers, plan.body ?? Buffer.concat(chunks), plan, seen));
}

// Faulty framing (a Content-Length that lies, bytes after the announced end) is refused by Node's
// own ServerResponse, so these responses are written straight onto the socket; it is closed after.
async function sendRaw(socket: Socket, status: number, upstreamHeaders: OutgoingHttpHeaders, body: Buffer, plan: Tamper, seen: RecordedRequest): Promise<void> {
  const headers: OutgoingHttpHeaders = { ...upstreamHeaders, connection: "close" };
  delete headers["transfer-encoding"];
  if (plan.noContentLength) delete headers["content-length"];
  else headers["content-length"] = String(plan.contentLength ?? body.length);
  const head = [`HTTP/1.1 ${status} X`, ...Object.entries(headers).map(([k, v]) => `${k}: ${String(v)}`), "", ""].join("\r\n");
  socket.write(head);
  const limit = plan.cutAfter ?? plan.truncateAfter ?? plan.stallAfter ?? body.length;
  const piece = plan.throttle?.bytes ?? body.length;
  for (let offset = 0; offset < Math.min(limit, body.length); offset += piece) {
    if (plan.throttle) await new Promise((resolve) => setTimeout(resolve, plan.throttle!.delayMs));
    if (socket.destroyed) return;
    const bytes = body.subarray(offset, Math.min(offset + piece, limit));
    socket.write(bytes);
    seen.bytesSent += bytes.length;
  }
  if (plan.stallAfter !== undefined) return;
  if (plan.cutAfter !== undefined || plan.truncateAfter !== undefined) {
    // Break the connection only once the client has consumed what was sent: a client drops
    // buffered bytes when its body stream errors (and an RST discards unread data), and the tests
    // check that the resume starts exactly after the bytes delivered.
    await new Promise<void>((resolve) => socket.write("", () => resolve()));
    await new Promise((resolve) => setTimeout(resolve, 50));
    if (plan.cutAfter !== undefined) return void socket.resetAndDestroy();
  }
  socket.end();
}
