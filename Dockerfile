# syntax=docker/dockerfile:1
# shoal as one compiled binary on a minimal runtime image (no shell, no package manager).
#   docker build -t shoal .
#   docker run --rm -e DATABASE_URL=postgres://... shoal migrate
#   docker run --rm -e DATABASE_URL=postgres://... shoal --role consumer --queues emails
# tests/deploy_test.ts checks this file against deno.json, .dockerignore and the manifests.

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
# Exactly `deno task compile`: the permissions and the output path live in deno.json.
RUN deno task compile

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
