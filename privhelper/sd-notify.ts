// Readiness for systemd's Type=notify, for both programs. Node cannot send on a Unix datagram
// socket, so systemd's own sd_notify() (libsystemd0, present wherever systemd is) is called
// through koffi, already a dependency. Sent by the service's main process, the message is
// attributed to the unit with the default NotifyAccess=main; `systemd-notify --ready` run as a
// child may exit before systemd reads its credentials, and its message is then dropped
// (systemd-notify(1)), and the npm sd-notify package is a native addon built against
// libsystemd-dev at install time.
import koffi from "koffi";

/**
 * Tells systemd the service is ready (READY=1 with a STATUS= line). A no-op returning false
 * when NOTIFY_SOCKET is unset (not started by systemd as Type=notify); throws when it is set and
 * the message cannot be sent, as systemd would otherwise kill the service at its start timeout.
 */
export function notifyReady(status: string): boolean {
  const socket = process.env.NOTIFY_SOCKET;
  if (!socket) return false;
  let sdNotify: (unsetEnvironment: number, state: string) => number;
  try {
    sdNotify = koffi.load("libsystemd.so.0").func("int sd_notify(int unset_environment, const char *state)");
  } catch (err) {
    throw new Error(`NOTIFY_SOCKET is set but libsystemd.so.0 cannot be loaded to tell systemd the service is ready: ${(err as Error).message}`);
  }
  // STATUS= is shown by systemctl status; a newline would start another assignment.
  const result = sdNotify(0, `READY=1\nSTATUS=${status.replaceAll("\n", " ")}`);
  if (result < 0) throw new Error(`sd_notify(READY=1) to ${socket} failed: errno ${-result}`);
  return result > 0;
}
