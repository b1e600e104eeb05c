# syntax=docker/dockerfile:1
# shoal as one compiled binary on a minimal runtime image.
#   docker build -t shoal .
#   docker run --rm -e DATABASE_URL=postgres://... shoal migrate
#   docker run --rm -e DATABASE_URL=postgres://... shoal --role consumer --queues emails

FROM denoland/deno:2.9.6 AS builder
WORKDIR /app
# Dependencies first: this layer is reused until deno.json or deno.lock changes.
COPY deno.json deno.lock ./
RUN deno install
COPY . .
# The same command as `deno task compile`: the permissions and `--include sql/` live there.
RUN deno task compile

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /app/dist/shoal /usr/local/bin/shoal
USER nonroot
# SIGTERM reaches shoal directly (no shell in between): it drains and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--role", "consumer"]
