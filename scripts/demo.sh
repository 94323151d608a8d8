#!/usr/bin/env bash
# A throwaway fleet: three nodes converge through a local bare git repository.
# Usage: bash scripts/demo.sh   (needs `orxaq-autonomy` and git on PATH)
set -euo pipefail

demo=$(mktemp -d "${TMPDIR:-/tmp}/orxaq-demo.XXXXXX")
trap 'rm -rf "$demo"' EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ orxaq-autonomy --root %s %s\033[0m\n' "$1" "${*:2}"; \
        orxaq-autonomy --root "$demo/$1" "${@:2}"; }
quiet() { git -c init.defaultBranch=main "$@" >/dev/null 2>&1; }

say "a bare repository stands in for GitHub; three nodes clone it"
quiet init --bare "$demo/remote.git"
quiet clone "$demo/remote.git" "$demo/seed"
git -C "$demo/seed" -c user.name=demo -c user.email=demo@example.invalid \
  commit -q --allow-empty -m "coordination repository"
quiet -C "$demo/seed" push origin HEAD:main
for node in node-a node-b node-c; do
  quiet clone -b main "$demo/remote.git" "$demo/$node"
  git -C "$demo/$node" config user.name "$node"
  git -C "$demo/$node" config user.email "$node@example.invalid"
done
run node-a mesh-init --node-id node-a --capability routing
run node-b mesh-init --node-id node-b --capability gpu
run node-c mesh-init --node-id node-c

say "node-b announces itself; node-a enqueues a task that needs a GPU"
run node-b mesh-sync
run node-a mesh-publish --topic scheduling --event-type task.enqueued \
  --payload-json '{"task_id": "task-17", "required_capabilities": ["gpu"]}' \
  --correlation-id deploy-1
run node-a mesh-publish --topic ci --event-type run.finished --idempotency-key ci-run-991
run node-a mesh-publish --topic ci --event-type run.finished --idempotency-key ci-run-991 --json

say "node-b reports a heartbeat; node-c publishes 1,000 events in one batch (all or none)"
run node-b mesh-publish --topic monitoring --event-type heartbeat.changed
for i in $(seq 1 1000); do
  printf '{"topic":"ci","event_type":"job.finished","payload":{"job":%d}}\n' "$i"
done | run node-c mesh-publish --stdin

say "everyone syncs twice: pull, import, dispatch, export, commit, push"
for round in 1 2; do
  for node in node-a node-b node-c; do run "$node" mesh-sync; done
done

say "the three logs now hold the same events"
for node in node-a node-b node-c; do
  printf '%s: ' "$node"
  orxaq-autonomy --root "$demo/$node" mesh-status --json \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["log"]["events"], "events,", s["dispatch"]["lag_events"], "to dispatch")'
done

say "where did task-17 go? (routed by capability to node-b; handled once, by node-a)"
run node-c mesh-log --match 'routing.#'
route=$(orxaq-autonomy --root "$demo/node-c" mesh-log --match 'routing.route.*' --limit 1 --json \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["events"][0]["event_id"][:12])')
run node-c mesh-trace "$route"

say "a CI job verifies the ledger on a fresh clone (no mesh-init needed)"
quiet clone -b main "$demo/remote.git" "$demo/ci"
run ci mesh-verify
git -C "$demo/ci" log -4 --format='  %h %s'

say "bad input is refused with one line and exit 2; nothing is written"
run node-a mesh-publish --topic ci --event-type oops --payload-json '{"password": "hunter2"}' \
  || echo "exit code $?"
