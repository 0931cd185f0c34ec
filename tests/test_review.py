"""The review store: flagged and disputed images kept once by sha256, decisions appended under a lock
(two processes lose none), the cap, bad input on every path, and `predict` feeding the queue."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metal_defect import review as review_module
from metal_defect.cli import main
from metal_defect.config import load_config
from metal_defect.errors import ArtifactError, ConfigError, DataError
from metal_defect.review import LABELS_LOG, NOT_VALID, ReviewStore

CLASSES = ["crazing", "inclusion", "patches"]


def png(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def answer(label: str = "crazing", verdict: str = "uncertain", confidence: float = 0.41) -> dict:
    return {"label": label, "verdict": verdict, "confidence": confidence, "model_run": "run-1",
            "probabilities": {"crazing": confidence, "inclusion": 0.35, "patches": 1 - confidence - 0.35}}


def test_an_image_is_kept_once_with_its_name_answer_and_decisions_superseded(tmp_path):
    store = ReviewStore(tmp_path / "review")
    data = png(1)
    assert store.add(data, "/line/a/part 7.png", answer(), why="uncertain", source="cli")[0]
    assert not store.add(data, "/elsewhere/copy.png", answer(), why="uncertain", source="app")[0]  # same bytes: once
    sha = hashlib.sha256(data).hexdigest()
    (item,) = store.items()
    assert (item.sha256, item.name, item.verdict, item.model_run, item.status) == (sha, "part 7.png", "uncertain", "run-1", "unreviewed")
    assert store.image_path(item).read_bytes() == data  # the exact bytes
    store.label(sha[:8], "inclusion", CLASSES, reviewer="Ana")
    store.label(sha[:8], "patches", CLASSES, reviewer="")  # a later decision supersedes; empty name: anonymous
    (item,) = store.items()
    assert item.decision["class"] == "patches" and item.decision["reviewer"] == "anonymous"
    assert [d["class"] for d in store.decisions()] == ["inclusion", "patches"]  # nothing rewritten in place
    assert store.stats()["decisions_by_reviewer"] == {"Ana": 1, "anonymous": 1}


def test_export_writes_class_folders_and_leaves_not_valid_images_out(tmp_path):
    store = ReviewStore(tmp_path / "review")
    for seed, label in ((1, "crazing"), (2, NOT_VALID), (3, None)):
        store.add(png(seed), f"img{seed}.png", answer(), why="out_of_distribution", source="cli")
        if label:
            store.label(hashlib.sha256(png(seed)).hexdigest(), label, CLASSES)
    counts = store.export(tmp_path / "out")
    assert counts == {"crazing": 1}
    (exported,) = (tmp_path / "out" / "crazing").iterdir()
    assert exported.name.startswith("img1_") and exported.read_bytes() == png(1)


def test_the_cap_drops_the_oldest_resolved_first_and_refuses_when_none_is_resolved(tmp_path, caplog):
    store = ReviewStore(tmp_path / "review", max_items=2)
    for seed in (1, 2):
        assert store.add(png(seed), f"{seed}.png", answer(), why="uncertain", source="cli")[0]
    added, message = store.add(png(3), "3.png", answer(), why="uncertain", source="cli")
    assert not added and "2 unreviewed images" in message and "review.max_items" in message
    assert "review queue full" in caplog.text and len(store.items()) == 2  # no unreviewed one dropped
    store.label(hashlib.sha256(png(1)).hexdigest()[:10], "crazing", CLASSES)
    assert store.add(png(3), "3.png", answer(), why="uncertain", source="cli")[0]
    assert sorted(i.name for i in store.items()) == ["2.png", "3.png"]  # the resolved 1.png made room
    assert not (tmp_path / "review" / "images" / f"{hashlib.sha256(png(1)).hexdigest()}.png").exists()
    assert [d["name"] for d in store.decisions()] == ["1.png"]  # its decision stays in the log


def test_the_byte_cap_counts_megabytes(tmp_path):
    store = ReviewStore(tmp_path / "review", max_mb=len(png(1)) * 1.5 / 1e6)
    assert store.add(png(1), "1.png", answer(), why="uncertain", source="cli")[0]
    assert "MB" in store.add(png(2), "2.png", answer(), why="uncertain", source="cli")[1]


def test_bad_input_gets_a_clear_message_and_loses_no_decision(tmp_path, caplog):
    store = ReviewStore(tmp_path / "review")
    store.add(png(1), "1.png", answer(), why="uncertain", source="cli")
    sha = hashlib.sha256(png(1)).hexdigest()
    store.label(sha, "crazing", CLASSES, "Ana")
    with pytest.raises(ConfigError, match=r"unknown class 'rust'.*crazing, inclusion, patches"):
        store.label(sha, "rust", CLASSES)
    with pytest.raises(DataError, match="no queued image has a sha256 starting with 0000000"):
        store.label("0000000", "crazing", CLASSES)
    with pytest.raises(ConfigError, match="not a sha256 prefix"):
        store.label("zz", "crazing", CLASSES)
    with open(tmp_path / "review" / LABELS_LOG, "a") as handle:  # a torn line, then one that is not a record
        handle.write('{"sha256": "abc", "cla\n[1, 2]\n')
    store.add(png(2), "2.png", answer(), why="uncertain", source="cli")
    store.label(hashlib.sha256(png(2)).hexdigest(), "patches", CLASSES, "Bo")
    assert [d["reviewer"] for d in store.decisions()] == ["Ana", "Bo"]
    assert f"{LABELS_LOG} line 2 is not a valid record" in caplog.text


def test_a_full_disk_is_reported_and_the_earlier_decisions_are_kept(tmp_path, monkeypatch):
    store = ReviewStore(tmp_path / "review")
    store.add(png(1), "1.png", answer(), why="uncertain", source="cli")
    sha = hashlib.sha256(png(1)).hexdigest()
    store.label(sha, "crazing", CLASSES, "Ana")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(review_module.os, "write", full)
    with pytest.raises(ArtifactError, match=r"No space left on device.*earlier entries are kept"):
        store.label(sha, "patches", CLASSES, "Bo")
    monkeypatch.undo()
    assert [d["class"] for d in store.decisions()] == ["crazing"]


def _label_many(root: str, sha: str, reviewer: str, count: int) -> None:
    store = ReviewStore(Path(root))
    for index in range(count):
        store.label(sha, CLASSES[index % 3], CLASSES, reviewer)


def test_two_processes_appending_200_decisions_each_lose_none(tmp_path):
    store = ReviewStore(tmp_path / "review")
    store.add(png(1), "1.png", answer(), why="uncertain", source="cli")
    sha = hashlib.sha256(png(1)).hexdigest()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_label_many, args=(str(tmp_path / "review"), sha, name, 200)) for name in ("Ana", "Bo")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    lines = (tmp_path / "review" / LABELS_LOG).read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["sha256"] == sha for line in lines)
    assert store.stats()["decisions_by_reviewer"] == {"Ana": 200, "Bo": 200}


# ----------------------------------------------------------------------------- predict feeds the queue
def unlike_training(folder: Path) -> list[Path]:
    """Images nothing like the synthetic training set (noise, a flat gradient, a colour photo-like field)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"noise.png": Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
              "gradient.png": Image.linear_gradient("L").resize((32, 32)),
              "colour.png": Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB"),
              "dark.png": Image.new("L", (48, 48), 3)}
    for name, image in images.items():
        image.save(folder / name)
    return sorted(folder.iterdir())


def test_predict_queues_each_flagged_image_by_its_name_and_no_review_adds_nothing(tiny, tmp_path, monkeypatch):
    from metal_defect import commands

    monkeypatch.delenv(review_module.NO_REVIEW_ENV, raising=False)
    files = unlike_training(tmp_path / "odd")
    config = load_config(tiny["folder"], [f"paths.review={tmp_path / 'review'}"])
    text, _ = commands.predict(config, [str(tmp_path / "odd")], None, None, None, None)
    flagged = [line.split()[0] for line in text.splitlines()[2:2 + len(files)] if line.split()[1] in ("uncertain", "out_of_distribution")]
    assert len(flagged) >= 2, text
    items = ReviewStore(tmp_path / "review").items()
    assert sorted(i.name for i in items) == sorted(flagged) and all(i.source == "cli" and i.verdict in ("uncertain", "out_of_distribution") for i in items)
    assert f"{len(flagged)} of {len(flagged)} flagged images queued for review" in text

    quiet = load_config(tiny["folder"], [f"paths.review={tmp_path / 'quiet'}"])
    commands.predict(quiet, [str(tmp_path / "odd")], None, None, None, None, review=False)
    monkeypatch.setenv(review_module.NO_REVIEW_ENV, "1")
    commands.predict(quiet, [str(tmp_path / "odd")], None, None, None, None)
    assert not (tmp_path / "quiet").exists() or ReviewStore(tmp_path / "quiet").items() == []


def test_review_cli_lists_labels_exports_and_counts(tmp_path, capsys):
    from conftest import write_config

    folder = write_config(tmp_path / "cfg", {"tuning": {"enabled": False}})
    store = ReviewStore(load_config(folder).paths.review_root)
    store.add(png(5), "tile 5.png", answer(verdict="out_of_distribution"), why="out_of_distribution", source="app")
    sha = hashlib.sha256(png(5)).hexdigest()
    assert main(["review", "list", "--config", str(folder)]) == 0
    listed = capsys.readouterr().out
    assert "tile 5.png" in listed and "out_of_distribution" in listed and "unreviewed" in listed and sha[:12] in listed
    assert main(["review", "label", sha[:8], "inclusion", "--by", "Ana", "--config", str(folder)]) == 0
    assert "tile 5.png" in capsys.readouterr().out
    assert main(["review", "label", sha[:8], "rust", "--config", str(folder)]) != 0  # an unknown class: a clear error, no traceback
    assert main(["review", "list", "--config", str(folder)]) == 0
    assert "labelled inclusion" in capsys.readouterr().out
    assert main(["review", "export", str(tmp_path / "export"), "--config", str(folder)]) == 0
    assert len(list((tmp_path / "export" / "inclusion").iterdir())) == 1
    capsys.readouterr()
    assert main(["review", "stats", "--config", str(folder)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 1 and stats["unreviewed"] == 0 and stats["labelled"] == {"inclusion": 1}


# ----------------------------------------------------------------------------- history and the rotated log
def test_the_history_counts_answers_per_day_by_verdict_within_its_window_across_rotated_logs(tmp_path):
    import datetime as dt

    from metal_defect.history import daily_verdicts
    from metal_defect.serving.predictor import append_log, rotate_log

    log = tmp_path / "predictions.jsonl"
    today = dt.date(2026, 12, 3)

    def line(day: str, verdict: str | None) -> str:
        return json.dumps({"time": f"{day}T10:00:00+00:00", "source": "cli", "file": "a.png", "verdict": verdict}) + "\n"

    log.write_text(line("2026-08-01", "crazing") + line("2026-12-01", "crazing") + line("2026-12-01", "uncertain"))
    assert rotate_log(log, rotate_mb=1e-6) and (tmp_path / "predictions.jsonl.1").is_file() and not log.exists()
    log.write_text(line("2026-12-03", "out_of_distribution") + line("2026-12-03", "patches") + line("2026-12-03", None) + "not json\n")
    frame = daily_verdicts(log, days=90, today=today)
    assert [d.date().isoformat() for d in frame.index] == ["2026-12-01", "2026-12-03"]  # 2026-08-01 is outside the window
    assert frame.loc["2026-12-01", "answered"] == 1 and frame.loc["2026-12-01", "uncertain"] == 1
    assert frame.loc["2026-12-03", "out_of_distribution"] == 1 and frame.loc["2026-12-03", "unreadable"] == 1
    assert frame.loc["2026-12-01", "flagged_share"] == 0.5 and abs(frame.loc["2026-12-03", "flagged_share"] - 1 / 3) < 1e-9
    # append_log rotates past its size: .1 moves to .2, the new answers start a fresh file
    from metal_defect.serving.predictor import Answer

    append_log(log, [Answer(path="b.png", label="crazing", verdict="crazing")], source="cli", rotate_mb=1e-6)
    assert (tmp_path / "predictions.jsonl.2").is_file() and len(log.read_text().splitlines()) == 1


def test_the_history_counts_only_whole_lines_and_reads_a_grown_log_from_where_it_stopped(tmp_path):
    from metal_defect import history

    log = tmp_path / "predictions.jsonl"

    def line(verdict: str) -> str:
        return json.dumps({"time": "2026-12-03T10:00:00+00:00", "source": "app", "file": "a.png", "verdict": verdict}) + "\n"

    log.write_text(line("crazing") + line("uncertain"))
    assert history.file_counts(log) == {("2026-12-03", "crazing"): 1, ("2026-12-03", "uncertain"): 1}
    half = line("uncertain")[:30]
    with open(log, "a") as handle:
        handle.write(line("out_of_distribution") + half)  # the last line is still being written
    counts = history.file_counts(log)
    assert counts[("2026-12-03", "out_of_distribution")] == 1 and counts[("2026-12-03", "uncertain")] == 1
    assert history._COUNTED[str(log)][1] == log.stat().st_size - len(half)  # read up to the last whole line, not again
    with open(log, "a") as handle:
        handle.write(line("uncertain")[30:])
    assert history.file_counts(log)[("2026-12-03", "uncertain")] == 2
    log.write_text(line("patches"))  # replaced by a shorter file (rotated and started again): counted afresh
    assert history.file_counts(log) == {("2026-12-03", "patches"): 1}


def test_review_add_queues_images_as_disputed_with_their_true_class_and_labels_them(tiny, tmp_path, capsys):
    files = sorted(Path(tiny["data"]).rglob("*.png"))[:2]
    review = tmp_path / "review"
    home = write_config_for(tiny, review)
    assert main(["review", "add", *map(str, files), "--label", "inclusion", "--by", "Bo", "--config", str(home)]) == 0
    out = capsys.readouterr().out
    assert all(f"{f.name}: labelled inclusion (the model said" in out for f in files)
    items = ReviewStore(review).items()
    assert sorted(i.name for i in items) == sorted(f.name for f in files)
    assert all(i.why == "disputed" and i.user_class == "inclusion" and i.decision["class"] == "inclusion" and i.decision["reviewer"] == "Bo"
               for i in items)
    assert main(["review", "add", str(files[0]), "--label", "rust", "--config", str(home)]) != 0  # not a class of the model


def write_config_for(tiny: dict, review: Path) -> Path:
    from conftest import write_config

    return write_config(review.parent / "home", config={"paths": {"artifacts": str(tiny["folder"] / "artifacts"), "review": str(review)}})
