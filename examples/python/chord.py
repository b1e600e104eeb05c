"""shoal from Python with plain SQL (psycopg 3): enqueue a job, start a chord (a fan-out
and a callback) as an execution, and wait for the execution's result.

    pip install -r requirements.txt    (or Debian's python3-psycopg)
    DATABASE_URL=postgres://... python3 chord.py

A consumer that knows the tasks runs them, for example the example entry file:

    deno run -A examples/my_tasks.ts --role consumer --queues emails,reports

Ids are Postgres bigints: Python's int holds them exactly.
"""

import json
import os
import sys
import time

import psycopg
from psycopg.types.json import Jsonb


def main() -> int:
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("Set DATABASE_URL to shoal's database", file=sys.stderr)
        return 2
    wait_s = float(os.environ.get("SHOAL_WAIT_MS", "30000")) / 1000

    # autocommit: each statement commits at once. Inside your own transaction the job
    # commits (or rolls back) with your data instead.
    with psycopg.connect(url, autocommit=True) as conn:
        job_id = conn.execute(
            "select shoal.enqueue(%s::text, %s::text, %s::jsonb)",
            ("emails", "example.send_welcome", Jsonb({"email": "ada@example.com", "name": "Ada"})),
        ).fetchone()[0]

        # A chord: the built-in shoal.chord task fans out the children; the callback gets
        # their results in child order, and its return value becomes the execution's result.
        texts = ["the quick brown fox", "jumps over", "the lazy dog"]
        chord = {
            "children": [{"task": "example.count_words", "payload": {"text": t}} for t in texts],
            "callback": {"task": "example.sum_counts"},
        }
        execution_id = conn.execute(
            "select shoal.start_execution(%s::text, %s::text, %s::jsonb)",
            ("reports", "shoal.chord", Jsonb(chord)),
        ).fetchone()[0]

        # Poll the execution until it ends (completed, failed or cancelled).
        deadline = time.monotonic() + wait_s
        while True:
            status, result, error = conn.execute(
                "select status, result, error from shoal.executions where id = %s::bigint",
                (execution_id,),
            ).fetchone()
            if status not in ("pending", "running"):
                break
            if time.monotonic() > deadline:
                print(f"Execution {execution_id} still {status} after {wait_s} s", file=sys.stderr)
                return 1
            time.sleep(0.2)

    print(json.dumps({
        "job_id": job_id,
        "execution_id": execution_id,
        "status": status,
        "result": result,
        "error": error,
    }))
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
