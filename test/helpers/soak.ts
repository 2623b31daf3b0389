// The one switch between the normal suite and the soak run. `npm test` runs a short version of
// each long loop (crash matrix, random kill loop, hostile corpus in the VM, pool-full's long
// cases); `npm run test:soak` sets IMGD_TEST_SOAK=1 and the same files run in full.
export const SOAK = process.env.IMGD_TEST_SOAK === "1";

/** `soak` under IMGD_TEST_SOAK=1, else `short`: for counts and sizes that differ between the two. */
export const soakOr = <T>(soak: T, short: T): T => (SOAK ? soak : short);
