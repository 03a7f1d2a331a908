#!/usr/bin/env bash
# The compose stack for real, on one machine that cannot pull public images and allows no bridge network
# (docker/README.md, "Checking the stack"): starts dockerd if none runs, makes the local bases from Debian's
# packages (debootstrap + docker import), builds vaemo:cpu on the Python base, brings up docker/compose.yaml
# with docker/compose.offline.yaml, runs the demo pipeline through the worker's deployment (Prefect's REST API),
# checks the parent and child runs and their artifacts in the MLflow server (its REST API), then removes every
# container, volume and network. The first step that fails ends it with one line `docker-check: FAILED at ...`.
# Ports: VAEMO_PREFECT_PORT (14200), VAEMO_MLFLOW_PORT (15000), VAEMO_POSTGRES_PORT (15432). Screenshots of
# both UIs (with Chromium) go to VAEMO_CHECK_SCREENSHOTS. `--gpu-image` also builds vaemo:gpu on the same base and
# runs its `--help` (no GPU needed).
set -euo pipefail
case "${1:-}" in "" | --gpu-image) ;; *) echo "usage: docker-check.sh [--gpu-image]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
export VAEMO_PREFECT_PORT=${VAEMO_PREFECT_PORT:-14200} VAEMO_MLFLOW_PORT=${VAEMO_MLFLOW_PORT:-15000}
export VAEMO_POSTGRES_PORT=${VAEMO_POSTGRES_PORT:-15432} VAEMO_DATA=${VAEMO_DATA:-$PWD/docker/data}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d)
SHOTS=${VAEMO_CHECK_SCREENSHOTS:-$WORK/screenshots}
LOG=$WORK/log
compose=(docker compose -p vaemo-check -f docker/compose.yaml -f docker/compose.offline.yaml)
step=start

fail() { reported=1; echo "docker-check: FAILED at step '$step': $1 (log: $LOG)" >&2; exit 1; }
run() { "$@" >>"$LOG" 2>&1 || fail "$* exited $?"; }
teardown() {
  "${compose[@]}" down --volumes --remove-orphans >>"$LOG" 2>&1 || true
}
# Any exit tears the stack down; an unexpected one (set -e) still names its step.
trap 'rc=$?; teardown; [ $rc = 0 ] || [ -n "${reported:-}" ] || echo "docker-check: FAILED at step '"'"'$step'"'"' (log: $LOG)" >&2' EXIT

step="docker engine"
command -v docker >/dev/null || fail "no docker client (Debian: apt-get install docker.io)"
docker compose version >/dev/null 2>&1 || fail "no Compose v2 plugin (docker compose)"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || fail "no dockerd (Debian: apt-get install docker.io)"
  nohup dockerd --bridge=none >"$WORK/dockerd.log" 2>&1 &
  for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not start ($WORK/dockerd.log)"
fi

base() {  # base NAME PACKAGES... : a Debian 12 image from debootstrap, once
  local name=$1; shift
  docker image inspect "vaemo-base:$name" >/dev/null 2>&1 && return
  command -v debootstrap >/dev/null || fail "no debootstrap (apt-get install debootstrap)"
  local root=$WORK/rootfs-$name
  run debootstrap --variant=minbase --include="$(IFS=,; echo "$*")" bookworm "$root" "$MIRROR"
  echo "deb $MIRROR bookworm main" > "$root/etc/apt/sources.list"
  # The bases trust what this host trusts: behind a TLS-inspecting proxy, pip in the build needs its CA.
  if [ -d "$root/usr/local/share/ca-certificates" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    run chroot "$root" update-ca-certificates
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  "base_$name" "$root"
  tar -C "$root" -c . | docker import "${changes[@]}" - "vaemo-base:$name" >>"$LOG" 2>&1 || fail "docker import"
  rm -rf "$root"
}
# Python 3.11 in a venv that is first on PATH, as `python` and `pip` are in python:3.11-slim (Debian's own
# python refuses pip installs outside a venv).
base_python() {
  run chroot "$1" python3.11 -m venv /usr/local/python
  changes=(--change "ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
           --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
}
base_postgres() {
  install -m 755 docker/vaemo-postgres.sh "$1/usr/local/bin/vaemo-postgres"
  mkdir -p "$1/var/lib/postgresql/data" && chroot "$1" chown postgres:postgres /var/lib/postgresql/data
  changes=(--change "ENV POSTGRES_USER=postgres POSTGRES_DB=postgres")
}
step="local base images"
# debootstrap does not resolve every dependency of --include: venv's are named.
base python python3.11 python3.11-venv python3-distutils python3-pip-whl python3-setuptools-whl ca-certificates
base postgres postgresql-15

step="build vaemo:cpu"
run docker build --network host --build-arg BASE_IMAGE=vaemo-base:python -f docker/Dockerfile.cpu -t vaemo:cpu .

if [ "${1:-}" = --gpu-image ]; then
  step="build vaemo:gpu"
  run docker build --network host --build-arg BASE_IMAGE=vaemo-base:python -f docker/Dockerfile.gpu -t vaemo:gpu .
  run docker run --rm --network host vaemo:gpu --help
fi

step="compose up"
mkdir -p "$VAEMO_DATA"
run "${compose[@]}" up -d --no-build --wait --wait-timeout 300

step="demo inputs"
run "${compose[@]}" exec -T worker vaemo dev demo-inputs

step="demo run through the deployment"
PREFECT=http://127.0.0.1:$VAEMO_PREFECT_PORT/api
MLFLOW=http://127.0.0.1:$VAEMO_MLFLOW_PORT
for _ in $(seq 60); do
  deployment=$(curl -sf "$PREFECT/deployments/name/vaemo_pipeline/demo" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' 2>/dev/null) && break
  sleep 5
done
[ -n "${deployment:-}" ] || fail "the worker never served deployment vaemo_pipeline/demo"
flow_run=$(curl -sf -X POST -H 'Content-Type: application/json' -d '{}' "$PREFECT/deployments/$deployment/create_flow_run" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') || fail "create_flow_run refused"
state=
for _ in $(seq 180); do
  state=$(curl -sf "$PREFECT/flow_runs/$flow_run" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state_type"])')
  case "$state" in COMPLETED) break ;; FAILED|CRASHED|CANCELLED) fail "flow run $flow_run ended $state" ;; esac
  sleep 5
done
[ "$state" = COMPLETED ] || fail "flow run $flow_run still $state after 15 minutes"

step="runs and artifacts in MLflow"
python3 - "$MLFLOW" "$WORK/parent-run" <<'PY' >>"$LOG" 2>&1 || fail "MLflow has no complete parent/child runs with artifacts (see log)"
import json, sys, urllib.request
base = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))
experiments = call("/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [e["experiment_id"] for e in experiments],
                                             "max_results": 1000}).get("runs", [])
parents = [r for r in runs if "mlflow.parentRunId" not in {t["key"] for t in r["data"].get("tags", [])}]
children = [r for r in runs if r not in parents]
assert parents and children, f"{len(parents)} parent and {len(children)} child runs"
for run in runs:
    assert run["info"]["status"] == "FINISHED", run["info"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]["artifact_uri"]
stored = [r for r in runs if call(f"/api/2.0/mlflow-artifacts/artifacts?path={r['info']['experiment_id']}/{r['info']['run_id']}/artifacts").get("files")]
assert stored, "no run has artifacts in the server's store"
with open(sys.argv[2], "w") as out:  # for the screenshots
    print(parents[0]["info"]["experiment_id"], parents[0]["info"]["run_id"], file=out)
print(f"docker-check: {len(parents)} parent and {len(children)} child runs, {len(stored)} with artifacts on the server")
PY

step="both UIs served"
curl -sf "http://127.0.0.1:$VAEMO_PREFECT_PORT/" | grep -qi "<html" || fail "the Prefect server serves no UI page"
curl -sf "$MLFLOW/" | grep -qi "<html" || fail "the MLflow server serves no UI page"

step="screenshots"
# What a user sees in both UIs, served by the containers: looked at by hand (docker/README.md).
if command -v chromium >/dev/null; then
  mkdir -p "$SHOTS"
  read -r experiment parent_run < "$WORK/parent-run"
  shot() {
    run timeout 180 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
      --disable-component-update --disable-sync --no-first-run --user-data-dir="$WORK/chromium" \
      --hide-scrollbars --window-size=1400,900 --virtual-time-budget=20000 --screenshot="$SHOTS/$1.png" "$2"
  }
  shot prefect-flow-run "http://127.0.0.1:$VAEMO_PREFECT_PORT/runs/flow-run/$flow_run"
  shot prefect-deployments "http://127.0.0.1:$VAEMO_PREFECT_PORT/deployments"
  shot mlflow-experiment "$MLFLOW/#/experiments/$experiment"
  shot mlflow-parent-run "$MLFLOW/#/experiments/$experiment/runs/$parent_run"
  echo "docker-check: screenshots in $SHOTS"
else
  echo "docker-check: no chromium on PATH, no screenshots"
fi

step="teardown"
teardown
left=$(docker ps -aq --filter label=com.docker.compose.project=vaemo-check; docker volume ls -q --filter label=com.docker.compose.project=vaemo-check; docker network ls -q --filter label=com.docker.compose.project=vaemo-check)
[ -z "$left" ] || fail "left behind: $left"
trap - EXIT
echo "docker-check: OK in ${SECONDS}s; images: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^vaemo' | tr '\n' ';')"
