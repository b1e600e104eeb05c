/**
 * Fault 4a: the database unreachable at start. A role says so in one clear line and exits
 * non-zero (the CLI contract in design.md: no stack trace, no hang), and one started once
 * the database is back runs. The 10 s outage mid-run is tests/fault/outage_mid_run_test.ts.
 */
import { assert, assertEquals } from "../assert.ts";
import { exitWithin, spawnShoal, TEST_MAIN, waitFor } from "../helpers.ts";
import { ownCluster } from "./harness.ts";

Deno.test("a role started while the database is unreachable exits with one clear line", async () => {
  await using cluster = await ownCluster();
  await cluster.stop();
  const roles = ["consumer", "reaper", "scheduler"];
  const procs = roles.map((role) =>
    spawnShoal(["--role", role, "--log-format", "json"], {
      url: cluster.url,
      mainModule: TEST_MAIN,
    })
  );
  const exits = await Promise.all(procs.map((p) => exitWithin(p, 30_000)));
  exits.forEach((e, i) => {
    assertEquals(e.code, 1, `${roles[i]}:\n${e.output}`);
    const lines = e.output.trim().split("\n");
    assertEquals(lines.length, 1, `${roles[i]} wrote more than one line:\n${e.output}`);
    assert(
      lines[0]!.startsWith("shoal: Cannot reach the database at postgres://postgres@127.0.0.1:"),
      lines[0],
    );
    assert(lines[0]!.includes("ECONNREFUSED"), lines[0]);
  });
  await cluster.start();
  await using back = spawnShoal(["--role", "consumer", "--log-format", "json"], {
    url: cluster.url,
    mainModule: TEST_MAIN,
  });
  await waitFor("the consumer to start", () => back.output().includes("started on"), 30_000);
  back.kill("SIGTERM");
  assertEquals((await exitWithin(back, 20_000)).code, 0);
});
