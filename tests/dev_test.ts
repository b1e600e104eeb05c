import { assert, assertEquals } from "./assert.ts";
import { enqueueLargeTable, freePort, runShoal, spawnShoal, testDb, waitFor } from "./helpers.ts";

/** Fast loops so the demo (52 jobs, one delayed 3 s, one retried then dead) ends quickly. */
const FAST = ["--poll-interval", "100ms", "--shutdown-grace", "1s"];

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function canConnect(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.ConnectionRefused) return false;
    throw error;
  }
}

Deno.test("shoal dev without DATABASE_URL runs the demo on its own Postgres and stops it on Ctrl-C", async () => {
  const dir = await Deno.makeTempDir({ prefix: "shoal-dev-test-" });
  await Deno.chmod(dir, 0o755); // as root, Postgres runs as the postgres user: let it in
  try {
    // The test process carries DATABASE_URL (tests/run.ts sets it) and child processes
    // inherit the environment: an empty value is how a user unsets it for shoal too.
    await using dev = spawnShoal(["dev", "--dir", dir, ...FAST], { env: { DATABASE_URL: "" } });
    const port = Number(
      (await waitFor(
        "Postgres to start",
        () => /Postgres is up on 127\.0\.0\.1:(\d+)/.exec(dev.output()),
        60_000,
      ))[1],
    );
    const done = await waitFor(
      "the demo to finish",
      () => /demo: done: nothing left to run, (\d+) dead-lettered/.exec(dev.output()),
      60_000,
    );
    assertEquals(done[1], "1", dev.output());
    assert.ok(await exists(`${dir}/pg/data/postmaster.pid`), "Postgres should be running");

    dev.kill("SIGINT");
    const { code, output } = await dev.exited();
    assertEquals(code, 0, output);
    assert.ok(output.includes(`Stopped Postgres`), output);
    assertEquals(await exists(`${dir}/pg/data/postmaster.pid`), false);
    assertEquals(await canConnect(port), false);
    assertEquals(await exists(`${dir}/pg/data/PG_VERSION`), true, "the data is kept");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shoal dev with DATABASE_URL uses that database and starts no Postgres", async () => {
  await using db = await testDb();
  const dir = await Deno.makeTempDir({ prefix: "shoal-dev-test-" });
  try {
    await using dev = spawnShoal(["dev", "--dir", dir, ...FAST], { url: db.url });
    await waitFor(
      "the demo to finish",
      () => dev.output().includes("demo: done: nothing left to run, 1 dead-lettered"),
      60_000,
    );
    const [dead] = await db.sql<{ count: string }[]>`
      select count(*)::text as count from shoal.dead_jobs where queue = 'demo'`;
    assertEquals(dead?.count, "1");
    dev.kill("SIGINT");
    const { code, output } = await dev.exited();
    assertEquals(code, 0, output);
    assert.ok(output.includes("Using the database at"), output);
    assertEquals(await exists(`${dir}/pg`), false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shoal dev --http --metrics-exact serves /readyz, /metrics and the dashboard while the demo runs", async () => {
  await using db = await testDb();
  const dir = await Deno.makeTempDir({ prefix: "shoal-dev-test-" });
  const port = freePort();
  try {
    // A queue too large to count by default (12,000 jobs): --metrics-exact counts it.
    await enqueueLargeTable(db.sql);
    const http = ["--http", `127.0.0.1:${port}`, "--metrics-exact"];
    await using dev = spawnShoal(["dev", "--dir", dir, ...FAST, ...http], { url: db.url });
    const get = async (path: string) => {
      const response = await fetch(`http://127.0.0.1:${port}${path}`);
      return { status: response.status, text: await response.text() };
    };
    await waitFor(
      "/readyz to answer 200",
      async () => (await get("/readyz")).status === 200,
      30_000,
    );
    const metrics = await waitFor("the demo's jobs in /metrics", async () => {
      const { text } = await get("/metrics");
      return text.includes('shoal_jobs_completed_total{queue="demo"') ? text : null;
    }, 30_000);
    assert.ok(metrics.includes("# TYPE"), metrics);
    assert.ok(metrics.includes('shoal_queue_counts_exact{queue="bulk"} 1'), metrics);
    assert.ok(metrics.includes('shoal_queue_depth{queue="bulk"} 12000'), metrics);
    // The dashboard beside them, on the dev database: the demo's queue is on the overview.
    const overview = await get("/");
    assertEquals(overview.status, 200, overview.text);
    assert.ok(overview.text.includes(">demo</a>"), overview.text);
    dev.kill("SIGINT");
    const { code, output } = await dev.exited();
    assertEquals(code, 0, output);
    assert.ok(
      output.includes("Serving /healthz, /readyz and /metrics, and the dashboard at /,"),
      output,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shoal dev's progress line counts this run's dead jobs: a purge from elsewhere never makes it negative", async () => {
  await using db = await testDb();
  // A dead job from an earlier run: the line leaves it out, and a purge takes it away.
  await db.sql`
    insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
      max_attempts, errors, reason, created_at)
    values (900000001, 'demo', 'shoal.fail', '{}', 0, '', 1, 1, '[]', 'an earlier run', now())`;
  const dir = await Deno.makeTempDir({ prefix: "shoal-dev-test-" });
  try {
    await using dev = spawnShoal(["dev", "--dir", dir, ...FAST], { url: db.url });
    await waitFor(
      "the demo to finish",
      () => dev.output().includes("demo: done: nothing left to run, 1 dead-lettered"),
      60_000,
    );
    await using purge = spawnShoal(["dead", "purge", "--all"], { url: db.url });
    const purged = await purge.exited();
    assertEquals([purged.code, purged.output.trim()], [0, "Purged 2 dead jobs"]);
    await waitFor(
      "the line to count the purge",
      () => dev.output().includes("demo: done: nothing left to run, 0 dead-lettered"),
      10_000,
    );
    dev.kill("SIGINT");
    const { code, output } = await dev.exited();
    assertEquals(code, 0, output);
    assert.ok(!/-\d+ dead/.test(output), output);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shoal dev keeps its port across runs, and says so when another program took it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "shoal-dev-test-" });
  await Deno.chmod(dir, 0o755); // as root, Postgres runs as the postgres user: let it in
  /** One `shoal dev` run until its demo is enqueued: its output and DATABASE_URL. */
  const run = async (during?: (url: string) => Promise<void>) => {
    await using dev = spawnShoal(["dev", "--dir", dir, ...FAST], { env: { DATABASE_URL: "" } });
    const url = (await waitFor(
      "the dev DATABASE_URL",
      () => /^ {2}DATABASE_URL=(\S+)$/m.exec(dev.output()),
      60_000,
    ))[1]!;
    await waitFor("the demo", () => dev.output().includes("Enqueued"), 60_000);
    await during?.(url);
    dev.kill("SIGINT");
    const { code, output } = await dev.exited();
    assertEquals(code, 0, output);
    return { url, output };
  };
  try {
    const first = await run();
    const second = await run(async (url) => {
      // The URL the first run printed works in the second.
      const status = await runShoal(["status", "--json"], { url: first.url });
      assertEquals([url, status.code], [first.url, 0], status.stderr);
    });
    assert.ok(!second.output.includes("is taken"), second.output);

    // Another program holds the port now: one line says so, and the new port is kept.
    const port = Number(new URL(first.url).port);
    using _squatter = Deno.listen({ hostname: "127.0.0.1", port });
    const third = await run();
    const moved = Number(new URL(third.url).port);
    assert.ok(moved !== port, third.output);
    const said = third.output.split("\n").filter((line) => line.includes("is taken"));
    assertEquals(said, [
      `Port ${port} of the last run is taken by another program: Postgres listens on ${moved} now, and its DATABASE_URL changed`,
    ]);
    assertEquals((await Deno.readTextFile(`${dir}/pg/port`)).trim(), String(moved));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
