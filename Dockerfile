# syntax=docker/dockerfile:1
# shoal as one compiled binary on a minimal runtime image (no shell, no package manager).
#   docker build -t shoal .
#   docker run --rm -e DATABASE_URL=postgres://... shoal migrate
#   docker run --rm -e DATABASE_URL=postgres://... shoal --role consumer --queues emails
# Your own tasks compiled in: name your entry file, and the file or directory holding it
# and what it imports beside lib/ (allowed in .dockerignore):
#   docker build --build-arg ENTRY=examples/my_tasks.ts --build-arg CODE=examples -t my-shoal .
# Where the builder cannot download the Deno runtime that `deno compile` embeds, give it a
# directory holding `denort` (the same Deno version): --build-context denort=/path/to/dir
# tests/deploy_test.ts checks this file against deno.json, .dockerignore and the manifests,
# and runs its build steps (bundling instead of compiling) on examples/my_tasks.ts.

# Empty unless --build-context denort=DIR replaces it.
FROM scratch AS denort

FROM denoland/deno:2.9.6 AS builder
WORKDIR /app
# Dependencies first: this layer is reused until deno.json or deno.lock changes. --frozen
# fails the build rather than resolve a version the lock file does not pin.
COPY deno.json deno.lock ./
RUN deno install --frozen
# Only what the binary is built from (the migrations are embedded through lib/migrate.ts).
COPY main.ts ./
COPY lib/ lib/
COPY sql/ sql/
# The entry file to compile and the file or directory holding the code it needs beyond
# lib/; both main.ts for the stock binary (copied above already).
ARG ENTRY=main.ts
ARG CODE=main.ts
COPY ${CODE} ${CODE}
# Exactly `deno task compile` for the default entry: the flags and the output path live in
# deno.json's compile:entry task, which `deno task compile` runs with main.ts.
RUN --mount=type=bind,from=denort,target=/denort \
    if [ -f /denort/denort ]; then export DENORT_BIN=/denort/denort; fi; \
    deno task compile:entry "${ENTRY}"

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /app/dist/shoal /usr/local/bin/shoal
# The distroless nonroot user, by number, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# Where `--http` listens when given (it is off by default).
EXPOSE 9464
# SIGTERM reaches shoal directly (no shell in between): it drains and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--role", "consumer"]
