#!/usr/bin/env bash
# A throwaway tour: one node publishes, batches, queries and reports its status.
# Usage: bash scripts/demo.sh   (needs `orxaq-autonomy` on PATH)
set -euo pipefail

demo=$(mktemp -d "${TMPDIR:-/tmp}/orxaq-demo.XXXXXX")
trap 'rm -rf "$demo"' EXIT
mesh() { orxaq-autonomy --root "$demo/node-a" "$@"; }
step() { printf '\n\033[1m$ orxaq-autonomy %s\033[0m\n' "$*"; }

step mesh-init --node-id node-a --capability routing
mesh mesh-init --node-id node-a --capability routing

step mesh-publish --topic scheduling --event-type task.enqueued --payload-json '{"task_id": "task-17"}'
mesh mesh-publish --topic scheduling --event-type task.enqueued \
  --payload-json '{"task_id": "task-17"}' --correlation-id deploy-1

step "mesh-publish ... --idempotency-key ci-run-991   (twice: the second is a duplicate)"
mesh mesh-publish --topic ci --event-type run.finished --idempotency-key ci-run-991 --json
mesh mesh-publish --topic ci --event-type run.finished --idempotency-key ci-run-991 --json

step "mesh-publish --stdin   (1,000 events, all or none)"
for i in $(seq 1 1000); do
  printf '{"topic":"monitoring","event_type":"heartbeat.changed","payload":{"lane":"lane-%d"}}\n' $((i % 4))
done | mesh mesh-publish --stdin

step mesh-log --match 'scheduling.#'
mesh mesh-log --match 'scheduling.#'

step mesh-log --match '*.heartbeat.*' --limit 3
mesh mesh-log --match '*.heartbeat.*' --limit 3

step "mesh-publish --payload-json '{\"password\": \"hunter2\"}'   (refused: exit 2, nothing written)"
mesh mesh-publish --topic ci --event-type oops --payload-json '{"password": "hunter2"}' \
  || echo "exit code $?"

step mesh-status
mesh mesh-status
