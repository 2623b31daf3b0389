// The systemd units in deploy/: `systemd-analyze verify` accepts both, and the exposure figures
// `systemd-analyze security --offline=yes` gives them are the ones README.md states.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { debianTool } from "../helpers/debian-tool.ts";

const repo = join(import.meta.dirname, "../..");
const UNITS = ["imgd.service", "imgd-privhelper.service"];
const analyze = debianTool("systemd-analyze", "systemd");
const skip = analyze ? false : "systemd-analyze is missing (Debian package systemd; installed automatically when the tests run as root)";

test("systemd-analyze verify accepts both units", { skip }, () => {
  // verify checks that ExecStart's program exists: point /opt/imgd (the install path) at this
  // checkout, and change nothing else.
  const dir = mkdtempSync(join(tmpdir(), "imgd-units-"));
  try {
    const files = UNITS.map((unit) => {
      const text = readFileSync(join(repo, "deploy", unit), "utf8");
      assert.match(text, /^ExecStart=\/opt\/imgd\//m);
      assert.match(text, /^Type=notify$/m, `${unit} tells systemd when it is ready`);
      writeFileSync(join(dir, unit), text.replaceAll("/opt/imgd/", `${repo}/`));
      return join(dir, unit);
    });
    const r = spawnSync(analyze!, ["verify", ...files], { encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(`${r.stdout}${r.stderr}`.trim(), "", "no warning either");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("systemd-analyze security rates both units OK, with the figures README.md gives", { skip }, () => {
  const readme = readFileSync(join(repo, "README.md"), "utf8");
  for (const unit of UNITS) {
    const r = spawnSync(analyze!, ["security", "--offline=yes", "--no-pager", join(repo, "deploy", unit)], { encoding: "utf8" });
    const m = /Overall exposure level for \S+: ([0-9.]+) ([A-Z]+)/.exec(r.stdout);
    assert.ok(m, `no exposure figure for ${unit}: ${r.stdout.slice(-300)}${r.stderr}`);
    const [, figure, rating] = m;
    assert.equal(rating, "OK", `${unit}: ${figure} ${rating}`);
    assert.ok(readme.includes(`| \`${unit}\` | ${figure} OK`), `README.md's table should give ${unit} ${figure} OK`);
  }
});
