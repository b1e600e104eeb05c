/** SQL-injection strings shared by the bad-input fault tests. */

/** Strings that would do harm if any of shoal's SQL were built by joining text. */
export const INJECTIONS = [
  "x'); drop table canary; --",
  "'; delete from shoal.jobs; --",
  '"; drop table canary; --',
  "$$; drop table canary; $$",
  "\\'; drop table canary; --",
  "1; drop table canary",
  "' or '1'='1",
];
