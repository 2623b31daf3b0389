// Structured logs: one JSON object per line on stderr (format: privhelper/log.ts, shared with the helper).
import { formatLogLine, logs, type LogLevel } from "../privhelper/log.ts";

export type { LogLevel } from "../privhelper/log.ts";
export type Logger = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export function createLogger(component: string, minLevel: LogLevel = "info"): Logger {
  return (level, msg, fields) => {
    if (logs(level, minLevel)) process.stderr.write(formatLogLine(component, level, msg, fields));
  };
}
