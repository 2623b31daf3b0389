// Helper configuration: read once from the environment at start-up and validated strictly,
// so a typo in a unit or a path fails loudly instead of creating a pool of the wrong size.
import { readFileSync } from "node:fs";
import { isAbsolute, normalize } from "node:path";

export type HelperConfig = {
  socketPath: string;
  socketGroup: string;
  /** the agent's user (name or uid): blobs the helper reads must be owned by it */
  agentUser: string;
  stateDir: string;
  blobDir: string;
  poolName: string;
  poolDataBytes: number;
  poolMetaBytes: number;
  poolBlockSectors: number;
  thinBytes: number;
};

const UNITS: Record<string, number> = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** Parses "2G", "1M", "512K", "4096": digits without leading zeros, one binary unit letter. */
export function parseSize(text: string): number {
  const match = /^([1-9][0-9]{0,15})([KMGT]?)$/.exec(text);
  if (!match) throw new Error(`invalid size ${JSON.stringify(text)} (expected e.g. 2G, 1M, 512K or bytes)`);
  const bytes = Number(match[1]) * UNITS[match[2]!]!;
  if (!Number.isSafeInteger(bytes)) throw new Error(`size ${text} is too large`);
  return bytes;
}

function absolutePath(name: string, value: string): string {
  if (!isAbsolute(value) || value === "/" || value.includes("\0") || normalize(value) !== value || value.length > 1024) {
    throw new Error(`${name} must be a normalized absolute path, got ${JSON.stringify(value)}`);
  }
  return value.length > 1 && value.endsWith("/") ? value.slice(0, -1) : value;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): HelperConfig {
  const get = (name: string, fallback: string) => env[name] ?? fallback;

  const poolName = get("IMGD_POOL_NAME", "imgd-pool");
  // The pool name is passed to dmsetup and appears in /dev/mapper: keep it to a plain word that
  // cannot be mistaken for an option or collide with the layer/activation name patterns.
  if (!/^[a-z][a-z0-9_-]{0,62}$/.test(poolName) || /^imgd-(layer|act)-/.test(poolName)) {
    throw new Error(`IMGD_POOL_NAME ${JSON.stringify(poolName)} is not allowed`);
  }

  const socketGroup = get("IMGD_HELPER_GROUP", "imgd");
  if (!/^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$/.test(socketGroup)) {
    throw new Error(`IMGD_HELPER_GROUP ${JSON.stringify(socketGroup)} is not a group name or gid`);
  }

  const agentUser = get("IMGD_AGENT_USER", "imgd");
  if (!/^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$/.test(agentUser) || agentUser === "0" || agentUser === "root") {
    throw new Error(`IMGD_AGENT_USER ${JSON.stringify(agentUser)} is not a user name or uid (root is not allowed)`);
  }

  const blockSectorsText = get("IMGD_POOL_BLOCK_SECTORS", "2048");
  const poolBlockSectors = /^[1-9][0-9]{0,6}$/.test(blockSectorsText) ? Number(blockSectorsText) : NaN;
  // dm-thin: block size is a multiple of 128 sectors (64 KiB), between 64 KiB and 1 GiB.
  if (!(poolBlockSectors >= 128 && poolBlockSectors <= 2097152 && poolBlockSectors % 128 === 0)) {
    throw new Error("IMGD_POOL_BLOCK_SECTORS must be a multiple of 128 between 128 and 2097152");
  }
  const blockBytes = poolBlockSectors * 512;

  const poolDataBytes = parseSize(get("IMGD_POOL_DATA_SIZE", "2G"));
  if (poolDataBytes % blockBytes !== 0 || poolDataBytes < 16 * blockBytes) {
    throw new Error(`IMGD_POOL_DATA_SIZE must be a multiple of the pool block size (${blockBytes} bytes) and hold at least 16 blocks`);
  }
  const poolMetaBytes = parseSize(get("IMGD_POOL_META_SIZE", "1M"));
  // The kernel uses at most ~15.8 GiB of metadata; metadata blocks are 4 KiB.
  if (poolMetaBytes % 4096 !== 0 || poolMetaBytes < 1024 ** 2 || poolMetaBytes > 16 * 1024 ** 3) {
    throw new Error("IMGD_POOL_META_SIZE must be a multiple of 4K between 1M and 16G");
  }
  const thinBytes = parseSize(get("IMGD_THIN_SIZE", "8G"));
  if (thinBytes % blockBytes !== 0) {
    throw new Error(`IMGD_THIN_SIZE must be a multiple of the pool block size (${blockBytes} bytes)`);
  }

  return {
    socketPath: absolutePath("IMGD_HELPER_SOCKET", get("IMGD_HELPER_SOCKET", "/run/imgd/privhelper.sock")),
    socketGroup,
    agentUser,
    stateDir: absolutePath("IMGD_HELPER_STATE_DIR", get("IMGD_HELPER_STATE_DIR", "/var/lib/imgd-privhelper")),
    blobDir: absolutePath("IMGD_BLOB_DIR", get("IMGD_BLOB_DIR", "/var/lib/imgd/blobs")),
    poolName,
    poolDataBytes,
    poolMetaBytes,
    poolBlockSectors,
    thinBytes,
  };
}

/** Resolves a group name (or numeric gid) through /etc/group; Node has no getgrnam. */
export function resolveGroupId(group: string, groupFile = "/etc/group"): number {
  if (/^[0-9]+$/.test(group)) return Number(group);
  for (const line of readFileSync(groupFile, "utf8").split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^[0-9]+$/.test(gid)) return Number(gid);
  }
  throw new Error(`group ${group} not found in ${groupFile}`);
}

/** Resolves a user name (or numeric uid) through /etc/passwd; Node has no getpwnam. */
export function resolveUserId(user: string, passwdFile = "/etc/passwd"): number {
  if (/^[0-9]+$/.test(user)) return Number(user);
  for (const line of readFileSync(passwdFile, "utf8").split("\n")) {
    const [name, , uid] = line.split(":");
    if (name === user && uid !== undefined && /^[0-9]+$/.test(uid)) return Number(uid);
  }
  throw new Error(`user ${user} not found in ${passwdFile}`);
}
