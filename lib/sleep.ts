/**
 * Waiting that an abort signal (shutdown) or a wake-up (a NOTIFY, a freed slot) cuts
 * short, and that never leaves a timer or listener behind.
 *
 * @module
 */

/** Sleep for `ms`, waking early on `stop` or on `wake()`. */
export class Sleeper {
  #wake: (() => void) | null = null;
  #pending = false;

  wake(): void {
    if (this.#wake) this.#wake();
    else this.#pending = true;
  }

  sleep(ms: number, stop: AbortSignal): Promise<void> {
    if (this.#pending || stop.aborted) {
      this.#pending = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        stop.removeEventListener("abort", done);
        this.#wake = null;
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, ms));
      stop.addEventListener("abort", done, { once: true });
      this.#wake = done;
    });
  }
}

/** Resolve after `ms`, or at once when `signal` aborts. */
export function delay(ms: number, signal: AbortSignal): Promise<void> {
  return new Sleeper().sleep(ms, signal);
}
