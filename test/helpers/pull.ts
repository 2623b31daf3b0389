// Pulling an image through the agent's gRPC API, the three ways the tests need it (one home,
// instead of a copy in each test file).
import assert from "node:assert/strict";
import { RunStatus, type Image, type ImgdClient, type PullImageResponse } from "../../client/sdk.ts";

/** Every update of the pull, in order; rejects with the stream's error (a refused pull). */
export async function pullUpdates(client: ImgdClient, image: string): Promise<PullImageResponse[]> {
  const updates: PullImageResponse[] = [];
  for await (const update of client.pullImage({ image })) updates.push(update);
  return updates;
}

/** Pulls and asserts that the pull succeeded; resolves to the image. */
export async function pullReady(client: ImgdClient, image: string): Promise<Image> {
  const last = (await pullUpdates(client, image)).at(-1);
  assert.equal(last?.status, RunStatus.SUCCEEDED, `pull ${image}: the stream ended without SUCCEEDED`);
  return last.image!;
}

export type PullOutcome = { ok: true } | { ok: false; error: string };

/** Pulls without throwing: ok, or the error (the stream's status). */
export async function pullOutcome(client: ImgdClient, image: string): Promise<PullOutcome> {
  try {
    const last = (await pullUpdates(client, image)).at(-1);
    if (last?.status === RunStatus.SUCCEEDED) return { ok: true };
    return { ok: false, error: `the stream ended without SUCCEEDED (last state ${last?.state ?? "none"})` };
  } catch (err) {
    return { ok: false, error: (err as Error).message };
  }
}
