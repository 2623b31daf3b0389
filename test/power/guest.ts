// One boot of the power-cut test (test/vm/powercut), run as root inside the VM on a persistent
// disk (test/vm/run --disk): the agent's and the helper's state, the pool's backing files and
// this test's journal survive from one boot to the next; nothing else does.
//
//   node test/power/guest.ts --boot N --seed S [--cut-within-ms MS | --final]
//
// Each boot first checks what the previous boot's power cut left (every run ends on its own,
// none FAILED, the catalog agrees with the pool and the kernel, every activation holds its
// image's exact tree, what the user deactivated stays deactivated), then, unless --final, starts
// a workload of pulls, activations, deactivations and deletions and cuts the power (sysrq b: an
// immediate reboot with no sync, so whatever the guest had not flushed is lost) at a random
// moment. The journal records what the API confirmed, each line fsynced before it counts, and what
// the user asked to remove before asking: a deactivation or deletion the cut interrupted was asked
// for, so the agent may finish it on resume (it is durable) or not; either outcome is correct.
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { setTimeout as sleep } from "node:timers/promises";
import { RunKind, RunStatus } from "../../client/sdk.ts";
import { Prng } from "../fixtures/prng.ts";
import { Agent, failureReason, invariantProblems, loopDevices, treeProblems } from "../helpers/crash-harness.ts";
import type { ManifestEntry } from "../fixtures/tree.ts";

const repo = join(import.meta.dirname, "../..");
const JOURNAL = "/persist/power-journal.log";
const IMAGES = ["golang", "node", "python"];
const expectedDir = process.env.IMGD_TEST_EXPECTED_DIR ?? join(repo, ".vm/synthetic/expected");
const expected = (image: string): ManifestEntry[] => JSON.parse(readFileSync(join(expectedDir, `${image}.json`), "utf8"));

const { values } = parseArgs({
  options: { boot: { type: "string" }, seed: { type: "string" }, "cut-within-ms": { type: "string" }, final: { type: "boolean" } },
  strict: true,
});
const boot = Number(values.boot);
const rng = new Prng(`${values.seed}:${boot}`);
const say = (text: string) => console.log(`power[boot ${boot}]: ${text}`);

type JournalLine =
  | { op: "activated"; id: string; image: string }
  | { op: "deactivating"; id: string }
  | { op: "deactivated"; id: string }
  | { op: "deleting"; image: string }
  | { op: "deleted"; image: string; deactivated: string[] }
  // A deletion the API refused: no longer pending (what it may have removed stays uncertain).
  | { op: "delete-refused"; image: string };

/** Appends one confirmed outcome and fsyncs it: after a cut, the journal holds nothing unconfirmed. */
function record(line: JournalLine): void {
  const fd = openSync(JOURNAL, "a");
  try {
    writeSync(fd, JSON.stringify(line) + "\n");
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function journal(): JournalLine[] {
  if (!existsSync(JOURNAL)) return [];
  // A line cut short by the power cut cannot be confirmed (its fsync never returned): ignore it.
  return readFileSync(JOURNAL, "utf8").split("\n").filter(Boolean).flatMap((l) => {
    try {
      return [JSON.parse(l) as JournalLine];
    } catch {
      return [];
    }
  });
}

/**
 * What the user was told: activations that exist (`active`), those that are gone (`gone`), and,
 * among the active, those whose removal was asked for but not confirmed (`mayBeGone`).
 */
function userView(): { active: Map<string, string>; gone: Set<string>; mayBeGone: Set<string> } {
  const active = new Map<string, string>();
  const gone = new Set<string>();
  const mayBeGone = new Set<string>();
  const deleting = new Map<string, number>(); // image -> deletions asked for and not yet confirmed
  const remove = (id: string) => (active.delete(id), mayBeGone.delete(id), gone.add(id));
  for (const line of journal()) {
    if (line.op === "activated") {
      active.set(line.id, line.image);
      if (deleting.get(line.image)) mayBeGone.add(line.id);
    }
    if (line.op === "deactivating") mayBeGone.add(line.id);
    if (line.op === "deactivated") remove(line.id);
    if (line.op === "deleting") {
      deleting.set(line.image, (deleting.get(line.image) ?? 0) + 1);
      for (const [id, image] of active) if (image === line.image) mayBeGone.add(id);
    }
    if (line.op === "deleted" || line.op === "delete-refused") deleting.set(line.image, (deleting.get(line.image) ?? 1) - 1);
    if (line.op === "deleted") for (const id of line.deactivated) remove(id);
  }
  return { active, gone, mayBeGone };
}

async function check(agent: Agent): Promise<string[]> {
  await agent.waitAllRunsEnd(600_000);
  const problems: string[] = [];
  const { runs } = await agent.client.listRuns({ pageSize: 1000 });
  const failed = runs.filter((r) => r.status === RunStatus.FAILED);
  // A run may fail by its own step's error (a deletion that met a pull, say); never because the
  // power went. A deactivation has no such error here (nothing holds an activation open): its
  // goal is an absence, which an activation removed by something else has reached too.
  for (const r of failed) {
    const line = `run ${RunKind[r.fsm]}/${r.resourceId} (${r.id}) FAILED at ${r.state}: ${r.error}`;
    if (failureReason(r.error) === "interruption" || r.fsm === RunKind.DEACTIVATE) problems.push(line);
    else say(`(a step's own error) ${line}`);
  }
  // The pool's two loop devices are the only ones a clean state has.
  problems.push(...(await invariantProblems(agent, loopDevices())));
  const { active, gone, mayBeGone } = userView();
  const { activations } = await agent.client.listActivations({});
  const present = new Map(activations.map((a) => [a.id, a]));
  let finished = 0;
  for (const [id, image] of active) {
    const a = present.get(id);
    if (!a && mayBeGone.has(id)) {
      // Its removal was asked for before the cut and the agent finished it: from now on it is
      // gone for good, and coming back would be a fault.
      record({ op: "deactivated", id });
      finished++;
      continue;
    }
    if (!a) {
      problems.push(`activation ${id} of ${image} was confirmed to the user but is gone`);
      continue;
    }
    const differences = await treeProblems(a.devicePath, expected(image));
    if (differences.length > 0) problems.push(`activation ${id} of ${image} differs from the image:\n  ${differences.slice(0, 10).join("\n  ")}`);
  }
  for (const id of gone) if (present.has(id)) problems.push(`activation ${id} was deactivated by the user but is back`);
  say(
    `checked ${runs.length} runs (${failed.length} failed), ${active.size - finished} confirmed activations, ` +
      `${gone.size + finished} deactivated (${finished} of them finished after the cut)`,
  );
  return problems;
}

/** Random operations, two at a time, until the power goes. Refusals (FAILED_PRECONDITION) are part of the game. */
async function workload(agent: Agent): Promise<never> {
  const worker = async (n: number): Promise<never> => {
    for (let i = 0; ; i++) {
      const image = rng.pick(IMAGES);
      const roll = rng.next();
      try {
        if (roll < 0.3) {
          for await (const _ of agent.client.pullImage({ image }));
        } else if (roll < 0.65) {
          const { activation } = await agent.client.activateImage({ image });
          record({ op: "activated", id: activation!.id, image });
        } else if (roll < 0.9) {
          const ids = [...userView().active.keys()];
          if (ids.length === 0) continue;
          const id = rng.pick(ids);
          record({ op: "deactivating", id });
          await agent.client.deactivateImage({ activationId: id });
          record({ op: "deactivated", id });
        } else {
          record({ op: "deleting", image });
          const { deactivated } = await agent.client.deleteImage({ image, force: true }).catch((err: unknown) => {
            record({ op: "delete-refused", image });
            throw err;
          });
          record({ op: "deleted", image, deactivated });
        }
      } catch (err) {
        say(`worker ${n} op ${i}: ${(err as Error).message.split("\n")[0]}`);
        await sleep(200);
      }
    }
  };
  return Promise.race([worker(1), worker(2)]);
}

async function main(): Promise<number> {
  const agent = new Agent();
  try {
    const problems = await check(agent);
    if (problems.length > 0) {
      say(`INVARIANTS BROKEN after boot ${boot - 1}'s power cut:\n${problems.join("\n")}`);
      return 1;
    }
    if (values.final) {
      say("final check passed");
      return 0;
    }
    const cutWithin = Number(values["cut-within-ms"] ?? 20_000);
    const delay = Math.floor(500 + rng.next() * cutWithin);
    say(`workload started; the power goes in ${delay} ms`);
    setTimeout(() => {
      // Told to the host first, through the 9p run directory (written through at once).
      writeFileSync("/run/imgd-vm/power-cut", `boot ${boot} after ${delay} ms\n`);
      writeFileSync("/proc/sysrq-trigger", "b");
    }, delay);
    return await workload(agent);
  } finally {
    agent.close();
  }
}

process.exitCode = await main();
