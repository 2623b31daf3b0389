// Crash at any point (issue 4), inside the VM (test/vm/run): kill -9 the agent, the helper or
// both at named kill points (IMGD_TEST_CRASH_AT, see test/vm/README.md) and at random moments,
// restart them, let every run end, and check what must then hold: the run ended as it should, the
// image is ready with the right tree, doctor is clean, SQLite and the pool agree, and nothing is
// left behind (dm tables, mounts, loop devices, temp files).
//
// npm test runs the scenarios marked `short` (each victim kind and each operation at least once)
// and a random loop of 8 kills (kill -9, or SIGTERM for a quarter of the agent's); npm run
// test:soak (IMGD_TEST_SOAK=1) the whole matrix and 100.
// Knobs: IMGD_TEST_CRASH_ONLY=<regex> runs the scenarios of the whole matrix whose id matches (and skips the
// random loop unless it matches "random"); IMGD_TEST_CRASH_KILLS kills in the random loop;
// IMGD_TEST_CRASH_SEED the loop's seed (printed; random by default).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { ImageState, RunStatus } from "../../client/sdk.ts";
import { Prng } from "../fixtures/prng.ts";
import { SOAK, soakOr } from "../helpers/soak.ts";
import {
  Agent,
  alive,
  arm,
  baseLayer,
  disarmAll,
  invariantProblems,
  kill9,
  logSince,
  logSize,
  loopDevices,
  pidOf,
  sh,
  sleep,
  startMissing,
  stop,
  testImage,
  treeProblems,
  uploadImages,
  waitDead,
  failureReason,
  type Service,
  type TestImage,
} from "../helpers/crash-harness.ts";

type Op = "pull" | "activate" | "deactivate";
type Victim = "agent" | "helper" | "both";

/**
 * One operation killed at each of `points` in turn: the first kill hits the operation, each later
 * one the run resumed after the previous kill (the process is restarted already armed with the
 * next point), then the run is let finish and everything is checked. Chaining the points of one
 * run costs one restart per point instead of a whole operation and check; a chain never puts more
 * than 4 interruptions on one step (5 quick ones in a row would end the run as a poison step).
 * IMGD_TEST_CRASH_SINGLE=1 runs every point as its own scenario instead (slower, isolated).
 */
interface Scenario {
  op: Op;
  points: string[];
  victim: Victim;
  /** The pull needs its own first layer (so that thin.create and mkfs run), not the shared one. */
  ownBase?: boolean;
  /** Part of npm test's short matrix (the soak run has them all). */
  short?: boolean;
}

// Every step's "before" (attempt begun), and "committed" where a step's end is not the next
// step's beginning (the last step); finalizers where an FSM has them; every mid-step point.
const CHAINS: Scenario[] = [
  {
    op: "pull",
    victim: "agent",
    points: [
      "fsm.pull.list.before", "fsm.pull.layers.before", "download.chunk-written#2", "pull.thin-id-allocated",
      "fsm.pull.layers.committed", "fsm.pull.finish.before", "fsm.pull.finish.committed", "fsm.pull.finalizers.before",
      "fsm.pull.finalizers.after",
    ],
  },
  // The rest of the layers step, in a chain of its own (at most 4 interruptions on one step):
  // with the shared base layer, the devices built are snapshots.
  { op: "pull", victim: "agent", points: ["pull.layer-applied", "pull.device-built"] },
  { op: "pull", victim: "agent", ownBase: true, short: true, points: ["pull.thin-id-allocated", "pull.layer-applied", "pull.device-built"] },
  {
    op: "activate",
    victim: "agent",
    points: [
      "fsm.activate.ensure-image.before", "fsm.activate.snapshot.before", "activate.thin-id-allocated",
      "fsm.activate.activate.before", "activate.device-activated", "fsm.activate.activate.committed",
    ],
  },
  {
    op: "deactivate",
    victim: "agent",
    points: [
      "fsm.deactivate.remove-device.before", "deactivate.device-removed", "fsm.deactivate.delete-snapshot.before",
      "deactivate.snapshot-deleted", "fsm.deactivate.forget.before", "fsm.deactivate.forget.committed",
    ],
  },
  { op: "pull", victim: "helper", ownBase: true, points: ["helper.thin.create.after-message"] },
  { op: "pull", victim: "helper", points: ["helper.thin.snapshot.after-message", "helper.device.activate.after-create"] },
  { op: "pull", victim: "helper", short: true, points: ["apply.entry-applied#4", "helper.apply.child-running#4"] },
  { op: "activate", victim: "helper", short: true, points: ["helper.thin.snapshot.after-message", "helper.device.activate.after-create"] },
  { op: "deactivate", victim: "helper", points: ["helper.thin.delete.after-message"] },
  { op: "pull", victim: "both", points: ["download.chunk-written", "pull.layer-applied"] },
  { op: "pull", victim: "both", ownBase: true, points: ["helper.thin.create.after-message"] },
  { op: "pull", victim: "both", points: ["helper.apply.child-running#2"] },
  { op: "activate", victim: "both", points: ["helper.thin.snapshot.after-message"] },
  { op: "deactivate", victim: "both", short: true, points: ["helper.thin.delete.after-message"] },
];

const only = process.env.IMGD_TEST_CRASH_ONLY ? new RegExp(process.env.IMGD_TEST_CRASH_ONLY) : undefined;
// A regex chooses from the whole matrix.
const CHOSEN = SOAK || only ? CHAINS : CHAINS.filter((c) => c.short);
const MATRIX = process.env.IMGD_TEST_CRASH_SINGLE === "1" ? CHOSEN.flatMap((c) => c.points.map((point): Scenario => ({ ...c, points: [point] }))) : CHOSEN;
const idOf = (s: Scenario) => `${s.op} ${s.points.join(" > ")} ${s.victim}`;
const scenarios = MATRIX.filter((s) => !only || only.test(idOf(s)));
const KILLS = Number(process.env.IMGD_TEST_CRASH_KILLS ?? soakOr(100, 8));
const SEED = process.env.IMGD_TEST_CRASH_SEED ?? randomBytes(4).toString("hex");

/** Which process holds a kill point: the applier child's points are set through the helper. */
const holder = (point: string): Service => (/^(helper|apply)\./.test(point) ? "helper" : "agent");
const other = (service: Service): Service => (service === "agent" ? "helper" : "agent");

const sharedBase = baseLayer("shared");
const images = new Map<string, TestImage>();
const imageFor = (name: string, ownBase = false) => {
  const image = testImage(name, ownBase ? baseLayer(name) : sharedBase);
  images.set(name, image);
  return image;
};
const activateImage = imageFor("crash-act");
const randomImages = ["a", "b", "c", "d", "e", "f"].map((x, i) => imageFor(`rnd-${x}`, i % 3 === 0));
const scenarioImages = scenarios.map((s, i) => (s.op === "pull" ? imageFor(`crash-${i}`, s.ownBase) : activateImage));

let agent: Agent;
let loopsAtStart: string[];
const started = performance.now();

before(async () => {
  assert.ok(process.env.IMGD_VM, "these tests run inside the VM: test/vm/run");
  sh("vm-reset");
  loopsAtStart = loopDevices();
  // Kills here come every second or two, at random, for minutes: to the poison rule that looks
  // exactly like a step that kills the agent each time it starts. This file tests that external
  // kills never fail a run, so the agents it starts allow any number of quick interruptions; the
  // poison rule itself is tested with its default in test/unit/fsm-crash.test.ts.
  process.env.IMGD_FSM_MAX_QUICK_INTERRUPTIONS = "1000";
  // Restart both reading their kill point from a file (empty: none), to arm them while running.
  disarmAll();
  await kill9("agent");
  await kill9("helper");
  await startMissing();
  await uploadImages([...images.values()]);
  agent = new Agent();
});
after(() => {
  agent?.close();
  console.log(`crash tests: ${Math.round((performance.now() - started) / 1000)} s in all`);
});

async function assertInvariants(what: string): Promise<void> {
  const problems = await invariantProblems(agent, loopsAtStart);
  assert.deepEqual(problems, [], `${what}: invariants broken:\n${problems.join("\n")}`);
}

/** Activates the image, checks the activation's tree, and returns the activation. */
async function activateAndCheck(image: TestImage) {
  const { activation } = await agent.client.activateImage({ image: image.name });
  const problems = await treeProblems(activation!.devicePath, image.expected);
  assert.deepEqual(problems, [], `tree of ${image.name} (activation ${activation!.id}):\n${problems.slice(0, 20).join("\n")}`);
  return activation!;
}

async function ensurePulled(image: TestImage): Promise<void> {
  // A failed pull ends the stream with its error.
  for await (const _ of agent.client.pullImage({ image: image.name }));
}

/** Swallows the error of a call cut short by the kill. */
const background = (p: Promise<unknown>) => p.then(() => undefined, () => undefined);
const drain = async (stream: AsyncIterable<unknown>) => {
  for await (const _ of stream);
};

let timing: string[] = [];
let kills = 0;

/** Restarts what the last kill took down; tolerates a process armed to die while it starts. */
async function restartDead(): Promise<void> {
  const restartedAgent = !alive(pidOf("agent"));
  await startMissing({ mayDie: true });
  if (restartedAgent) agent.reconnect();
}

for (const [index, scenario] of scenarios.entries()) {
  test(`crash matrix: ${idOf(scenario)}`, async () => {
    const t0 = performance.now();
    const image = scenarioImages[index]!;
    let activationId = "";
    if (scenario.op !== "pull") await ensurePulled(image);
    if (scenario.op === "deactivate") activationId = (await agent.client.activateImage({ image: image.name })).activation!.id;

    let outcome: Promise<void> | undefined;
    for (const point of scenario.points) {
      // Arm the process holding the point: the running one, or the one restarted after the last kill.
      const armed = holder(point);
      const logFrom = logSize(armed);
      arm(armed, point);
      if (outcome === undefined) {
        const call =
          scenario.op === "pull" ? drain(agent.client.pullImage({ image: image.name }))
          : scenario.op === "activate" ? agent.client.activateImage({ image: image.name })
          : agent.client.deactivateImage({ activationId });
        outcome = background(call);
      } else {
        await restartDead();
      }
      if (point.startsWith("apply.")) {
        // The applier child kills itself and the helper lives on: wait for its report of the
        // killed child, then disarm so that the retry can succeed.
        await waitFor(() => logSince("helper", logFrom).includes(`IMGD-CRASH-POINT ${point}`), 120_000, `the applier never reached ${point}`);
        disarmAll();
        continue;
      }
      const died = await waitDead(pidOf(armed)!, 120_000);
      disarmAll();
      assert.ok(died, `${armed} never reached kill point ${point}`);
      // The applier's line about killing the helper goes to the dying helper's pipe: not checked.
      if (!point.startsWith("helper.apply.")) {
        const [name, nth = "1"] = point.split("#");
        assert.ok(logSince(armed, logFrom).includes(`IMGD-CRASH-POINT ${name}#${nth} `), `killed at ${point}, not by something else`);
      }
      if (scenario.victim === "both") await kill9(other(armed));
      kills += scenario.victim === "both" ? 2 : 1;
    }
    await restartDead();
    await outcome;

    const run = await agent.waitRunEnd(scenario.op, scenario.op === "pull" ? image.name : scenario.op === "deactivate" ? activationId : "");
    assert.equal(run.status, RunStatus.SUCCEEDED, `the ${scenario.op} run ended ${RunStatus[run.status]} at ${run.state}: ${run.error}`);
    if (scenario.op === "pull") {
      const { image: got } = await agent.client.getImage({ image: image.name });
      assert.equal(got!.state, ImageState.READY);
      await activateAndCheck(image); // left active: later invariant checks cover it too
    } else if (scenario.op === "activate") {
      const { activations } = await agent.client.listActivations({ image: image.name });
      const activation = activations.find((a) => a.id === run.resourceId);
      assert.ok(activation, `activation ${run.resourceId} is listed`);
      const problems = await treeProblems(activation.devicePath, image.expected);
      assert.deepEqual(problems, [], problems.slice(0, 20).join("\n"));
      await agent.client.deactivateImage({ activationId: activation.id });
    } else {
      const { activations } = await agent.client.listActivations({});
      assert.ok(!activations.some((a) => a.id === activationId), "the deactivated activation is gone");
    }
    await assertInvariants(idOf(scenario));
    timing.push(`${Math.round(performance.now() - t0)} ms ${idOf(scenario)}`);
  });
}

test("crash matrix timing", { skip: scenarios.length === 0 }, () => {
  console.log(`crash matrix: ${scenarios.length} scenarios, ${scenarios.reduce((n, s) => n + s.points.length, 0)} kill points, ${kills} processes killed\n${timing.join("\n")}`);
});

async function waitFor(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(what);
    await sleep(100);
  }
}

/** Runs counted by outcome: "succeeded", "failed: interruption", "failed: step error", "running". */
function countOutcomes(runs: { status: RunStatus; error: string }[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const r of runs) {
    const key = r.status === RunStatus.SUCCEEDED ? "succeeded" : r.status === RunStatus.FAILED ? `failed: ${failureReason(r.error)}` : "running";
    counts[key] = (counts[key] ?? 0) + 1;
  }
  return counts;
}

test("randomized crash loop: kill -9 at random moments during a workload", { skip: only && !only.test("random") ? "not selected" : false }, async () => {
  const t0 = performance.now();
  console.log(`random crash loop: seed ${SEED} (IMGD_TEST_CRASH_SEED=${SEED} repeats it), ${KILLS} kills`);
  const rng = new Prng(SEED);
  let kills = 0;
  let stopping = false;
  const inFlight = new Set<Promise<void>>();
  const opsDone = { pull: 0, activate: 0, deactivate: 0 };
  const restarts: number[] = [];
  const killsByKind: Record<string, number> = {};

  const workload = async () => {
    while (!stopping) {
      if (inFlight.size >= 3) {
        await Promise.race(inFlight);
        continue;
      }
      if (!alive(pidOf("agent"))) {
        await sleep(200); // calls would only fail until it is back
        continue;
      }
      const roll = rng.next();
      const image = rng.pick(randomImages);
      let call: Promise<unknown>;
      if (roll < 0.4) {
        call = drain(agent.client.pullImage({ image: image.name }));
        opsDone.pull++;
      } else if (roll < 0.75) {
        call = agent.client.activateImage({ image: image.name });
        opsDone.activate++;
      } else {
        const list = await agent.client.listActivations({}).catch(() => ({ activations: [] }));
        if (list.activations.length === 0) {
          await sleep(200);
          continue;
        }
        call = agent.client.deactivateImage({ activationId: rng.pick(list.activations).id });
        opsDone.deactivate++;
      }
      const p = background(call).then(() => void inFlight.delete(p));
      inFlight.add(p);
      await sleep(rng.int(50, 600));
    }
  };

  const killer = async () => {
    while (kills < KILLS) {
      await sleep(rng.int(200, 2500));
      const roll = rng.next();
      // Both at once half of the time: two kills for one (parallel) restart. A quarter of the agent's
      // deaths are graceful stops (SIGTERM, as systemctl restart): steps are asked to stop, and any
      // that outlive IMGD_FSM_STOP_TIMEOUT_MS are recorded as interrupted.
      const victims: Service[] = roll < 0.3 ? ["agent"] : roll < 0.5 ? ["helper"] : ["agent", "helper"];
      const graceful = victims.includes("agent") && rng.next() < 0.25;
      for (const v of victims) await (v === "agent" && graceful ? stop(v) : kill9(v));
      kills += victims.length;
      const kind = victims.join("+") + (graceful ? " (agent by SIGTERM)" : "");
      killsByKind[kind] = (killsByKind[kind] ?? 0) + 1;
      const r0 = performance.now();
      await startMissing();
      restarts.push(Math.round(performance.now() - r0));
      if (victims.includes("agent")) agent.reconnect();
    }
    stopping = true;
  };

  await Promise.all([workload(), killer()]);
  await Promise.all(inFlight);
  await agent.waitAllRunsEnd();
  const { runs } = await agent.client.listRuns({ pageSize: 1000 });
  const failed = runs.filter((r) => r.status === RunStatus.FAILED);
  const outcomes = countOutcomes(runs);
  console.log(
    `random crash loop: ${kills} kills, ops ${JSON.stringify(opsDone)}, ${runs.length} runs (${failed.length} failed), ` +
      `restart ms ${restarts.join(",")}, ${Math.round((performance.now() - t0) / 1000)} s\n` +
      `random crash loop outcomes: ${JSON.stringify(outcomes)}; restarts by victim: ${JSON.stringify(killsByKind)}`,
  );
  for (const r of failed) console.log(`  failed ${r.fsm} ${r.resourceId} at ${r.state} [${failureReason(r.error)}]: ${r.error}`);
  assert.equal(outcomes["failed: interruption"] ?? 0, 0, "no run may end FAILED because the agent or the helper was killed");
  assert.deepEqual(failed.map((r) => `${r.fsm} ${r.resourceId}: ${r.error}`), [], "every run of the loop completes");
  await assertInvariants("after the random crash loop");

  // Every image that reports ready has the right tree, through every active activation of it and
  // through a fresh one.
  const { images: listed } = await agent.client.listImages({});
  let checked = 0;
  for (const row of listed.filter((i) => i.state === ImageState.READY && i.name.startsWith("rnd-"))) {
    const image = images.get(row.name)!;
    const { activations } = await agent.client.listActivations({ image: row.name });
    for (const a of activations) {
      const problems = await treeProblems(a.devicePath, image.expected);
      assert.deepEqual(problems, [], `${row.name} activation ${a.id}:\n${problems.slice(0, 20).join("\n")}`);
      checked++;
    }
    if (activations.length === 0) (await activateAndCheck(image), checked++);
  }
  console.log(`random crash loop: ${checked} activation trees checked`);
  // A pull of every image now succeeds (failed ones start afresh) and leaves everything clean.
  for (const image of randomImages) await ensurePulled(image);
  for (const image of randomImages) if (!listed.some((i) => i.name === image.name && i.state === ImageState.READY)) await activateAndCheck(image);
  await assertInvariants("after pulling every image again");
  assert.ok(kills >= KILLS);
  assert.ok(!existsSync("/var/lib/imgd/tmp") || sh("ls", "-A", "/var/lib/imgd/tmp") === "");
});
