#!/usr/bin/env bash
# Build cvxtune's image and check the docker-compose deployment end to end, with one command:
#   1. build the image (timed) and report its size;
#   2. start api, worker, redis and postgres; wait until all four are healthy and /readyz is ok;
#   3. create a key in the api container, upload a Fashion-MNIST ImageFolder zip (3 classes),
#      fine-tune a head on tf_efficientnet_lite0, wait for it, predict one image, and show that
#      the job's row and the queue's keys live in the containers' PostgreSQL and Redis;
#   4. `restart`, then `down` + `up` (volumes kept): the dataset, job and head are still there and
#      predict gives the same answer;
#   5. (KILL_TEST=1) interrupt the worker in the middle of a job, bring it back, and wait for the
#      job to finish: a) `stop` (SIGTERM: warm shutdown); b) `docker kill` (SIGKILL), with a
#      short visibility timeout so that the unacknowledged task is delivered again soon.
# Then `down -v` (volumes removed; the image is kept) unless --keep is given.
#
# Needs a Docker daemon on which every container uses host networking, docker-compose 1.29,
# curl, jq, PyYAML, and /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist).
# The deployment runs with deploy/compose.hostnet.yml: loopback only, on the ports below.
#
#   deploy/compose-check.sh [--keep] [--no-build]
# Environment:
#   WHEELHOUSE=DIR        install torch from the wheels in DIR instead of PyPI: filled once with
#                         `pip download` (a host whose pip has the wheels on disk copies them),
#                         served on 127.0.0.1:$WHEELHOUSE_PORT (8793) only while the image builds
#   TORCH_INDEX_URL=URL   passed to the build (e.g. https://download.pytorch.org/whl/cpu)
#   HOSTNET_API_PORT, HOSTNET_REDIS_PORT, HOSTNET_PG_PORT   (8791, 6391, 5441)
#   PROJECT=NAME          compose project name (cvxtune-check)
#   KILL_TEST=0|1         step 5 (1)
#   KILL_VISIBILITY_S=N   the worker's visibility timeout in step 5b (120): a killed worker's task
#                         is delivered again only after it (the shipped default is 4 hours); a
#                         stage that runs longer than it is delivered twice (harmless, wasted)
#   JOB_TIMEOUT_S=N       how long one fine-tune may take (900)
set -euo pipefail

cd "$(dirname "$0")/.."
KEEP=0
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    *) echo "usage: $0 [--keep] [--no-build]" >&2; exit 2 ;;
  esac
done

export HOSTNET_API_PORT=${HOSTNET_API_PORT:-8791}
export HOSTNET_REDIS_PORT=${HOSTNET_REDIS_PORT:-6391}
export HOSTNET_PG_PORT=${HOSTNET_PG_PORT:-5441}
PROJECT=${PROJECT:-cvxtune-check}
KILL_TEST=${KILL_TEST:-1}
KILL_VISIBILITY_S=${KILL_VISIBILITY_S:-120}
JOB_TIMEOUT_S=${JOB_TIMEOUT_S:-900}
WHEELHOUSE_PORT=${WHEELHOUSE_PORT:-8793}
IMAGE=cvxtune:latest
API="http://127.0.0.1:$HOSTNET_API_PORT"
WORK=$(mktemp -d /tmp/cvxtune-check.XXXXXX)
SERVER_PID=""
KEY=""

log() { printf '\n[%(%H:%M:%S)T] == %s\n' -1 "$*"; }
die() { echo "FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- compose
# Compose 1.29 refuses `ports:` beside host networking and an override cannot delete them, so
# the check runs one flat file: both files merged by `docker-compose config`, `ports:` dropped
# (the container port is the host port). It is kept with --keep, for `down` later.
COMPOSE_FILE_FLAT=${TMPDIR:-/tmp}/$PROJECT.compose.yml
flatten() {  # WORKER_VISIBILITY_S=N in the environment sets the worker's visibility timeout
  local py
  for py in python3 /usr/bin/python3; do
    if "$py" -c 'import yaml' 2>/dev/null; then break; fi
  done
  docker-compose -f docker-compose.yml -f deploy/compose.hostnet.yml config \
    | "$py" -c '
import os, sys, yaml
cfg = yaml.safe_load(sys.stdin)
for svc in cfg["services"].values():
    svc.pop("ports", None)
if os.environ.get("WORKER_VISIBILITY_S"):
    env = cfg["services"]["worker"]["environment"]
    env["CVXTUNE_VISIBILITY_TIMEOUT_S"] = os.environ["WORKER_VISIBILITY_S"]
yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
' >"$COMPOSE_FILE_FLAT"
}
compose() { docker-compose -p "$PROJECT" -f "$COMPOSE_FILE_FLAT" "$@"; }

cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ] && [ -f "$COMPOSE_FILE_FLAT" ]; then
    echo "--- last logs (api, worker)" >&2
    compose logs --tail=40 api worker >&2 2>/dev/null || true
  fi
  if [ "$KEEP" -eq 0 ]; then
    if [ -f "$COMPOSE_FILE_FLAT" ]; then compose down -v >/dev/null 2>&1 || true; fi
    rm -f "$COMPOSE_FILE_FLAT"
  else
    echo "kept running; stop with: docker-compose -p $PROJECT -f $COMPOSE_FILE_FLAT down -v"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

wait_healthy() {  # [seconds]: until all four containers report healthy
  local deadline=$((SECONDS + ${1:-600})) svc cid status all
  while :; do
    all=1
    for svc in redis postgres api worker; do
      cid=$(compose ps -q "$svc")
      status=none
      if [ -n "$cid" ]; then status=$(docker inspect -f '{{.State.Health.Status}}' "$cid"); fi
      [ "$status" = healthy ] || all=0
    done
    [ "$all" -eq 1 ] && break
    [ "$SECONDS" -lt "$deadline" ] || { compose ps; die "services not healthy in time"; }
    sleep 3
  done
  compose ps
}

ports_free() {
  local p
  for p in "$HOSTNET_API_PORT" "$HOSTNET_REDIS_PORT" "$HOSTNET_PG_PORT"; do
    if ss -ltnH "sport = :$p" | grep -q .; then
      die "port $p is in use on this host; choose another with HOSTNET_*_PORT"
    fi
  done
}

# ---------------------------------------------------------------- HTTP
get() { curl -sS -f -H "Authorization: Bearer $KEY" "$API$1"; }
upload() {  # file name -> dataset JSON
  curl -sS -f -H "Authorization: Bearer $KEY" -F "file=@$1" -F "name=$2" "$API/v1/datasets"
}
start_job() {  # dataset gates seed -> job id
  local body
  body=$(jq -nc --arg ds "$1" --argjson g "$2" --argjson seed "$3" '{dataset_id: $ds,
    backbone: "tf_efficientnet_lite0", head: {kind: "mlp", gates: $g}, lam: 0.01,
    validation_fraction: 0.25, seed: $seed}')
  curl -sS -f -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
    -H "Idempotency-Key: check-$1-$2-$3" "$API/v1/finetunes" -d "$body" | jq -r .id
}
predict() {  # head image -> "label probability"
  curl -sS -f -H "Authorization: Bearer $KEY" -F "files=@$2" "$API/v1/heads/$1/predict" \
    | jq -r '.predictions[0] | "\(.label) \(.probabilities[.label])"'
}
wait_job() {  # job -> its final JSON on stdout, each change of state on stderr
  local deadline=$((SECONDS + JOB_TIMEOUT_S)) job now last=""
  while :; do
    job=$(get "/v1/finetunes/$1") || job='{"state":"unreachable","stage":"-","progress":0}'
    now=$(jq -r '"\(.state) \(.stage) \(.progress * 100 | floor)%"' <<<"$job")
    [ "$now" = "$last" ] || echo "  $(date +%T) $1: $now" >&2
    last=$now
    case "$now" in succeeded* | failed* | cancelled*) break ;; esac
    [ "$SECONDS" -lt "$deadline" ] || die "job $1 did not end in ${JOB_TIMEOUT_S}s"
    sleep 1
  done
  echo "$job"
}
expect_success() {  # job: waits; fails unless it succeeded
  local job
  job=$(wait_job "$1")
  echo "ended: $(jq -c '{id, state, stage, error, head_id, deliveries}' <<<"$job")"
  [ "$(jq -r .state <<<"$job")" = succeeded ] || die "job $1 did not succeed"
}
wait_stage() {  # job stage: until the job runs that stage, and 2 s into it
  local deadline=$((SECONDS + 300))
  until [ "$(get "/v1/finetunes/$1" | jq -r '"\(.state) \(.stage)"')" = "running $2" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "job $1 never reached stage $2"
    sleep 0.5
  done
  sleep 2
  echo "interrupting at: $(get "/v1/finetunes/$1" | jq -c '{id, state, stage, progress}')"
}

# ---------------------------------------------------------------- build and data
build_image() {
  local args=(--network host -t "$IMAGE") tv tvv t0
  if [ -n "${TORCH_INDEX_URL:-}" ]; then args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"); fi
  if [ -n "${WHEELHOUSE:-}" ]; then
    tv=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
    tvv=$(sed -n 's/^ARG TORCHVISION_VERSION=//p' Dockerfile)
    mkdir -p "$WHEELHOUSE"
    if ! ls "$WHEELHOUSE"/torch-"$tv"-*.whl >/dev/null 2>&1; then
      log "filling the wheelhouse $WHEELHOUSE with torch==$tv torchvision==$tvv"
      python3 -m pip download "torch==$tv" "torchvision==$tvv" -d "$WHEELHOUSE"
    fi
    python3 -m http.server "$WHEELHOUSE_PORT" --bind 127.0.0.1 --directory "$WHEELHOUSE" \
      >/dev/null 2>&1 &
    SERVER_PID=$!
    sleep 1
    args+=(--build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$WHEELHOUSE_PORT/")
  fi
  log "1. docker build ${args[*]} ."
  t0=$SECONDS
  if ! docker build "${args[@]}" . >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    die "docker build failed"
  fi
  grep -E '^(Step|Successfully (built|tagged))' "$WORK/build.log"
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID"; SERVER_PID=""; fi
  echo "build: $((SECONDS - t0)) s"
}

make_data() {  # 3 classes: 20 images each, 50 each for step 5, one test image each
  docker run --rm --network host --user "$(id -u):$(id -g)" \
    -v /usr/share/datasets/fashion-mnist:/fm:ro -e CVXTUNE_FASHION_MNIST=/fm \
    -v "$WORK:/out" -w /out --entrypoint python "$IMAGE" -c '
import numpy as np
from workers.sample_data import load_fashion_mnist, balanced_indices, write_imagefolder, png_bytes
images, labels = load_fashion_mnist("train")
keep = np.isin(labels, [1, 5, 8])  # trouser, sandal, bag
images, labels = images[keep], labels[keep]
small = balanced_indices(labels, 20)
write_imagefolder("fashion3.zip", images[small], labels[small])
large = balanced_indices(labels, 50, offset=20)
write_imagefolder("fashion3-large.zip", images[large], labels[large])
ti, tl = load_fashion_mnist("test")
for c in (1, 5, 8):
    open(f"test{c}.png", "wb").write(png_bytes(ti[int(np.flatnonzero(tl == c)[0])]))
'
  ls -l "$WORK"
}

show_backing_services() {  # the rows and the keys are in the containers' servers
  echo "postgres container (:$HOSTNET_PG_PORT), finetunes:"
  compose exec -T postgres psql -U cvxtune -d cvxtune -p "$HOSTNET_PG_PORT" -tAc \
    "select id, state, stage from finetunes order by created_at"
  echo "redis container (:$HOSTNET_REDIS_PORT):" \
    "$(compose exec -T redis redis-cli -p "$HOSTNET_REDIS_PORT" dbsize | tr -d '\r') keys;" \
    "AOF: $(compose exec -T redis sh -c 'ls /data/appendonlydir | tr "\n" " "')"
}

check_still_there() {
  echo "dataset: $(get "/v1/datasets/$ds_id" | jq -c '{id, n_samples}')"
  echo "job:     $(get "/v1/finetunes/$job_id" | jq -c '{id, state, head_id}')"
  echo "head:    $(get "/v1/heads/$head_id" | jq -c '{id, backbone}')"
  local now
  now=$(predict "$head_id" "$WORK/test5.png")
  echo "predict test5.png: $now"
  [ "$now" = "$before" ] || die "prediction changed across the restart: $before -> $now"
}

# ---------------------------------------------------------------- the check
for tool in docker docker-compose curl jq ss; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

if [ "$BUILD" -eq 1 ]; then build_image; fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE (run without --no-build)"
echo "image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

log "2. docker-compose up -d (project $PROJECT; api :$HOSTNET_API_PORT," \
  "redis :$HOSTNET_REDIS_PORT, postgres :$HOSTNET_PG_PORT)"
ports_free
flatten
t0=$SECONDS
compose up -d
wait_healthy
echo "healthy after $((SECONDS - t0)) s"
ready=$(curl -sS "$API/readyz")
echo "readyz: $ready"
[ "$(jq -r .status <<<"$ready")" = ok ] || die "/readyz is not ok"

log "3. key, upload, fine-tune, predict"
KEY=$(compose exec -T api cvxtune keys create --project check | tr -d '\r' | tail -n 1)
[ -n "$KEY" ] || die "no key"
echo "key: ${KEY:0:8}..."
make_data
ds=$(upload "$WORK/fashion3.zip" fashion-3)
ds_id=$(jq -r .id <<<"$ds")
echo "dataset: $(jq -c '{id, n_samples, classes, class_counts}' <<<"$ds")"
t0=$SECONDS
job_id=$(start_job "$ds_id" 16 0)
expect_success "$job_id"
echo "fine-tune took $((SECONDS - t0)) s"
head_id=$(get "/v1/finetunes/$job_id" | jq -r .head_id)
get "/v1/heads/$head_id" | jq -c '{id, classes, validation: .metrics.validation.accuracy,
  duality_gap: .certificate.duality_gap, converged: .certificate.converged}'
before=$(predict "$head_id" "$WORK/test5.png")
echo "predict test5.png (a sandal): $before"
show_backing_services

log "4a. docker-compose restart"
t0=$SECONDS
compose restart
wait_healthy
echo "healthy again after $((SECONDS - t0)) s"
check_still_there

log "4b. docker-compose down (volumes kept), then up -d"
t0=$SECONDS
compose down
compose up -d
wait_healthy
echo "healthy again after $((SECONDS - t0)) s"
check_still_there

if [ "$KILL_TEST" -eq 1 ]; then
  ds2=$(upload "$WORK/fashion3-large.zip" fashion-3-large | jq -r .id)

  log "5a. stop the worker (SIGTERM, warm shutdown) while a job extracts, then start it"
  job2=$(start_job "$ds2" 16 1)
  wait_stage "$job2" extract
  t0=$SECONDS
  compose stop worker
  echo "worker stopped in $((SECONDS - t0)) s (grace period 60 s)"
  if [ "$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q worker)")" = 137 ]; then
    die "the stage outlived the grace period and the worker was killed: its task is delivered" \
      "again only after the visibility timeout (a slow or busy machine; rerun)"
  fi
  compose start worker
  expect_success "$job2"

  log "5b. kill the worker (SIGKILL) while a job fits; the worker now runs with" \
    "CVXTUNE_VISIBILITY_TIMEOUT_S=$KILL_VISIBILITY_S"
  WORKER_VISIBILITY_S=$KILL_VISIBILITY_S flatten
  compose up -d worker
  wait_healthy
  job3=$(start_job "$ds2" 16 2)
  wait_stage "$job3" fit
  docker kill "$(compose ps -q worker)" >/dev/null
  t0=$SECONDS
  compose up -d worker
  expect_success "$job3"
  echo "finished $((SECONDS - t0)) s after the kill"
fi

log "all checks passed"
