/**
 * Fault 4a: the database unreachable at start. A long-running role waits for it
 * (`--startup-wait`, capped exponential backoff with jitter), one clear warn line per
 * attempt that names the database (never its password), the reason and the next attempt;
 * it runs once the database is back, gives up with one clear line when the wait runs out,
 * and exits 0 on SIGTERM while waiting. Admin commands still fail at once. The 10 s outage
 * mid-run is tests/fault/outage_mid_run_test.ts.
 */
import { assert, assertEquals } from "../assert.ts";
import {
  createRunsTable,
  exitWithin,
  logLines,
  runShoal,
  type ShoalProcess,
  spawnShoal,
  TEST_MAIN,
  waitFor,
} from "../helpers.ts";
import { connect } from "../../lib/db.ts";
import { enqueue } from "../../lib/queue.ts";
import { ownCluster } from "./harness.ts";

/** In every URL the tests hand out; trust auth ignores it, and no output may show it. */
const PASSWORD = "hunter2-never-logged";

function withPassword(url: string): string {
  const u = new URL(url);
  u.password = PASSWORD;
  return u.toString();
}

/** The role's "waiting for the database" log records. */
function waitingLines(proc: ShoalProcess): Record<string, unknown>[] {
  return logLines(proc.output()).filter((l) =>
    String(l.message).startsWith("Waiting for the database")
  );
}

Deno.test("a role started before its database waits with one line per attempt, then runs", async () => {
  await using cluster = await ownCluster();
  await cluster.stop();
  const url = withPassword(cluster.url);
  const roles = ["consumer", "reaper", "scheduler"];
  await using consumer = spawnShoal(
    ["--role", "consumer", "--queues", "q", "--poll-interval", "100ms", "--startup-wait", "60s"],
    { url, mainModule: TEST_MAIN },
  );
  const leader = ["--lease", "2s", "--interval", "300ms", "--startup-wait", "60s"];
  await using reaper = spawnShoal(["--role", "reaper", ...leader], { url, mainModule: TEST_MAIN });
  await using scheduler = spawnShoal(["--role", "scheduler", ...leader], {
    url,
    mainModule: TEST_MAIN,
  });
  const procs = [consumer, reaper, scheduler];
  await waitFor("two waiting lines from each role", () =>
    procs.every((p) => {
      if (/^shoal: /m.test(p.output())) throw new Error(`A role gave up:\n${p.output()}`);
      return waitingLines(p).length >= 2;
    }), 30_000);
  const waitedMs = 3000;
  await new Promise((resolve) => setTimeout(resolve, waitedMs));
  procs.forEach((p, i) => {
    const lines = waitingLines(p);
    for (const line of lines) {
      assertEquals(line.level, "WARN", JSON.stringify(line));
      const message = String(line.message);
      assert(
        message.startsWith("Waiting for the database at postgres://postgres:***@127.0.0.1:"),
        message,
      );
      assert(message.includes("ECONNREFUSED"), message);
      assert(/next attempt in \d+(\.\d)?(ms|s) /.test(message), message);
    }
    // Backoff, not a tight loop: 1 s, 2 s, 4 s ... (jittered down to half) in a few seconds.
    assert(lines.length <= 6, `${roles[i]} tried ${lines.length} times:\n${p.output()}`);
    assert(!p.output().includes(PASSWORD), `${roles[i]} logged the password`);
  });

  await cluster.start();
  for (const p of procs) {
    await waitFor(`${p.child.pid} to start`, () => /started/.test(p.output()), 30_000);
  }
  const sql = connect(cluster.url, { applicationName: "shoal test", max: 1 });
  try {
    await createRunsTable(sql);
    await enqueue(sql, "test.record", { ms: 0 }, { queue: "q" });
    await waitFor("the job to run", async () => {
      const [row] = await sql<{ n: number }[]>`
        select count(*)::int as n from test_runs where finished_at is not null`;
      return row!.n === 1;
    }, 30_000);
  } finally {
    await sql.end();
  }
  for (const p of procs) p.kill("SIGTERM");
  const exits = await Promise.all(procs.map((p) => exitWithin(p, 20_000)));
  exits.forEach((e, i) => {
    assertEquals(e.code, 0, `${roles[i]}:\n${e.output}`);
    assert(!e.output.includes(PASSWORD), `${roles[i]} logged the password`);
    assert(e.output.includes("Reached the database at"), `${roles[i]}:\n${e.output}`);
  });
});

Deno.test("a role gives up with one clear line once --startup-wait runs out", async () => {
  await using cluster = await ownCluster();
  await cluster.stop();
  const url = withPassword(cluster.url);
  // 0s: no waiting at all, the one-line failure of an admin command.
  for (const wait of ["2s", "0s"]) {
    await using proc = spawnShoal(["--role", "consumer", "--startup-wait", wait], {
      url,
      mainModule: TEST_MAIN,
    });
    const exit = await exitWithin(proc, 30_000);
    assertEquals(exit.code, 1, exit.output);
    assert(!exit.output.includes(PASSWORD), `the password was logged:\n${exit.output}`);
    const lines = exit.output.trim().split("\n");
    const plain = lines.filter((l) => !l.startsWith("{"));
    assertEquals(plain.length, 1, `more than one plain line:\n${exit.output}`);
    const last = lines.at(-1)!;
    const after = wait === "0s" ? "" : ` after waiting ${wait}`;
    assert(
      last.startsWith(`shoal: Cannot reach the database at postgres://postgres:***@127.0.0.1:`),
      last,
    );
    assert(last.includes(`/shoal${after}: `) && last.includes("ECONNREFUSED"), last);
    const waits = waitingLines(proc).length;
    if (wait === "0s") assertEquals(waits, 0, exit.output);
    else assert(waits >= 1 && waits <= 3, `${waits} waiting lines in 2 s:\n${exit.output}`);
  }
  // Admin commands never wait: one line, exit 1.
  for (const args of [["status"], ["migrate"]]) {
    const result = await runShoal(args, { url });
    assertEquals(result.code, 1, result.stderr);
    assertEquals(result.stderr.trim().split("\n").length, 1, result.stderr);
    assert(result.stderr.startsWith("shoal: Cannot reach the database at "), result.stderr);
    assert(!result.stderr.includes(PASSWORD), result.stderr);
  }
});

Deno.test("SIGTERM while a role waits for its database exits 0 at once", async () => {
  await using cluster = await ownCluster();
  await cluster.stop();
  await using proc = spawnShoal(["--role", "all", "--startup-wait", "60s"], {
    url: cluster.url,
    mainModule: TEST_MAIN,
  });
  await waitFor("a waiting line", () => waitingLines(proc).length >= 1, 30_000);
  proc.kill("SIGTERM");
  const exit = await exitWithin(proc, 5_000);
  assertEquals(exit.code, 0, exit.output);
  assert(exit.elapsedMs < 5_000, `took ${exit.elapsedMs} ms`);
});
