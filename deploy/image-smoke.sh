#!/usr/bin/env bash
# Build one variant of the ddm-anomaly image and prove it works, on any machine with Docker:
#
#   deploy/image-smoke.sh --variant cpu
#   deploy/image-smoke.sh --variant gpu                        # CUDA 13.0 (cu130), needs an NVIDIA GPU
#   deploy/image-smoke.sh --variant gpu --cuda-flavour cu126   # legacy CUDA 12.6 build
#   deploy/image-smoke.sh --variant cpu --no-build             # check an image built before
#
# Steps (each prints what it checked; the first failure stops the run with exit status 1):
#   1. build ddm-anomaly:<version>-<variant>[-<flavour>] with the OCI labels (version from pyproject.toml,
#      revision and source from git, creation time now); check the labels, the non-root user, and that no
#      build-only variable (DEBIAN_FRONTEND, TORCH_INDEX_URL, ...) is in the image's environment;
#   2. run it as docker-compose.yml runs the api service: read-only root, tmpfs on /tmp and ~/.cache, all
#      capabilities dropped, no-new-privileges, a fresh named volume on /opt/ddm/model_store, the same DDM_*
#      settings (and one GPU for the gpu variant);
#   3. wait for the image's HEALTHCHECK to say healthy (/readyz: model loaded and warmed up);
#   4. score the README's example request (face.png + digit.png; the digit must be flagged), then read
#      /metrics (ready, the request and its images counted);
#   5. send a 64-image request, SIGTERM the container while it is in flight, and require exit status 0
#      and the full answer to that request (the drain).
# The HTTP checks run deploy/image_smoke_check.py with the image's own Python in a second container on a
# private network, so the host needs nothing but bash and Docker. Containers, the network and the volume
# are removed at the end unless --keep is given.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --variant cpu|gpu        the image variant (required)
  --cuda-flavour FLAVOUR   gpu only: cu130 (default) or cu126; see deploy/torch-cuda-pairs.toml
  --image NAME:TAG         image name (default ddm-anomaly:<version>-cpu / <version>-gpu-<flavour>)
  --no-build               use an image that already exists
  --gpus SPEC              gpu only: docker run --gpus value (default 1, as compose reserves one GPU)
  --health-timeout SEC     how long to wait for healthy (default 420: the 300 s start period + margin)
  --keep                   leave the container, network and volume for inspection
EOF
}

variant="" flavour="cu130" image="" build=1 gpus="1" health_timeout=420 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="${2:-}"; shift 2 ;;
    --cuda-flavour) flavour="${2:-}"; shift 2 ;;
    --image) image="${2:-}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --gpus) gpus="${2:-}"; shift 2 ;;
    --health-timeout) health_timeout="${2:-}"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "image-smoke: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$variant" in
  cpu|gpu) ;;
  *) echo "image-smoke: --variant cpu or --variant gpu is required" >&2; usage >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
check_py="$root/deploy/image_smoke_check.py"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)"
if [ "$variant" = gpu ]; then
  tag_suffix="gpu-$flavour"
else
  tag_suffix="cpu"
fi
image="${image:-ddm-anomaly:$version-$tag_suffix}"
run_id="ddm-smoke-$$"
service="$run_id-api"
network="$run_id-net"
volume="$run_id-models"

# What docker-compose.yml sets for the api services (tests/test_deploy_docker.py holds these to it).
common_env=(
  DDM_HOST=0.0.0.0
  DDM_PORT=8000
  DDM_MODEL_DIR=/opt/ddm/model_store/celeba32-ref
  DDM_MAX_BATCH_SIZE=32
  DDM_MAX_BATCH_DELAY_MS=10
  DDM_MAX_QUEUE_IMAGES=256
  DDM_REQUEST_TIMEOUT_S=60
  DDM_DRAIN_TIMEOUT_S=30
  DDM_API_KEYS=
  DDM_LOG_LEVEL=info
  DDM_LOG_FORMAT=text
)
cpu_env=(
  DDM_DEVICE=cpu
  DDM_RUNTIME=auto
  DDM_TORCH_THREADS=1
  DDM_MODEL_INSTANCES=auto
)
gpu_env=(
  DDM_DEVICE=cuda
  DDM_RUNTIME=auto
  DDM_TORCH_THREADS=2
  DDM_MODEL_INSTANCES=1
)
hardening=(
  --read-only
  --tmpfs /tmp
  --tmpfs /home/app/.cache
  --cap-drop ALL
  --security-opt no-new-privileges:true
)
stop_grace_s=45  # compose's stop_grace_period: SIGKILL after this

log() { printf 'image-smoke: %s\n' "$*"; }
fail() {
  printf 'image-smoke: FAILED: %s\n' "$*" >&2
  if docker container inspect "$service" >/dev/null 2>&1; then
    printf -- '--- last lines of the service log ---\n' >&2
    docker logs --tail 40 "$service" >&2 2>&1 || true
  fi
  exit 1
}
cleanup() {
  if [ "$keep" = 1 ]; then
    log "kept: container $service, network $network, volume $volume"
    return
  fi
  docker rm -f "$service" >/dev/null 2>&1 || true
  docker network rm "$network" >/dev/null 2>&1 || true
  docker volume rm "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# The HTTP checks: image_smoke_check.py on the image's Python, on the private network, no host tools.
check() {
  docker run --rm -i --network "$network" --read-only --tmpfs /tmp --entrypoint python "$image" \
    - "$1" "http://ddm-anomaly:8000" <"$check_py"
}
label() {
  docker image inspect --format "{{ index .Config.Labels \"$1\" }}" "$image"
}

command -v docker >/dev/null 2>&1 || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info)"

# ---- 1. build --------------------------------------------------------------------------------------------
if [ "$build" = 1 ]; then
  revision="" source_url=""
  if git -C "$root" rev-parse HEAD >/dev/null 2>&1; then
    revision="$(git -C "$root" rev-parse HEAD)"
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
      revision="$revision-dirty"
    fi
    # The remote's URL without any user:token@ part.
    source_url="$(git -C "$root" remote get-url origin 2>/dev/null | sed -E 's#^([a-z+]+://)[^/@]*@#\1#')" || true
  fi
  created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  build_args=(--build-arg "VARIANT=$variant" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "CREATED=$created" --build-arg "SOURCE=$source_url")
  what="variant $variant"
  if [ "$variant" = gpu ]; then
    build_args+=(--build-arg "CUDA_FLAVOUR=$flavour")
    what="$what, CUDA flavour $flavour"
  fi
  log "building $image ($what, revision ${revision:-unknown})"
  started=$SECONDS
  docker build "${build_args[@]}" -t "$image" "$root" || fail "docker build"
  log "built in $((SECONDS - started)) s"
  [ "$(label org.opencontainers.image.revision)" = "$revision" ] || fail "label org.opencontainers.image.revision"
  [ "$(label org.opencontainers.image.created)" = "$created" ] || fail "label org.opencontainers.image.created"
fi
docker image inspect "$image" >/dev/null 2>&1 || fail "no image $image (build it, or drop --no-build)"
[ "$(label org.opencontainers.image.version)" = "$version" ] \
  || fail "label org.opencontainers.image.version is '$(label org.opencontainers.image.version)', not $version"
[ "$(label io.ddm-anomaly.variant)" = "$variant" ] || fail "label io.ddm-anomaly.variant is not $variant"
user="$(docker image inspect --format '{{ .Config.User }}' "$image")"
[ "$user" = "10001:10001" ] || fail "the image runs as '$user', not 10001:10001"
image_env="$(docker image inspect --format '{{ range .Config.Env }}{{ println . }}{{ end }}' "$image")"
for name in DEBIAN_FRONTEND TORCH_INDEX_URL TORCH_INDEX TORCH_VERSION CUDA_FLAVOUR PIP_CONSTRAINT; do
  if printf '%s\n' "$image_env" | grep -q "^$name="; then
    fail "build-only variable $name is in the image's environment"
  fi
done
size="$(docker image inspect --format '{{ .Size }}' "$image")"
log "image $image: $(awk -v b="$size" 'BEGIN { printf "%.2f GB", b / 1e9 }'), user $user," \
  "version $(label org.opencontainers.image.version), revision $(label org.opencontainers.image.revision)"

# ---- 2. run as compose does ------------------------------------------------------------------------------
env_args=()
for pair in "${common_env[@]}"; do env_args+=(-e "$pair"); done
if [ "$variant" = gpu ]; then
  for pair in "${gpu_env[@]}"; do env_args+=(-e "$pair"); done
  device_args=(--gpus "$gpus")
else
  for pair in "${cpu_env[@]}"; do env_args+=(-e "$pair"); done
  device_args=()
fi
docker network create "$network" >/dev/null || fail "docker network create"
docker volume create "$volume" >/dev/null || fail "docker volume create"
docker run -d --name "$service" --network "$network" --network-alias ddm-anomaly \
  "${hardening[@]}" --volume "$volume:/opt/ddm/model_store" --stop-timeout "$stop_grace_s" \
  ${device_args[@]+"${device_args[@]}"} "${env_args[@]}" "$image" >/dev/null \
  || fail "docker run"
log "started $service (read-only root, no capabilities, volume $volume on /opt/ddm/model_store)"

# ---- 3. healthy ------------------------------------------------------------------------------------------
started=$SECONDS
while :; do
  state="$(docker inspect --format '{{ .State.Status }} {{ if .State.Health }}{{ .State.Health.Status }}{{ end }}' "$service")"
  case "$state" in
    "running healthy") break ;;
    running*) ;;
    *) fail "the container stopped before it was healthy ($state)" ;;
  esac
  [ $((SECONDS - started)) -lt "$health_timeout" ] || fail "not healthy after $health_timeout s ($state)"
  sleep 2
done
log "healthy after $((SECONDS - started)) s"

# ---- 4. score and metrics --------------------------------------------------------------------------------
out="$(check score)" || fail "the README's example request"
log "$out"
out="$(check metrics)" || fail "/metrics"
log "$out"

# ---- 5. SIGTERM with a request in flight -----------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"; cleanup' EXIT
check inflight >"$tmp/inflight.log" 2>&1 &
helper=$!
started=$SECONDS
until grep -q IN-FLIGHT "$tmp/inflight.log" 2>/dev/null; do
  kill -0 "$helper" 2>/dev/null || break
  [ $((SECONDS - started)) -lt 120 ] || fail "the in-flight request did not start within 120 s"
  sleep 0.2
done
docker kill --signal TERM "$service" >/dev/null || fail "docker kill --signal TERM"
started=$SECONDS
while [ "$(docker inspect --format '{{ .State.Running }}' "$service")" = true ]; do
  [ $((SECONDS - started)) -lt "$stop_grace_s" ] || fail "still running $stop_grace_s s after SIGTERM"
  sleep 0.5
done
code="$(docker inspect --format '{{ .State.ExitCode }}' "$service")"
[ "$code" = 0 ] || fail "exit status $code after SIGTERM (expected 0)"
log "exited 0, $((SECONDS - started)) s after SIGTERM"
wait "$helper" || { cat "$tmp/inflight.log" >&2; fail "the request in flight at SIGTERM"; }
log "$(grep -v IN-FLIGHT "$tmp/inflight.log")"
log "PASSED: $image"
