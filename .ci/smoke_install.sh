#!/usr/bin/env bash
# The installed package outside the checkout: a fresh venv, `pip install .` from another folder,
# then `metal-defect --help` and `metal-defect predict` on one image with an exported bundle
# (a tiny model trained on synthetic images by the checkout's own venv).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$repo"
"$repo/.venv/bin/python" - "$work" <<'PY'
import sys
from pathlib import Path

import yaml

from metal_defect import synthetic
from metal_defect.cli import main

work = Path(sys.argv[1])
data = synthetic.make_dataset(work / "data", per_class=12)
cfg = work / "cfg"
(cfg / "config").mkdir(parents=True)
for name in ("params.yaml", "schema.yaml", "config/config.yaml"):
    (cfg / name).write_text((Path.cwd() / name).read_text())
params = yaml.safe_load((cfg / "params.yaml").read_text())
params["base"]["image_size"] = 32
params["data_ingestion"]["source"] = str(data)
params["train"].update(epochs=2, min_steps=0, verbose=0)
params["tuning"].update(max_trials=2, epochs_per_trial=2)  # the search runs (keras-tuner installed and working), briefly
params["evaluation"]["annotations"] = None
(cfg / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
schema = yaml.safe_load((cfg / "schema.yaml").read_text())
schema.update(classes=list(synthetic.CLASSES), min_images_per_class=3, aliases={})
(cfg / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
assert main(["run", "--config", str(cfg)]) == 0
assert main(["export", str(work / "bundle"), "--config", str(cfg)]) == 0
PY

python3 -m venv "$work/venv"
(cd "$work" && "$work/venv/bin/python" -m pip install --quiet "$repo")
cd "$work"
"$work/venv/bin/metal-defect" --help > /dev/null
image="$(ls "$work"/data/patches/*.png | head -1)"
"$work/venv/bin/metal-defect" predict "$image" --model "$work/bundle" --csv "$work/answer.csv"
grep -q ",patches," "$work/answer.csv" || { echo "smoke test: expected the label patches in $work/answer.csv"; cat "$work/answer.csv"; exit 1; }
test -s "$work/artifacts/predictions.jsonl"
echo "installed package: --help and predict with an exported bundle work outside the checkout"
