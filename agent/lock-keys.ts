// The one home of the agent's lock keys (KeyedLock). Whoever guards or touches a thing takes
// the key built here, so two modules can never spell the same lock two ways.
//
// chain       a pull builds (and GC, deletion and repairs remove) the layer device of a chain id
// object      a pull downloads and records an S3 object (etag, size); GC's blob sweeps take it too
// activation  an activation's row and device, for repairs
// image       a pull's outcome and a deletion of the same image are serialised on it
// maintenance one maintenance pass (reconciliation, GC, a deletion's device removal) at a time
export type LockKey = string & { readonly __lockKey: unique symbol };

const key = (s: string) => s as LockKey;

export const chainLock = (chainId: string): LockKey => key(`chain ${chainId}`);
export const objectLock = (o: { etag: string; size: number }): LockKey => key(`object ${o.etag} ${o.size}`);
export const activationLock = (id: string): LockKey => key(`activation ${id}`);
export const imageLock = (name: string): LockKey => key(`image ${name}`);
export const MAINTENANCE_LOCK: LockKey = key("maintenance");
