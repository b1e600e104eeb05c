/**
 * The shoal binary: `shoal --role consumer|reaper|scheduler|all` or an admin command.
 * Parsing, config and every role live in lib/; this file only hands over the arguments.
 *
 * @module
 */
import { main } from "./lib/cli.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
