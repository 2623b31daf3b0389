// Turns an FSM run's events into an async iterable, for server-streaming RPCs.
// The run is durable and independent of the caller: a client that goes away only stops
// following it.
import type { Fsm, RunEvent, RunRecord } from "../fsm/engine.ts";

export async function* followRun<R, W>(fsm: Fsm<R, W>, runId: string, signal: AbortSignal): AsyncGenerator<RunEvent> {
  const pending: RunEvent[] = [];
  let wake: (() => void) | undefined;
  const push = (event: RunEvent) => {
    pending.push(event);
    wake?.();
  };
  const unsubscribe = fsm.subscribe(runId, push);
  const onAbort = () => wake?.();
  signal.addEventListener("abort", onAbort);
  try {
    // The run may have finished before we subscribed: its record is then the whole story.
    const current = fsm.get(runId);
    if (current && current.status !== "running") push({ type: "finished", run: current as RunRecord<unknown, unknown> });
    while (!signal.aborted) {
      const event = pending.shift();
      if (!event) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
        continue;
      }
      yield event;
      if (event.type === "finished") return;
    }
  } finally {
    unsubscribe();
    signal.removeEventListener("abort", onAbort);
  }
}
