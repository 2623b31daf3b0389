// Who is at the other end of a Unix socket connection: SO_PEERCRED, which Node does not expose,
// read through koffi (already a dependency for the applier). Used to cap connections per uid and
// to name the peer in the log.
import type { Socket } from "node:net";
import koffi from "koffi";

const SOL_SOCKET = 1;
const SO_PEERCRED = 17;

const libc = koffi.load("libc.so.6");
const ucred = koffi.struct("imgd_ucred", { pid: "int32", uid: "uint32", gid: "uint32" });
const getsockopt = libc.func("int getsockopt(int fd, int level, int name, _Out_ imgd_ucred *value, _Inout_ uint32_t *length)");

export type Peer = { pid: number; uid: number; gid: number };

/** The peer's credentials as the kernel recorded them at connect(); null if they cannot be read. */
export function peerOf(socket: Socket): Peer | null {
  // A net.Socket on a Unix socket keeps its descriptor on the (internal, long-stable) handle.
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== "number" || fd < 0) return null;
  const value: Partial<Peer> = {};
  const length = [koffi.sizeof(ucred)];
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, value, length) !== 0) return null;
  return { pid: value.pid!, uid: value.uid!, gid: value.gid! };
}
