// The FSM engine's settings, read from the agent's raw IMGD_* settings (agent/config.ts).
import { z } from "zod";
import type { InterruptionPolicy } from "./types.ts";

const integer = (name: string, min: number, max: number, fallback: number) =>
  z
    .string()
    .regex(/^[0-9]{1,10}$/, `${name} must be a whole number`)
    .default(String(fallback))
    .transform(Number)
    .pipe(z.number().min(min, `${name} must be at least ${min}`).max(max, `${name} must be at most ${max}`));

const SCHEMA = z.object({
  /** Consecutive quick interruptions of one step after which its run fails as a poison step. */
  IMGD_FSM_MAX_QUICK_INTERRUPTIONS: integer("IMGD_FSM_MAX_QUICK_INTERRUPTIONS", 1, 1000, 5),
  /** An interruption is quick if the agent died within this many ms of the step beginning to work. */
  IMGD_FSM_QUICK_INTERRUPTION_MS: integer("IMGD_FSM_QUICK_INTERRUPTION_MS", 0, 86_400_000, 60_000),
  /**
   * How long a stop (SIGTERM) waits for steps to end after their signal fired. Working steps are
   * recorded as interrupted when the stop begins, so a short value loses nothing. main.ts exits
   * anyway 20 s after SIGTERM (gRPC drain included).
   */
  IMGD_FSM_STOP_TIMEOUT_MS: integer("IMGD_FSM_STOP_TIMEOUT_MS", 0, 600_000, 10_000),
});

export interface FsmSettings {
  interruptions: InterruptionPolicy;
  stopTimeoutMs: number;
}

export function loadFsmSettings(settings: Record<string, string | undefined>): FsmSettings {
  const parsed = SCHEMA.safeParse(settings);
  if (!parsed.success) throw new Error(parsed.error.issues.map((i) => i.message).join("; "));
  const s = parsed.data;
  return {
    interruptions: { maxQuick: s.IMGD_FSM_MAX_QUICK_INTERRUPTIONS, quickWindowMs: s.IMGD_FSM_QUICK_INTERRUPTION_MS },
    stopTimeoutMs: s.IMGD_FSM_STOP_TIMEOUT_MS,
  };
}
