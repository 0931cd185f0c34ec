"""Hostile and careless input: special files, outputs over inputs, exports that would delete or escape."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from metal_defect import served as served_model
from metal_defect.cli import main
from metal_defect.serving.images import ImageProblem, read_bytes


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the suite) when the block blocks: a FIFO read without a writer never returns."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def specials(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    zero_link = tmp_path / "zero.jpg"
    zero_link.symlink_to("/dev/zero")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    broken = tmp_path / "gone.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    return {"fifo": fifo, "zero": Path("/dev/zero"), "zero_link": zero_link, "loop": loop, "broken": broken, "folder": tmp_path}


def test_the_reader_refuses_devices_fifos_folders_and_links_to_them_before_reading(specials, tmp_path):
    from metal_defect.serving.images import read_user_file

    reasons = {
        "zero": "not a regular file (a character device)", "zero_link": "not a regular file (a character device)",
        "fifo": "not a regular file (a FIFO)", "folder": "a folder", "broken": "broken symbolic link", "loop": "cannot be read",
    }
    started = time.perf_counter()
    with no_hang():
        for name, reason in reasons.items():
            with pytest.raises(ImageProblem, match=re.escape(reason)):
                read_user_file(specials[name], max_bytes=1000)
    assert time.perf_counter() - started < 5
    good = tmp_path / "ok.bin"
    good.write_bytes(b"x" * 100)
    assert read_user_file(good, 1000) == b"x" * 100
    with pytest.raises(ImageProblem, match="too large"):
        read_user_file(good, 99)
    assert read_bytes(str(good), None) == b"x" * 100  # no limit given: the hard bound still holds
    with pytest.raises(ImageProblem, match="too large"), open("/dev/zero", "rb") as endless:
        read_bytes(endless, 1000)  # a file object is read up to the bound, not to its end


def test_predict_answers_the_good_files_beside_dev_zero_fifos_and_bad_links(tiny, specials, tmp_path):
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    walked = specials["folder"]
    shutil.copy2(good, walked / "good.png")
    out = tmp_path / "answers.csv"
    named = [str(good), "/dev/zero", str(specials["fifo"]), str(specials["zero_link"])]
    with no_hang(60):
        code = main(["predict", *named, str(walked), "--csv", str(out), "--config", str(tiny["folder"])])
    assert code == 3, "named files that cannot be read make exit 3"
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert rows[str(good)]["label"] == "patches" and rows[str(walked / "good.png")]["label"] == "patches"
    for name in named[1:]:
        assert "not a regular file" in rows[name]["error"], rows[name]
    assert str(specials["loop"]) not in rows and str(specials["broken"]) not in rows  # walked: left out, and listed


def test_predict_lists_what_it_left_out_of_a_walked_folder(tiny, specials, capsys):
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    walked = specials["folder"]
    shutil.copy2(good, walked / "good.png")
    with no_hang(60):
        assert main(["predict", str(walked), "--config", str(tiny["folder"])]) == 0
    printed = capsys.readouterr().out
    for name, reason in (("pipe.png", "a FIFO"), ("zero.jpg", "a character device"), ("loop.png", "broken or looping link"),
                         ("gone.png", "broken or looping link")):
        assert f"left out: {walked / name}" in printed and reason in printed, printed


def test_evaluate_leaves_out_special_files_in_the_folder_and_scores_the_rest(tiny, tmp_path):
    folder = tmp_path / "labelled"
    for label in ("crazing", "inclusion", "patches"):
        shutil.copytree(tiny["data"] / label, folder / label)
    (folder / "crazing" / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(folder / "inclusion" / "pipe.png")
    out = tmp_path / "eval"
    with no_hang(120):
        assert main(["evaluate", str(folder), "--config", str(tiny["folder"]), "--out", str(out)]) == 0
    import json

    report = json.loads((out / "metrics.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped_at_ingestion"]}
    assert "a character device" in skipped["zero.jpg"] and "a FIFO" in skipped["pipe.png"]
    assert report["n"] == 72


def _big_png(path: Path, side: int = 6000, mode: str = "L") -> Path:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grey = (np.add.outer(ramp, ramp) / 2).astype(np.uint8)
    Image.fromarray(np.stack([grey, grey.T, grey[::-1]], -1) if mode == "RGB" else grey).save(path)
    return path


def test_a_36_megapixel_image_is_decoded_within_the_work_budget_and_peaks_are_in_its_pixels(tmp_path):
    from metal_defect.serving.images import WORK_MAX_PIXELS, decode_image

    image = decode_image(str(_big_png(tmp_path / "big.png")))
    assert image.size[0] * image.size[1] <= WORK_MAX_PIXELS and image.size == (2000, 2000)
    assert image.info["reduced_by"] == 3.0
    small = decode_image(str(_big_png(tmp_path / "small.png", side=300)))
    assert small.size == (300, 300) and small.info["reduced_by"] == 1.0


def test_answering_and_explaining_a_36_megapixel_png_stays_far_below_a_gigabyte(tiny, tmp_path):
    # was: +3.6 GB peak for one 6000 x 6000 PNG (answer and heatmap at full resolution, float64 copies)
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from metal_defect.serving.predictor import Predictor\n"
        "p = Predictor.from_bundle(Path(sys.argv[1]))\n"
        "p.answer_file(Path(sys.argv[2]).read_bytes(), 'warm-up')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "data = Path(sys.argv[3]).read_bytes()\n"
        "answer = p.answer_file(data, 'big')\n"
        "heat, picture = p.explain(data, answer)\n"
        "print(answer.error, picture.size[0], answer.heat_peak_x, answer.heat_peak_y,"
        " (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    big = _big_png(tmp_path / "big.png", mode="RGB")
    done = subprocess.run([sys.executable, "-c", script, str(tiny["bundle"]), str(good), str(big)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    error, width, x, y, grown = done.stdout.split()[-5:]
    assert error == "None" and width == "2000" and 0 <= int(x) < 6000 and 0 <= int(y) < 6000, done.stdout
    assert int(grown) < 400, f"peak memory grew by {grown} MB"


def test_predict_never_writes_over_its_inputs_or_the_log_and_refuses_impossible_outputs(tiny, tmp_path):
    image = tmp_path / "x.png"
    shutil.copy2(sorted((tiny["data"] / "patches").glob("*.png"))[0], image)
    original = image.read_bytes()
    log = tiny["folder"] / "artifacts" / "predictions.jsonl"
    main(["predict", str(image), "--config", str(tiny["folder"])])  # the log exists
    logged = log.read_bytes()
    config = ["--config", str(tiny["folder"])]
    assert main(["predict", str(image), "--csv", str(image), *config]) == 2
    assert main(["predict", str(image), "--json", str(log), *config]) == 2
    assert image.read_bytes() == original and log.read_bytes() == logged
    assert main(["predict", str(image), "--csv", str(tmp_path), *config]) == 2
    assert main(["predict", str(image), "--csv", "/dev/full", *config]) == 2
    assert main(["predict", str(image), "--heatmaps", str(image), *config]) == 2
    assert image.read_bytes() == original


def test_a_csv_that_cannot_be_finished_leaves_the_earlier_one_whole(tiny, tmp_path, monkeypatch):
    image = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    out = tmp_path / "answers.csv"
    assert main(["predict", str(image), "--csv", str(out), "--config", str(tiny["folder"])]) == 0
    earlier = out.read_bytes()

    def interrupted(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", interrupted)
    assert main(["predict", str(image), str(image), "--csv", str(out), "--config", str(tiny["folder"])]) == 4
    assert out.read_bytes() == earlier and not [p for p in tmp_path.iterdir() if p.name.startswith(".answers")]


def test_a_yaml_alias_bomb_is_refused_at_once(tiny_config):
    from metal_defect.config import load_config
    from metal_defect.errors import ConfigError

    folder = tiny_config()
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (folder / "schema.yaml").write_text((folder / "schema.yaml").read_text() + "\nbomb:\n" + "\n".join("  " + line for line in lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(folder)
    assert time.perf_counter() - started < 5


def test_a_config_file_that_is_a_device_and_system_folders_as_paths_are_refused(tiny_config, tmp_path):
    from metal_defect.config import load_config
    from metal_defect.errors import ConfigError

    folder = tiny_config()
    with pytest.raises(ConfigError, match="system folder"):
        load_config(folder, ["paths.artifacts=/"])
    with pytest.raises(ConfigError, match="system folder"):
        load_config(folder, ["paths.logs=/etc"])
    load_config(folder, [f"paths.artifacts={tmp_path / 'mine'}"])
    (folder / "params.yaml").unlink()
    (folder / "params.yaml").symlink_to("/dev/zero")
    with no_hang(), pytest.raises(ConfigError, match="not a YAML file"):
        load_config(folder)


def test_an_emptied_manifest_or_a_replaced_one_is_an_artifact_error(tiny, tmp_path):
    import json

    from metal_defect.serving import bundle as bundles

    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    spec = json.loads((copy / bundles.SERVING_SPEC).read_text())
    (copy / bundles.SERVING_SPEC).write_text(json.dumps(spec | {"max_image_pixels": 10 ** 12}))
    (copy / bundles.BUNDLE_MANIFEST).write_text(json.dumps({"files": {}}))
    image = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    assert main(["predict", str(image), "--model", str(copy), "--config", str(tiny["folder"])]) == 4
    # the served pointer records the manifest's sha256: a manifest rewritten to match edited files is caught too
    home = tmp_path / "home"
    shutil.copytree(tiny["folder"], home)
    served = json.loads((home / "artifacts" / "served.json").read_text())
    assert len(served["manifest_sha256"]) == 64
    bundle, _ = served_model.served_bundle(__import__("metal_defect.artifacts", fromlist=["x"]).ArtifactStore(home / "artifacts"))
    (bundle / bundles.SERVING_SPEC).write_text(json.dumps(json.loads((bundle / bundles.SERVING_SPEC).read_text()) | {"max_image_pixels": 10 ** 12}))
    bundles.write_manifest(bundle)
    assert main(["predict", str(image), "--config", str(home)]) == 4


def test_promote_takes_run_ids_not_paths(tiny):
    # a path that leads to a real run was served, and served.json then named a folder outside runs/
    assert main(["promote", f"../runs/{tiny['run_id']}", "--config", str(tiny["folder"])]) == 4
    assert main(["promote", "../../../x", "--config", str(tiny["folder"])]) == 4
    assert main(["promote", "/etc", "--config", str(tiny["folder"])]) == 4


def test_export_never_writes_into_the_artifacts_folder(tiny):

    served = served_model.served_bundle(__import__("metal_defect.artifacts", fromlist=["x"]).ArtifactStore(tiny["folder"] / "artifacts"))[0]
    before = {p.name: p.stat().st_mtime_ns for p in served.iterdir()}
    assert main(["export", str(served), "--config", str(tiny["folder"])]) == 4
    assert {p.name: p.stat().st_mtime_ns for p in served.iterdir()} == before


def test_a_foreign_model_file_is_an_artifact_error(tiny, tmp_path):
    import keras

    from metal_defect.serving import bundle as bundles

    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    foreign = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    foreign.save(copy / bundles.MODEL_FILE)
    bundles.write_manifest(copy)
    image = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    assert main(["predict", str(image), "--model", str(copy), "--config", str(tiny["folder"])]) == 4
