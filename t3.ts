import { startLocalPg } from "./lib/local_pg.ts";
const pg = await startLocalPg({ fast: true });
console.log(pg.url);
await Deno.writeTextFile("/tmp/pgurl", pg.url + "\n" + pg.dir);
await new Promise(() => {});
