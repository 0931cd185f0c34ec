"""Train a tiny model on synthetic images and export its bundle: `python .ci/tiny_bundle.py WORK`.

Used by the CI checks that need a real bundle without the NEU run (the installed-package
smoke test, the container check). WORK receives `data/` (the synthetic images, class folders),
`cfg/` (the three YAML files, tiny settings) and `bundle/` (the exported bundle). No search:
the tests run it, in the same venv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)

    from metal_defect import synthetic
    from metal_defect.cli import main as cli

    work = args.work.resolve()
    data = synthetic.make_dataset(work / "data", per_class=12)
    cfg = work / "cfg"
    (cfg / "config").mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "schema.yaml", "config/config.yaml"):
        (cfg / name).write_text((REPO / name).read_text())
    params = yaml.safe_load((cfg / "params.yaml").read_text())
    params["base"]["image_size"] = 32
    params["data_ingestion"]["source"] = str(data)
    params["train"].update(epochs=2, min_steps=0, verbose=0)
    params["tuning"]["enabled"] = False
    params["evaluation"]["annotations"] = None
    (cfg / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    schema = yaml.safe_load((cfg / "schema.yaml").read_text())
    schema.update(classes=list(synthetic.CLASSES), min_images_per_class=3, aliases={})
    (cfg / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    if cli(["run", "--config", str(cfg)]) != 0:
        return 1
    return cli(["export", str(work / "bundle"), "--config", str(cfg)])


if __name__ == "__main__":
    sys.exit(main())
