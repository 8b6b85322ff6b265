#!/usr/bin/env bash
# The docker-compose stack end to end, on a machine with Docker and its compose plugin:
#   1. brings docker-compose.yml up (writes a .env with random secrets when there is none),
#   2. waits until sluice is ready and has committed rows to MinIO,
#   3. registers the tables in Trino (`sluice trino-sql --server`: safe to repeat),
#   4. runs every query of the sql/ library through the Trino CLI,
#   5. counts the rows of one table version in Trino and in `sluice sql`: they must agree.
#
#   bash scripts/trino-smoke.sh                # leaves the stack running afterwards
#   SMOKE_DOWN=1 bash scripts/trino-smoke.sh   # removes the stack and its volumes at the end
#
# sluice's CI cannot run this (no Docker engine there); it runs the same Trino, metastore and
# catalog files without Docker in scripts/trino-e2e.sh, and tests/deploy.rs checks the wiring.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker compose version > /dev/null 2>&1; then
  echo "trino-smoke: needs Docker with the compose plugin (docker compose)" >&2
  exit 2
fi
if [ -n "${SMOKE_DOWN:-}" ]; then
  trap 'docker compose down --volumes --remove-orphans' EXIT
fi
if [ ! -f .env ]; then
  printf 'MINIO_ROOT_USER=sluice\nMINIO_ROOT_PASSWORD=%s\nPOSTGRES_PASSWORD=%s\n' \
    "$(openssl rand -hex 16)" "$(openssl rand -hex 16)" > .env
  echo "== wrote .env with random secrets"
fi

# Polls `$@` every 5 s until it succeeds, for at most $1 seconds.
within() {
  local limit=$1 waited=0
  shift
  until "$@" > /dev/null 2>&1; do
    if [ "$waited" -ge "$limit" ]; then
      echo "trino-smoke: gave up after ${limit}s waiting for: $*" >&2
      docker compose ps >&2
      return 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
}

sluice() {
  docker compose exec -T sluice sluice "$@" --config /etc/sluice/config/minio.toml
}
trino() {
  docker compose exec -T trino trino --catalog delta --schema sluice "$@"
}
has_rows() {
  [ "$(sluice sql --format csv -c 'SELECT count(*) AS n FROM enriched_posts' | tail -n 1)" -gt 0 ]
}

echo "== docker compose up (the first run builds sluice: tens of minutes)"
docker compose up -d --build
within 1800 curl -fsS http://localhost:9464/readyz
within 600 has_rows
within 600 trino --execute 'SELECT 1'

echo "== registering the tables in Trino"
# Through the coordinator: a second run of this script finds them registered and goes on
# (register_table in sql/trino/register.sql fails on a table that exists).
sluice trino-sql --server http://trino:8080
trino --execute 'SHOW TABLES'

echo "== the sql/ library through Trino"
for query in sql/*.sql; do
  echo "-- $query"
  trino --output-format ALIGNED --file "/sql/$(basename "$query")"
done

echo "== one version, two engines"
version=$(trino --output-format TSV --execute \
  'SELECT max(version) FROM "enriched_posts$history"')
in_trino=$(trino --output-format TSV --execute \
  "SELECT count(*) FROM enriched_posts FOR VERSION AS OF $version")
in_sluice=$(sluice sql --format csv --as-of-version "$version" \
  -c 'SELECT count(*) AS n FROM enriched_posts' | tail -n 1)
echo "version $version: Trino counts $in_trino rows, sluice sql $in_sluice"
if [ "$in_trino" != "$in_sluice" ]; then
  echo "trino-smoke: the engines disagree" >&2
  exit 1
fi
echo "== smoke test passed"
