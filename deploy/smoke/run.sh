#!/usr/bin/env bash
# The container smoke test: the real Dockerfile built on a base made from reachable sources, the
# compose stack started on the CPU (docker-compose.yml + docker-compose.cpu.yml + this folder's
# override), and the stack checked end to end by deploy/smoke/check.py. Then the tests that start no
# services run inside the GPU image (the default Dockerfile, on a stand-in for its CUDA base), so the
# torch version the image ships is tested too.
#
#   deploy/smoke/run.sh [--keep] [--no-gpu-image]
#
#   --keep          leave the stack running and the images in place (default: remove them)
#   --no-gpu-image  skip the GPU image build and the tests inside it
#
# Needs podman with netavark and aardvark-dns (Debian: podman buildah runc fuse-overlayfs slirp4netns
# uidmap netavark aardvark-dns iptables) and debootstrap, as root; where podman is missing or cannot run it
# says so in one line and exits 0. Base images are cached as tarballs in ARCDIFF_SMOKE_CACHE
# (default /var/cache/arcdiff-smoke), with a venv holding podman-compose and the checker's packages. Times and sizes: docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

keep=0
gpu_image=1
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --no-gpu-image) gpu_image=0 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

skip() { echo "container smoke test skipped: $*"; exit 0; }
packages="podman buildah runc fuse-overlayfs slirp4netns uidmap netavark aardvark-dns iptables debootstrap"
for need in podman debootstrap iptables /usr/lib/podman/netavark /usr/lib/podman/aardvark-dns; do
  command -v "$need" >/dev/null || skip "$need is missing (Debian: apt-get install $packages)"
done
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/deploy/podman/containers.conf}
podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -1)"
# keep the image's HEALTHCHECK: podman's default OCI format has no place for it
export BUILDAH_FORMAT=docker

t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }
cache=${ARCDIFF_SMOKE_CACHE:-/var/cache/arcdiff-smoke}
mkdir -p "$cache"
torch_cpu=$(sed -n 's/^torch==//p' constraints/cpu.txt)
torch_gpu=$(sed -n 's/^ARG BASE_IMAGE=pytorch\/pytorch:\([0-9.]*\)-.*/\1/p' Dockerfile)
project=arcdiff-smoke
base_cpu=localhost/arcdiff-base:cpu-$torch_cpu
base_gpu=localhost/arcdiff-base:cuda-$torch_gpu
tools=localhost/arcdiff-smoke-tools:1
image=localhost/arcdiff:0.1.0-cpu
gpu_tag=localhost/arcdiff:smoke-gpu
embedded=$project-embedded
work=$(mktemp -d)

step "checker venv ($cache/venv: podman-compose, httpx, httpx-sse, pyyaml)"
if [ ! -x "$cache/venv/bin/podman-compose" ]; then
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install -q podman-compose==1.6.0 httpx httpx-sse pyyaml -c constraints/lock.txt
fi
compose=("$cache/venv/bin/podman-compose" -p "$project" -f docker-compose.yml -f docker-compose.cpu.yml
         -f deploy/smoke/compose.smoke.yml)

# an image from its cached tarball, the tarball made first when missing
base_image() {  # flavour torch tag
  local tar="$cache/base-$1-$2.tar"
  [ -f "$tar" ] || deploy/smoke/make-base.sh "$1" "$tar" "$2"
  podman image exists "$3" || podman import -q \
    --change 'ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$tar" "$3" >/dev/null
}

cleanup() {
  status=$?
  if [ "$keep" = 0 ]; then
    step "clean up (--keep leaves it)"
    "${compose[@]}" down -v >/dev/null 2>&1 || true
    podman rm -f "$embedded" >/dev/null 2>&1 || true
    podman rmi -f "$image" "$gpu_tag" "$tools" "$base_cpu" "$base_gpu" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  [ $status = 0 ] && echo "container smoke test passed in $((SECONDS - t0)) s" \
    || echo "container smoke test FAILED (exit $status) after $((SECONDS - t0)) s" >&2
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM  # so the EXIT trap cleans up after a kill too

step "CPU base image $base_cpu"
base_image cpu "$torch_cpu" "$base_cpu"
step "stand-ins for redis and prometheus ($tools)"
podman build -q -f deploy/smoke/Containerfile.tools --build-arg "BASE_IMAGE=$base_cpu" -t "$tools" deploy/smoke >/dev/null

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export ARCDIFF_BASE_IMAGE=$base_cpu SMOKE_TOOLS_IMAGE=$tools
export ARCDIFF_API_PORT=$(free_port) ARCDIFF_PROMETHEUS_PORT=$(free_port)
embedded_port=$(free_port)
# the real Prometheus config and rules, scraping and evaluating every 2 s so rates fill in quickly
export SMOKE_PROMETHEUS_DIR=$work/prometheus
mkdir -p "$SMOKE_PROMETHEUS_DIR"
cp deploy/prometheus/alerts.yml "$SMOKE_PROMETHEUS_DIR/"
sed -e 's/^\(  scrape_interval:\).*/\1 2s/' -e 's/^\(  evaluation_interval:\).*/\1 2s/' \
  deploy/prometheus/prometheus.yml > "$SMOKE_PROMETHEUS_DIR/prometheus.yml"

step "build the CPU image (docker-compose.cpu.yml: DEVICE=cpu on $base_cpu)"
"${compose[@]}" build api > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
step "start the stack (redis, api, worker on the CPU, prometheus)"
"${compose[@]}" up -d > "$work/up.log" 2>&1 || { tail -40 "$work/up.log" >&2; exit 1; }
# embedded mode in the same image, on a port of its own: the healthcheck must follow --port
podman run -d --name "$embedded" -p "127.0.0.1:$embedded_port:18000" "$image" \
  serve --host 0.0.0.0 --port 18000 >/dev/null

containers=$(podman ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}}' | paste -sd, -)
step "checks (deploy/smoke/check.py)"
compose_json=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${compose[@]}")
"$cache/venv/bin/python" deploy/smoke/check.py \
  --api "http://127.0.0.1:$ARCDIFF_API_PORT" --embedded "http://127.0.0.1:$embedded_port" \
  --prometheus "http://127.0.0.1:$ARCDIFF_PROMETHEUS_PORT" --compose "$compose_json" \
  --image "$image" --containers "$containers,$embedded" \
  || { for c in ${containers//,/ } $embedded; do echo "--- logs of $c" >&2; podman logs --tail 30 "$c" >&2 || true; done; exit 1; }

if [ "$gpu_image" = 1 ]; then
  step "GPU image: the default Dockerfile (DEVICE=cuda) on a stand-in for its base (PyPI torch==$torch_gpu)"
  base_image cuda "$torch_gpu" "$base_gpu"
  podman build -q --build-arg "BASE_IMAGE=$base_gpu" -t "$gpu_tag" . > "$work/build-gpu.log" 2>&1 \
    || { tail -40 "$work/build-gpu.log" >&2; exit 1; }
  step "the tests that start no services, inside the GPU image (torch $torch_gpu, on the CPU)"
  # tests/ and pyproject.toml (pytest's settings) mounted, not shipped; arcdiff comes from the image
  podman run --rm --user root -v "$repo/tests:/src/tests:ro" -v "$repo/pyproject.toml:/src/pyproject.toml:ro" \
    -v "$repo/constraints:/src/constraints:ro" -w /src --entrypoint sh "$gpu_tag" -c '
      pip install -q pytest pytest-timeout pyyaml -c constraints/lock.txt 2>&1 | grep -v "^WARNING" || true
      python -c "import arcdiff, torch; print(\"arcdiff from\", arcdiff.__file__, \"torch\", torch.__version__)"
      exec pytest -q -p no:cacheprovider -o addopts="-m \"not slow\"" -k "not convergence_order" \
        tests/model tests/training tests/test_layering.py tests/worker/test_engine.py \
        tests/worker/test_engine_events.py tests/worker/test_jobs_encode.py tests/worker/test_scheduler.py'
fi
