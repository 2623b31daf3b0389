// A small stand-in for the pool behind the root helper, on a real (in-memory) catalog: thin ids
// and mappings, "already gone" is success as in the real helper. It records, for every call, what
// the catalog said at that moment (the intent must be on record before each pool operation), can
// drop an operation (the helper died before it) or lose its answer (the effect happened), and can
// run a hook before an operation (something else changing the catalog meanwhile).
// Used by test/unit/thin-devices.test.ts and test/unit/agent-deactivate.test.ts.
import { Catalog } from "../../agent/catalog.ts";
import { openDatabase } from "../../agent/db.ts";
import type { HelperClient } from "../../agent/helper-client.ts";
import { chainIds } from "../../agent/images/chain.ts";
import * as thin from "../../agent/thin-devices.ts";

export const digest = (n: number) => "sha256:" + String(n).repeat(64);
export const [chain1, chain2] = chainIds([digest(1), digest(2)]) as [string, string];

export function stubPool() {
  const db = openDatabase(":memory:");
  const catalog = new Catalog(db);
  const thins = new Set<number>();
  const mapped = new Map<string, number>();
  /** Each call as "op subject: state at the time of the call". */
  const calls: string[] = [];
  const faults = new Map<string, "dropped" | "answer lost">();
  /** Runs (and is awaited) before the named operation reaches the pool, once. */
  const before = new Map<string, () => Promise<void>>();
  const stateOf = (args: { thinId?: number; name?: string }): string => {
    const owner =
      catalog.listDevices().find((d) => d.thinId === args.thinId || d.name === args.name) ??
      catalog.listActivations().find((a) => a.thinId === args.thinId || a.name === args.name);
    if (owner) return owner.state;
    if (args.thinId === undefined) return "no row";
    if (catalog.adoptedThinIds().includes(args.thinId)) return "reserved";
    return catalog.thinIdAllocated(args.thinId) ? "allocated, no row" : "free";
  };
  const helper = {
    call: async (op: string, args: { thinId?: number; originId?: number; name?: string }) => {
      if (op === "thin.list") return { thinIds: [...thins].sort() };
      if (op === "device.list") return { devices: [...mapped].map(([name, thinId]) => ({ name, thinId })) };
      const hook = before.get(op);
      before.delete(op);
      await hook?.();
      calls.push(`${op} ${args.name ?? args.thinId}: ${stateOf(args)}`);
      const fault = faults.get(op);
      faults.delete(op);
      if (fault === "dropped") throw new Error(`the helper died before ${op}`);
      let result: unknown = {};
      switch (op) {
        case "thin.create":
          thins.add(args.thinId!);
          break;
        case "thin.snapshot":
          if (!thins.has(args.originId!)) throw new Error(`origin ${args.originId} does not exist`);
          thins.add(args.thinId!);
          break;
        case "thin.delete":
          if ([...mapped.values()].includes(args.thinId!)) throw new Error(`thin ${args.thinId} is mapped`);
          thins.delete(args.thinId!); // gone already: success
          break;
        case "device.activate":
          if (!thins.has(args.thinId!)) throw new Error(`thin ${args.thinId} does not exist`);
          mapped.set(args.name!, args.thinId!);
          result = { path: `/dev/mapper/${args.name}` };
          break;
        case "device.deactivate":
          mapped.delete(args.name!); // gone already: success
          break;
      }
      if (fault === "answer lost") throw new Error(`the connection dropped during ${op}`);
      return result;
    },
  } as unknown as HelperClient;
  const pool = { catalog, helper };
  /** A ready layer device (chain1) built through the module. */
  const readyDevice = async () => {
    const device = thin.allocateLayerDevice(pool, { chainId: chain1, parentChainId: null, layerDigest: digest(1) });
    await thin.createLayerDevice(pool, device, null);
    await thin.unmapLayerDevice(pool, device);
    thin.layerDeviceReady(pool, device);
    return catalog.getDevice(chain1)!;
  };
  return { db, catalog, pool, thins, mapped, calls, faults, before, readyDevice };
}
