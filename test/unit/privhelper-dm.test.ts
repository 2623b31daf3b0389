// Parsing of dmsetup output, against lines captured from the test VM's kernel (Debian 6.1).
import { test } from "node:test";
import assert from "node:assert/strict";
import { parseAllTables, parsePoolTable, parseThinTable } from "../../privhelper/dm.ts";
import { parsePoolStatus } from "../../privhelper/pool.ts";

test("thin-pool status: blocks converted to bytes, mode and no-space policy read", () => {
  const fresh = parsePoolStatus("imgd-pool", "0 524288 thin-pool 0 34/256 0/256 - rw discard_passdown error_if_no_space - 64 \n", 2048);
  assert.deepEqual(fresh, {
    name: "imgd-pool", dataUsedBytes: 0, dataTotalBytes: 256 * 1024 * 1024, metaUsedBytes: 34 * 4096, metaTotalBytes: 1024 * 1024,
    mode: "rw", blockSizeBytes: 1024 * 1024, errorIfNoSpace: true,
  });
  const full = parsePoolStatus("imgd-pool", "0 524288 thin-pool 7 37/256 256/256 - out_of_data_space discard_passdown error_if_no_space - 64", 2048);
  assert.deepEqual([full.mode, full.dataUsedBytes, full.metaUsedBytes], ["out_of_data_space", 256 * 1024 * 1024, 37 * 4096]);
  const queueing = parsePoolStatus("p", "0 4194304 thin-pool 1 40/256 10/2048 - rw no_discard_passdown queue_if_no_space - 64", 128);
  assert.deepEqual([queueing.errorIfNoSpace, queueing.blockSizeBytes, queueing.dataTotalBytes], [false, 65536, 2048 * 65536]);
  assert.equal(parsePoolStatus("p", "0 524288 thin-pool Fail", 2048).mode, "fail");
  for (const bad of ["", "0 524288 thin 254:0 1", "0 524288 thin-pool 0 34/256 x/256 - rw", "0 524288 thin-pool 0 34/256 0/256 - weird"]) {
    assert.throws(() => parsePoolStatus("p", bad, 2048), /unexpected status/, bad);
  }
});

test("thin table: exactly one thin target, no external origin", () => {
  assert.deepEqual(parseThinTable("0 16777216 thin 254:0 1\n"), { sectors: 16777216, poolDevice: "254:0", thinId: 1 });
  for (const other of ["0 16777216 thin 254:0 1 254:5", "0 100 linear 8:1 0", "0 16777216 thin 254:0 1\n16777216 8 thin 254:0 2", "", "0 16777216 thin /dev/mapper/imgd-pool 1"]) {
    assert.equal(parseThinTable(other), null, other);
  }
});

test("every table in one dmsetup call: one entry per device, further targets kept, none when there are no devices", () => {
  const out = "imgd-pool: 0 2097152 thin-pool 7:1 7:0 2048 205 1 error_if_no_space\nimgd-layer-0123456789abcdef0123456789abcdef: 0 16777216 thin 253:0 4\nother: 0 8 linear 7:2 0\n8 8 linear 7:3 0\n";
  const tables = parseAllTables(out);
  assert.deepEqual([...tables.keys()], ["imgd-pool", "imgd-layer-0123456789abcdef0123456789abcdef", "other"]);
  assert.equal(tables.get("imgd-layer-0123456789abcdef0123456789abcdef"), "0 16777216 thin 253:0 4");
  assert.equal(tables.get("other"), "0 8 linear 7:2 0\n8 8 linear 7:3 0");
  assert.equal(parseThinTable(tables.get("other")!), null, "two targets are not one thin device");
  assert.equal(parseAllTables("No devices found\n").size, 0);
});

test("thin-pool table", () => {
  assert.deepEqual(parsePoolTable("0 524288 thin-pool 7:0 7:1 2048 26 1 error_if_no_space \n"), {
    sectors: 524288, metaDevice: "7:0", dataDevice: "7:1", blockSectors: 2048, features: ["error_if_no_space"],
  });
  assert.equal(parsePoolTable("0 524288 thin 254:0 1"), null);
  assert.equal(parsePoolTable("0 10 linear 8:1 0\n10 10 linear 8:2 0"), null);
});

test("thin_ls ids: one decimal id per line, sorted; anything else is refused", async () => {
  const { parseThinLsIds } = await import("../../privhelper/thin.ts");
  assert.deepEqual(parseThinLsIds("12\n 3\n\n4242\n"), [3, 12, 4242]);
  assert.deepEqual(parseThinLsIds(""), []);
  for (const bad of ["DEV\n1", "1 2", "-1", "0x10", "1e3", "123456789"]) assert.throws(() => parseThinLsIds(bad), /unexpected line/, bad);
});
