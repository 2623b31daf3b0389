// Errors the helper reports to its client: a stable code plus a human-readable message.

export type FailureCode =
  | "POOL_MISSING" // the pool device does not exist (run pool.ensure)
  | "POOL_INVALID" // a device with the pool's name exists but is not a usable thin pool
  | "EXISTS" // the thin id already exists in the pool
  | "NOT_FOUND" // the thin id or device does not exist
  | "BUSY" // the device is open/mounted or the thin id is active
  | "CONFLICT" // a device of that name exists with different parameters
  | "NOT_OURS" // the device is not a thin device of imgd's pool made by this helper (ownership.ts)
  | "WRONG_ROLE" // the device is imgd's, but not a layer being built (mkfs/apply on an activation)
  | "HAS_FILESYSTEM" // fs.mkfs refused: the device already carries a signature
  | "BLOB_MISSING" // no blob file for that digest
  | "BLOB_REFUSED" // the blob path or file is not one the agent owns (symlink, owner, links, type)
  | "BLOB_MISMATCH" // the blob's bytes do not hash to the requested digest
  | "LAYER_REFUSED" // the layer content breaks a rule (device node, "..", unknown type, bad tar)
  | "NO_SPACE" // the pool or filesystem ran out of space
  | "APPLY_FAILED" // layer.apply failed for another reason
  | "COMMAND_FAILED" // a system program failed
  | "TIMEOUT"
  | "SHUTTING_DOWN"
  | "INTERNAL";

export class HelperFailure extends Error {
  readonly code: FailureCode;
  constructor(code: FailureCode, message: string) {
    super(message);
    this.name = "HelperFailure";
    this.code = code;
  }
}
