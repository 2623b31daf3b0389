// The log line format of both programs (the agent and the root helper): one JSON object per line
// on stderr, with time, level and component first, so journald and log shippers keep the fields
// and can filter by severity.
export type LogLevel = "debug" | "info" | "warn" | "error";

const ORDER: readonly LogLevel[] = ["debug", "info", "warn", "error"];

export function formatLogLine(component: string, level: LogLevel, msg: string, fields?: Record<string, unknown>): string {
  return JSON.stringify({ time: new Date().toISOString(), level, component, msg, ...fields }, errorReplacer) + "\n";
}

/** True when `level` is at least as severe as `min`. */
export function logs(level: LogLevel, min: LogLevel): boolean {
  return ORDER.indexOf(level) >= ORDER.indexOf(min);
}

function errorReplacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? { name: value.name, message: value.message } : value;
}
