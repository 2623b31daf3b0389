// Structured logs: one JSON object per line on stderr, so journald and log shippers keep fields.
export type LogLevel = "debug" | "info" | "warn" | "error";
export type Logger = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export function createLogger(component: string, minLevel: LogLevel = "info"): Logger {
  const order: LogLevel[] = ["debug", "info", "warn", "error"];
  const min = order.indexOf(minLevel);
  return (level, msg, fields) => {
    if (order.indexOf(level) < min) return;
    const line = { time: new Date().toISOString(), level, component, msg, ...fields };
    process.stderr.write(JSON.stringify(line, errorReplacer) + "\n");
  };
}

function errorReplacer(_key: string, value: unknown): unknown {
  return value instanceof Error ? { name: value.name, message: value.message } : value;
}
