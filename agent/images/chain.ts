// Chain ids name the device holding layers 1..i of an image, as OCI ChainIDs do:
// chain(1) = digest(1); chain(i) = sha256(chain(i-1) + " " + digest(i)).
// Two images whose first i layers are the same bytes share the device for chain(i).
import { createHash } from "node:crypto";

const DIGEST = /^sha256:[0-9a-f]{64}$/;

export function chainIds(layerDigests: string[]): string[] {
  const chain: string[] = [];
  for (const digest of layerDigests) chain.push(nextChainId(chain.at(-1) ?? null, digest));
  return chain;
}

/** The chain id of a layer on top of `parent` (null for the first layer). */
export function nextChainId(parent: string | null, digest: string): string {
  if (!DIGEST.test(digest)) throw new Error(`not a sha256 digest: ${JSON.stringify(digest)}`);
  return parent === null ? digest : "sha256:" + createHash("sha256").update(`${parent} ${digest}`).digest("hex");
}

/** The dm name of a layer device; the helper only accepts this exact shape. */
export function layerDeviceName(chainId: string): string {
  return "imgd-layer-" + chainId.slice("sha256:".length, "sha256:".length + 32);
}

/** The dm name of an activation's device (activation ids are ULIDs). */
export function activationDeviceName(activationId: string): string {
  return "imgd-act-" + activationId.toLowerCase();
}
