"""c01-c03 through the runner on the real NEU images (read in place from ../shared)."""

from __future__ import annotations

import json

import pytest
from conftest import write_config

from metal_defect.components import c03_dataset_loader as c03
from metal_defect.config import load_config
from metal_defect.pipeline import Runner

pytestmark = pytest.mark.integration


def test_neu_ingestion_preprocessing_and_loader(tmp_path, neu_images):
    folder = write_config(tmp_path / "cfg", params={"data_ingestion": {"source": str(neu_images)}})
    config = load_config(folder)
    manifest = Runner(config).run("1-2")
    assert manifest["status"] == "succeeded"
    ingestion = manifest["stages"]["data_ingestion"]["summary"]
    assert ingestion["images_found"] == 1680 and len(ingestion["classes"]) == 6 and ingestion["skipped"] == 0

    prepared = tmp_path / "cfg" / "artifacts" / "runs" / manifest["run_id"] / "stages" / "data_preprocessing"
    report = json.loads((prepared / "preprocessing_report.json").read_text())
    (dup,) = report["duplicates"]
    assert {dup["kept"].rsplit("/", 1)[-1], dup["dropped"][0].rsplit("/", 1)[-1]} == {"patches_101.jpg", "patches_105.jpg"}
    sizes = manifest["stages"]["data_preprocessing"]["summary"]["split_sizes"]
    assert sizes == {"train": 1175, "valid": 252, "test": 252}  # 1,679 unique images, 70/15/15 stratified
    assert manifest["stages"]["data_preprocessing"]["summary"]["seconds"] < 60  # timings live in the record, not the output

    data = c03.build_datasets(prepared, config.data_loader, seed=config.base.seed)
    x, y = next(iter(data["train"].dataset))
    assert tuple(x.shape) == (32, 160, 160, 1) and x.dtype.name == "uint8" and y.dtype.name == "int32"  # image_size auto: 200 px, capped at 160
    assert data.class_names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]

    again = Runner(load_config(folder)).run("1-2")  # same data, same config: everything reused, same split
    assert all(s["reused"] for s in again["stages"].values())
    assert again["data_fingerprint"] == manifest["data_fingerprint"]
