// Maps each allow-listed op to the module that performs it. Requests arrive here already parsed
// by protocol.ts, so every argument has its validated type.
import { applyLayerToDevice } from "./apply/layer-apply.ts";
import type { HelperConfig } from "./config.ts";
import { activateDevice, deactivateDevice, listDevices } from "./device.ts";
import { makeFilesystem } from "./fs.ts";
import { poolEnsure, poolStatus } from "./pool.ts";
import type { OpName, OpResult, Request } from "./protocol.ts";
import { createThin, deleteThin, listThinIds, snapshotThin } from "./thin.ts";

export async function perform(config: HelperConfig, request: Request): Promise<OpResult<OpName>> {
  switch (request.op) {
    case "pool.status":
      return poolStatus(config);
    case "pool.ensure":
      return poolEnsure(config);
    case "thin.create":
      await createThin(config, request.args.thinId);
      return {};
    case "thin.snapshot":
      await snapshotThin(config, request.args.thinId, request.args.originId);
      return {};
    case "thin.delete":
      await deleteThin(config, request.args.thinId);
      return {};
    case "thin.list":
      return { thinIds: await listThinIds(config) };
    case "device.activate":
      return activateDevice(config, request.args.name, request.args.thinId);
    case "device.deactivate":
      await deactivateDevice(config, request.args.name);
      return {};
    case "device.list":
      return { devices: await listDevices(config) };
    case "fs.mkfs":
      await makeFilesystem(config, request.args.name);
      return {};
    case "layer.apply":
      return applyLayerToDevice(config, request.args.name, request.args.digest);
  }
}
