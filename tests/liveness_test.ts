/**
 * lib/liveness.ts (what /healthz judges): a loop is stuck once silent for twice its longest
 * turn; the roles' longest turns hold their deadlines and backoff caps, so an outage (during
 * which every loop keeps turning) never looks stuck. The real server and real processes are
 * in tests/http_server_test.ts and tests/fault/probes_test.ts.
 */
import { assert, assertEquals } from "./assert.ts";
import { LoopWatch, STUCK_AFTER_TURNS } from "../lib/liveness.ts";
import { longestConsumerTurnMs } from "../lib/consumer.ts";
import { longestLeaderTurnMs } from "../lib/leader.ts";
import { STATEMENT_DEADLINE_MS } from "../lib/db.ts";

/** A LoopWatch on a clock the test moves. */
function watchAt(start = 1_000): { watch: LoopWatch; at: (ms: number) => void } {
  let now = start;
  return { watch: new LoopWatch(() => now), at: (ms) => void (now = ms) };
}

Deno.test("LoopWatch.check() says how long ago each loop turned, and names a loop silent past twice its longest turn", () => {
  const { watch, at } = watchAt(1_000);
  assertEquals(watch.check(), { stuck: false, line: "ok" }); // nothing watched yet
  const consumerTurned = watch.watch("consumer", 500);
  const reaperTurned = watch.watch("reaper", 2_000);
  at(1_120);
  assertEquals(watch.check(), { stuck: false, line: "ok: consumer 120ms ago, reaper 120ms ago" });
  at(2_000); // the consumer 1000 ms silent: its limit, not past it
  assertEquals(watch.check().stuck, false);
  at(2_001);
  assertEquals(watch.check(), {
    stuck: true,
    line: "stuck: consumer silent for 1001ms (limit 1s)",
  });
  consumerTurned();
  at(2_500);
  assertEquals(watch.check(), { stuck: false, line: "ok: consumer 499ms ago, reaper 1500ms ago" });
  reaperTurned();
  at(7_000);
  assertEquals(watch.check(), {
    stuck: true,
    line: "stuck: consumer silent for 4999ms (limit 1s), reaper silent for 4500ms (limit 4s)",
  });
});

Deno.test("LoopWatch.watch() refuses a longest turn that is not positive", () => {
  const { watch } = watchAt();
  for (const bad of [0, -1, NaN]) {
    let message = "";
    try {
      watch.watch("consumer", bad);
    } catch (error) {
      message = (error as Error).message;
    }
    assert(message.startsWith("A loop's longest turn must be positive"), `${bad}: ${message}`);
  }
});

Deno.test("longestConsumerTurnMs() is a claim's deadline plus the longer of the poll and the claim backoff's cap", () => {
  assertEquals(longestConsumerTurnMs({ pollIntervalMs: 100 }), STATEMENT_DEADLINE_MS + 30_000);
  assertEquals(longestConsumerTurnMs({ pollIntervalMs: 60_000 }), STATEMENT_DEADLINE_MS + 60_000);
});

Deno.test("longestLeaderTurnMs() covers an election retried once, the work's deadline and the outage backoff", () => {
  // Defaults (lease 30s, interval 5s): 2 × 10s election, 30s work, 30s backoff cap.
  assertEquals(longestLeaderTurnMs({ leaseMs: 30_000, intervalMs: 5_000 }), 80_000);
  // A short lease: statements capped at the lease, work at the statement deadline.
  assertEquals(longestLeaderTurnMs({ leaseMs: 2_000, intervalMs: 200 }), 4_000 + 10_000 + 2_000);
  // A long lease: the backoff is capped at 30 s, never below the interval.
  assertEquals(
    longestLeaderTurnMs({ leaseMs: 120_000, intervalMs: 45_000 }),
    20_000 + 120_000 + 45_000,
  );
  assertEquals(STUCK_AFTER_TURNS, 2);
});
