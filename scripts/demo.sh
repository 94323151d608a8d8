#!/usr/bin/env bash
# A throwaway fleet: three nodes converge through a local bare git repository.
# Usage: bash scripts/demo.sh   (needs `orxaq-autonomy` and git on PATH)
set -euo pipefail

demo=$(mktemp -d "${TMPDIR:-/tmp}/orxaq-demo.XXXXXX")
server=""
natsd=""; listeners=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; [ -n "$listeners" ] && kill $listeners 2>/dev/null; [ -n "$natsd" ] && kill "$natsd" 2>/dev/null; rm -rf "$demo"' EXIT
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
# node-b offers a lane that runs the tasks routed to it (docs/tasks.md)
cat >>"$demo/node-b/state/event_mesh/config.toml" <<'TOML'

[[lanes]]
id = "gpu-1"
capabilities = ["gpu"]
run = 'echo "rendering $ORXAQ_TASK_ID on $ORXAQ_NODE_ID, lane $ORXAQ_LANE_ID"'
TOML

say "node-b announces itself; node-a learns of it, then enqueues a task that needs a GPU"
run node-b mesh-sync
run node-a mesh-sync
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

say "node-a opens its HTTP front door (mesh-serve; the token comes from the environment)"
export ORXAQ_AUTONOMY_SERVE_TOKEN
ORXAQ_AUTONOMY_SERVE_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
orxaq-autonomy --root "$demo/node-a" mesh-serve --port 0 --json >"$demo/serve.json" &
server=$!
for _ in $(seq 100); do [ -s "$demo/serve.json" ] && break; sleep 0.1; done
python3 - "$demo/serve.json" <<'PY'
import json, os, sys, urllib.error, urllib.request

url = json.load(open(sys.argv[1]))["url"]
auth = {"Authorization": "Bearer " + os.environ["ORXAQ_AUTONOMY_SERVE_TOKEN"]}

def call(method, path, body=None, headers=auth):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()

def show(method, path, body=None, headers=auth):
    status, text = call(method, path, body, headers)
    print(f"  {method} {path} -> {status} {text[:150]}{'...' if len(text) > 150 else ''}")

print(f"  listening on {url}")
show("POST", "/events", {"type": "ci.result", "source": "jenkins", "payload": {"ok": True}})
cloud = {"specversion": "1.0", "id": "run-7", "source": "/ci/gha", "type": "ci.build.finished",
         "subject": "repo-1", "data": {"ok": False}}
show("POST", "/events", cloud)
show("POST", "/events", cloud)  # same CloudEvents source and id: a duplicate
show("POST", "/events", {"topic": "ci", "event_type": "x", "payload": {"token": "hunter2"}})
show("POST", "/events", {"type": "ci.result"}, headers={})
batch = [{"topic": "ci", "event_type": "job.finished", "payload": {"job": i}} for i in range(100)]
status, text = call("POST", "/events/batch", batch)
print(f"  POST /events/batch (100 events) -> {status} published {json.loads(text)['published']}")
show("GET", "/events?match=ci.build.%23&limit=1")
status, text = call("GET", "/metrics")
for line in text.splitlines():
    if line.startswith(("orxaq_gateway_events_published_total", "orxaq_log_events ")):
        print("  /metrics:", line)
PY
kill -TERM "$server" && wait "$server" && server=""

say "everyone syncs twice: pull, import, dispatch, export, commit, push"
for round in 1 2; do
  for node in node-a node-b node-c; do run "$node" mesh-sync; done
done

say "task-17 ran on node-b (lane gpu-1); node-a sees its outcome after a sync"
run node-b mesh-tasks list
run node-a mesh-sync
run node-a mesh-log --match 'scheduling.task.#'

say "real time: a NATS JetStream server (nats-server from the nats extra); no git sync"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nats-server -js -a 127.0.0.1 -p "$port" -sd "$demo/nats-store" >"$demo/nats.log" 2>&1 &
natsd=$!
for _ in $(seq 100); do grep -q "Server is ready" "$demo/nats.log" && break; sleep 0.1; done
for node in node-a node-b; do
  printf '\n[nats]\nurl = "nats://127.0.0.1:%s"\n' "$port" >>"$demo/$node/state/event_mesh/config.toml"
  orxaq-autonomy --root "$demo/$node" mesh-listen --for 60 --json >"$demo/listen-$node.out" 2>&1 &
  listeners="$listeners $!"
done
for node in node-a node-b; do
  for _ in $(seq 100); do grep -q '"connected"' "$demo/listen-$node.out" && break; sleep 0.1; done
done
start=$(date +%s%N)
id=$(orxaq-autonomy --root "$demo/node-a" mesh-publish --topic alerts --event-type disk.full \
  --payload-json '{"host": "node-a", "used": 0.97}' --json \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["event_id"])')
for _ in $(seq 500); do
  orxaq-autonomy --root "$demo/node-b" mesh-log --match 'alerts.#' --json | grep -q "$id" && break
  sleep 0.01
done
echo "node-a published ${id:0:16}…; node-b had it $(( ($(date +%s%N) - start) / 1000000 )) ms later (including two CLI start-ups)"
run node-b mesh-log --match 'alerts.#'
kill $listeners && wait $listeners 2>/dev/null || true
listeners=""
kill "$natsd" && wait "$natsd" 2>/dev/null || true
natsd=""

say "git converges the same ids: node-b's import finds the alert already there"
run node-a mesh-sync
orxaq-autonomy --root "$demo/node-b" mesh-sync --json | python3 -c \
  'import json, sys; r=json.load(sys.stdin); print("  node-b: git brought", r["imported"], "new events; the stream had brought them first")'
run node-c mesh-sync

say "the three logs now hold the same events"
for node in node-a node-b node-c; do
  printf '%s: ' "$node"
  orxaq-autonomy --root "$demo/$node" mesh-status --json \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["log"]["events"], "events,", s["dispatch"]["lag_events"], "to dispatch")'
done

say "where did task-17 go? (routed by node-a, by capability, to node-b; run there once)"
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

say "anyone who can push may be hostile: a pushed node config and handler are never taken"
quiet clone -b main "$demo/remote.git" "$demo/mallory"
mkdir -p "$demo/mallory/state/event_mesh"
printf 'handlers = ["pwn.py"]\n' >"$demo/mallory/state/event_mesh/config.toml"
printf 'open("/tmp/pwned", "w")\n' >"$demo/mallory/pwn.py"
git -C "$demo/mallory" add -f state/event_mesh/config.toml pwn.py
git -C "$demo/mallory" -c user.name=mallory -c user.email=m@example.invalid \
  commit -q -m "helpful config"
quiet -C "$demo/mallory" push origin HEAD:main
run node-a mesh-publish --topic ci --event-type run.finished --payload-json '{"run": 992}'
run node-a mesh-sync || echo "exit code $? (node-a's own config is untouched; the rest synced)"
grep -q pwn "$demo/node-a/state/event_mesh/config.toml" \
  || echo "node-a's config.toml is still its own; pwn.py never ran"
