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
  printf '{"topic":"ci","event_type":"job.finished","payload":{"job":%d,"lane":"lane-%d"}}\n' "$i" $((i % 4))
done | mesh mesh-publish --stdin

step "mesh-dispatch   (the built-in chain: tick, schedule, route, scale)"
mesh mesh-publish --topic scheduling --event-type task.enqueued --payload-json \
  '{"task_id": "task-18", "routing_options": [{"lane_id": "gpu-1", "node_id": "node-b", "score": 0.9},
    {"lane_id": "cpu-1", "node_id": "node-a", "score": 0.4}]}' >/dev/null
mesh mesh-publish --topic monitoring --event-type heartbeat.changed >/dev/null
mesh mesh-publish --topic scheduling --event-type lanes.ensure.summary \
  --payload-json '{"parallel_groups_at_limit": 1, "lane": "lane-1"}' >/dev/null
mesh mesh-dispatch

step mesh-log --match 'scheduling.#'
mesh mesh-log --match 'scheduling.#'

step "mesh-trace <the routing decision for task-18>"
route=$(mesh mesh-log --match 'routing.route.selected' --limit 1 --json \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["events"][0]["event_id"][:12])')
mesh mesh-trace "$route"

step mesh-log --match 'ci.job.*' --limit 3
mesh mesh-log --match 'ci.job.*' --limit 3

step "mesh-publish --payload-json '{\"password\": \"hunter2\"}'   (refused: exit 2, nothing written)"
mesh mesh-publish --topic ci --event-type oops --payload-json '{"password": "hunter2"}' \
  || echo "exit code $?"

step mesh-status
mesh mesh-status
