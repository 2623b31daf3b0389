// Which failures end a run at once (abort) and which are retried: one rule for every FSM step
// that calls S3 or the helper.
import { abort } from "../fsm/errors.ts";
import { HelperError } from "../helper-client.ts";
import { isPermanentS3Error } from "../s3/errors.ts";

/** Rethrows err as an abort when retrying cannot help, with `context` in front of the reason. */
export function classifyStepError(err: unknown, context: string): unknown {
  if (err instanceof HelperError && err.permanent) return abort(`${context}: ${err.code}: ${err.message}`, err);
  if (isPermanentS3Error(err)) return abort(`${context}: ${err.message}`, err);
  return err;
}
