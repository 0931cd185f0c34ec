#!/usr/bin/env bash
# The Docker image, built and served for real: build the Dockerfile with podman, start the image
# with an exported bundle mounted, and again with one baked in, wait for its HEALTHCHECK, check it
# does not run as root, upload an image in headless Chromium and wait for the answer; and check an
# image without a bundle shows the empty state. Every step fails loudly; nothing is skipped.
#
#   .ci/container_check.sh [BUNDLE]   # BUNDLE: an exported bundle (default: a tiny model trained here)
#
# Needs the checkout's .venv (dev requirements: Playwright) and Debian's chromium, podman, runc and
# mmdebstrap (installed with apt-get when missing). Where no image registry answers, a stand-in for
# `python:3.11-slim` (Debian 12's Python 3.11 in a venv) is made under that exact name, so the
# Dockerfile is built as written; on GitHub the workflow builds FROM the real one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
base_image="docker.io/library/python:3.11-slim"
image="localhost/metal-defect:check"
# containers are named per run: a run killed before its cleanup, or another run on the same
# machine, must not hold the name this one needs ("the container name ... is already in use")
run_id="$$-$(date +%s)"
containers=()
cleanup() {
  for name in "${containers[@]}"; do podman rm -f "$name" > /dev/null 2>&1 || true; done
  podman image prune -f > /dev/null 2>&1 || true  # the earlier builds' untagged layers; the tagged ones stay as the cache
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "container check: $*"; }
fail() { echo "container check FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" > /dev/null || missing+=("$tool"); done
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  say "installing ${missing[*]} from Debian"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" > /dev/null
fi
# crun refuses these kernels' cgroups, and setting RLIMIT_NOFILE is not permitted in this sandbox;
# podman reads this file instead of changing the machine's /etc/containers/containers.conf
export CONTAINERS_CONF="$work/containers.conf"
printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > "$CONTAINERS_CONF"

# ---------------------------------------------------------------- the base image
if ! podman image exists "$base_image" && ! podman pull -q "$base_image" > /dev/null 2>&1; then
  say "no registry answers: making a stand-in for $base_image (Debian 12, Python 3.11)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$work/rootfs.tar"
  podman import -q "$work/rootfs.tar" localhost/python-standin-rootfs > /dev/null
  mkdir -p "$work/standin"
  # pip in the build trusts the same certificate bundle as this machine (a proxy may re-sign PyPI)
  cp /etc/ssl/certs/ca-certificates.crt "$work/standin/host-ca.crt"
  cat > "$work/standin/Containerfile" <<'EOF'
FROM localhost/python-standin-rootfs
COPY host-ca.crt /usr/local/share/host-ca.crt
RUN python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PIP_CERT=/usr/local/share/host-ca.crt
EOF
  podman build -q --network host -t "$base_image" "$work/standin" > /dev/null
  podman rmi -f localhost/python-standin-rootfs > /dev/null 2>&1 || true
fi

# ---------------------------------------------------------------- a bundle, and two build contexts
bundle="${1:-}"
if [ -z "$bundle" ]; then
  say "training a tiny model for the bundle"
  (cd "$repo" && .venv/bin/python .ci/tiny_bundle.py "$work/tiny" > "$work/tiny.log" 2>&1) || { cat "$work/tiny.log"; fail "tiny model"; }
  bundle="$work/tiny/bundle"
fi
bundle="$(cd "$bundle" && pwd)"
probe="$(ls "$(dirname "$bundle")"/data/*/*.png 2> /dev/null | head -1 || true)"  # tiny_bundle.py's images
if [ -z "$probe" ]; then  # another bundle: any image will do for an answer
  probe="$work/probe.png"
  "$repo/.venv/bin/python" -c "import sys; from PIL import Image; Image.radial_gradient('L').resize((200, 200)).save(sys.argv[1])" "$probe"
fi
context="$work/context"  # the checkout as git sees it (tracked and new files, nothing ignored)
mkdir -p "$context"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf -) | tar -xf - -C "$context"
cp -a "$context" "$work/baked"
# the documented way to bake a model in, on model_bundle/ as it is in git (its README included)
(cd "$repo" && .venv/bin/python main.py export "$work/baked/model_bundle" --model "$bundle") || fail "python main.py export model_bundle"

# ---------------------------------------------------------------- build
build() {  # build TAG CONTEXT
  local started=$SECONDS
  # docker format keeps HEALTHCHECK (OCI images have no such field)
  podman build --format docker --network host -t "$1" "$2" > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "podman build $2"; }
  say "built $1 in $((SECONDS - started)) s ($(podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'))"
}
build "$image" "$context"
build "$image-baked" "$work/baked"

# ---------------------------------------------------------------- run and check
free_port() { "$repo/.venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
start() {  # start NAME IMAGE [podman run options]: .ci/image_smoke.sh starts it and checks health, user, answer
  local name="$1-$run_id" img="$2" port
  shift 2
  port="$(free_port)"
  containers+=("$name")
  "$repo/.ci/image_smoke.sh" podman "$img" "$name" --network host -e PORT="$port" "$@" || fail "$name"
  url="http://127.0.0.1:$port/"
}
browse() {  # browse URL MODE NAME: MODE answer (upload the probe image) or empty (read the empty state); a screenshot
           # of the page goes to artifacts/screenshots/container-NAME.png
  mkdir -p "$repo/artifacts/screenshots"
  "$repo/.venv/bin/python" - "$1" "$2" "$probe" "$repo/artifacts/screenshots/container-$3.png" <<'PY' || fail "browser check ($2) on $1"
import sys
from pathlib import Path

from metal_defect.screenshot import browse

url, mode, probe, shot = sys.argv[1:]
verdicts = ("— confidence", "Not sure", "Not like the training images")
if mode == "answer":
    page = browse(url, [Path(probe)], Path(shot), wait_for=verdicts)
    assert any(v in page["text"] for v in verdicts) and "could not be read" not in page["text"], page["text"][:1500]
    print(f"container check: {Path(probe).name} answered in the browser {page['seconds']} s after the upload")
else:
    page = browse(url, [], Path(shot), wait_for="No trained model yet", ready="metal-defect")
    print("container check: the image without a bundle shows the empty state")
assert "Traceback" not in page["text"], page["text"][:1500]
PY
}

start metal-defect-mounted "$image" -v "$bundle:/app/model_bundle:ro"
browse "$url" answer mounted
start metal-defect-baked "$image-baked"
browse "$url" answer baked
start metal-defect-empty "$image"
browse "$url" empty empty
say "passed"
