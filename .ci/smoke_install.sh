#!/usr/bin/env bash
# The installed package outside the checkout: a fresh venv, `pip install .` from another folder,
# then `metal-defect --help` and `metal-defect predict` on one image with an exported bundle
# (a tiny model trained on synthetic images by the checkout's own venv).
#
#   .ci/smoke_install.sh [TINY]   # TINY: a folder `.ci/tiny_bundle.py` wrote (default: one trained here)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

tiny="${1:-}"
if [ -z "$tiny" ]; then
  tiny="$work/tiny"
  (cd "$repo" && "$repo/.venv/bin/python" .ci/tiny_bundle.py "$tiny")
fi
tiny="$(cd "$tiny" && pwd)"

python3 -m venv "$work/venv"
(cd "$work" && "$work/venv/bin/python" -m pip install --quiet "$repo")
cd "$work"
"$work/venv/bin/metal-defect" --help > /dev/null
image="$(ls "$tiny"/data/patches/*.png | head -1)"
"$work/venv/bin/metal-defect" predict "$image" --model "$tiny/bundle" --csv "$work/answer.csv"
grep -q ",patches," "$work/answer.csv" || { echo "smoke test: expected the label patches in $work/answer.csv"; cat "$work/answer.csv"; exit 1; }
test -s "$work/artifacts/predictions.jsonl"
echo "installed package: --help and predict with an exported bundle work outside the checkout"
