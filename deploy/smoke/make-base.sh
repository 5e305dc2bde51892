#!/usr/bin/env bash
# Make a stand-in for the PyTorch base image from reachable sources (Debian packages and PyPI), as
# a tarball that `podman import` reads. Used by deploy/smoke/run.sh where Docker Hub is out of reach.
#
#   deploy/smoke/make-base.sh cpu  OUT.tar [TORCH_VERSION]   torch's CPU build (default: constraints/cpu.txt)
#   deploy/smoke/make-base.sh cuda OUT.tar [TORCH_VERSION]   PyPI's CUDA build (default: the Dockerfile's base)
#
# Layout as in pytorch/pytorch images: Debian with python3, a venv at /opt/conda on PATH. python3-dev
# is there because torch.compile builds C code against Python.h (on the CPU too). The host's local CA
# certificates (/usr/local/share/ca-certificates) are copied in, so pip works inside the image build
# behind a proxy with its own CA. For the cpu flavour a local torch wheel ($PIP_FIND_LINKS, e.g. a
# folder with torch-X+cpu-*.whl) is used when present; otherwise pip takes what PyPI has.
set -euo pipefail
flavour=${1:?usage: make-base.sh cpu|cuda OUT.tar [TORCH_VERSION]}
out=${2:?usage: make-base.sh cpu|cuda OUT.tar [TORCH_VERSION]}
here=$(cd "$(dirname "$0")/../.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

case "$flavour" in
  cpu) torch=${3:-$(sed -n 's/^torch==//p' "$here/constraints/cpu.txt")} ;;
  cuda) torch=${3:-$(sed -n 's/^ARG BASE_IMAGE=pytorch\/pytorch:\([0-9.]*\)-.*/\1/p' "$here/Dockerfile")} ;;
  *) echo "make-base.sh: flavour must be cpu or cuda, not '$flavour'" >&2; exit 2 ;;
esac
[ -n "$torch" ] || { echo "make-base.sh: no torch version found for '$flavour'" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "make-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/tmp}/arcdiff-base.XXXXXX")
cleanup() { umount -l "$root/proc" 2>/dev/null || true; rm -rf "$root"; }
trap cleanup EXIT

echo "== debootstrap bookworm (python3, python3-venv, python3-dev)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
  bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
rm -f "$root.debootstrap.log"

cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
mount -t proc proc "$root/proc"

echo "== venv /opt/conda with torch==$torch ($flavour)"
chroot "$root" python3 -m venv /opt/conda
wheel_args=()
if [ "$flavour" = cpu ]; then
  for dir in ${PIP_FIND_LINKS:-}; do
    for whl in "$dir"/torch-"$torch"+cpu-*.whl; do
      [ -f "$whl" ] || continue
      mkdir -p "$root/tmp/wheels" && cp "$whl" "$root/tmp/wheels/"
      wheel_args=(--find-links /tmp/wheels)
    done
  done
fi
chroot "$root" env -i PATH=/opt/conda/bin:/usr/bin:/bin PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  /opt/conda/bin/pip install -q ${wheel_args[@]+"${wheel_args[@]}"} "torch==$torch"
chroot "$root" /opt/conda/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
umount -l "$root/proc"
rm -rf "$root/tmp/wheels" "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
# pytorch/pytorch images put the environment first on PATH; `podman import --change` sets that
printf 'nameserver 10.0.2.3\n' > "$root/etc/resolv.conf"

echo "== $out"
mkdir -p "$(dirname "$out")"
tar -C "$root" -cf "$out.part" . && mv "$out.part" "$out"
du -h "$out" | cut -f1
