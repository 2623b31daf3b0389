// How a client (imgctl, the TypeScript SDK) reaches the agent: its Unix socket by default, or a
// TCP address with TLS and a client certificate (the agent accepts nothing else on TCP, unless
// an operator allowed plain loopback for development). CLIENT_SETTINGS is the clients' schema.
import { readFileSync } from "node:fs";
import { Channel, ChannelCredentials } from "@grpc/grpc-js";
import { optional, parseValues, path, setting, SettingsError, text } from "../privhelper/settings.ts";

export const DEFAULT_ADDR = "unix:/run/imgd/agent/imgd.sock";

/** Settings of imgctl and the SDK (imgctl flags: --addr, --tls-ca, --tls-cert, --tls-key). */
export const CLIENT_SETTINGS = {
  IMGD_ADDR: setting(text("unix:/path or host:port", /^(unix:\/.+|\[[0-9a-fA-F:.]+\]:[0-9]{1,5}|[^:\s/]+:[0-9]{1,5})$/), DEFAULT_ADDR, "clients: the agent's address"),
  IMGD_CLIENT_TLS_CA: optional(path(), "clients: CA (PEM) that signed the agent's TLS certificate; any IMGD_CLIENT_TLS_* makes clients use TLS"),
  IMGD_CLIENT_TLS_CERT: optional(path(), "clients: this client's certificate (PEM), signed by the agent's IMGD_TLS_CLIENT_CA"),
  IMGD_CLIENT_TLS_KEY: optional(path(), "clients: this client's private key (PEM)"),
};

export interface ConnectOptions {
  /** unix:/path or host:port; default $IMGD_ADDR, else DEFAULT_ADDR. */
  address?: string;
  /** TLS files; default from $IMGD_CLIENT_TLS_*. Any of them set means TLS. */
  tls?: { caFile?: string; certFile?: string; keyFile?: string };
}

/** A grpc-js channel to the agent (grpc-js understands unix:/path targets itself). */
export function agentChannel(options: ConnectOptions = {}, env: Record<string, string | undefined> = process.env): Channel {
  const problems: string[] = [];
  const v = parseValues(CLIENT_SETTINGS, { ...env, ...(options.address !== undefined ? { IMGD_ADDR: options.address } : {}) }, problems);
  if (problems.length > 0) throw new SettingsError(problems.join("; "));
  const tls = options.tls ?? { caFile: v.IMGD_CLIENT_TLS_CA, certFile: v.IMGD_CLIENT_TLS_CERT, keyFile: v.IMGD_CLIENT_TLS_KEY };
  const read = (file: string | undefined) => (file === undefined ? null : readFileSync(file));
  const useTls = tls.caFile !== undefined || tls.certFile !== undefined || tls.keyFile !== undefined;
  if (useTls && (tls.certFile === undefined) !== (tls.keyFile === undefined)) throw new SettingsError("a client certificate and its key go together (IMGD_CLIENT_TLS_CERT, IMGD_CLIENT_TLS_KEY)");
  const credentials = useTls ? ChannelCredentials.createSsl(read(tls.caFile), read(tls.keyFile), read(tls.certFile)) : ChannelCredentials.createInsecure();
  return new Channel(v.IMGD_ADDR, credentials, {});
}
