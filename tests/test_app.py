"""The Streamlit page: AppTest in-process, then a real browser (Chromium through Playwright)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_config
from PIL import Image

from metal_defect.serving import bundle as bundles

APP = str(REPO / "st_app_predict.py")
CHROMIUM = Path("/usr/bin/chromium")


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _app(monkeypatch, home: Path, bundle: Path | None = None, log: Path | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("METAL_DEFECT_HOME", str(home))
    if bundle is None:
        monkeypatch.delenv(bundles.BUNDLE_ENV, raising=False)
    else:
        monkeypatch.setenv(bundles.BUNDLE_ENV, str(bundle))
    if log is not None:
        monkeypatch.setenv("METAL_DEFECT_PREDICTIONS_LOG", str(log))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _text(at) -> str:
    parts = [e.value for kind in ("markdown", "success", "warning", "error", "info", "caption", "subheader", "title") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _soft_bundle(tiny, tmp_path: Path, **changes) -> Path:
    """A copy of the tiny bundle with spec changes (e.g. a high temperature so confidences are not all 1.0)."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    spec = bundles.read_spec(copy)
    bundles.write_spec(copy, dataclasses.replace(spec, **changes))
    bundles.write_manifest(copy)
    return copy


def test_empty_state_says_how_to_get_a_model(monkeypatch, tmp_path):
    home = write_config(tmp_path / "cfg")
    at = _app(monkeypatch, home)
    assert "No trained model yet" in _text(at) and "python main.py" in _text(at)


def test_upload_is_answered_and_logged_and_bad_files_get_a_message(monkeypatch, tiny, tmp_path):
    at = _app(monkeypatch, tiny["folder"])
    assert tiny["run_id"] in at.sidebar.selectbox[0].value
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    log = tiny["folder"] / "artifacts" / "predictions.jsonl"
    before = len(log.read_text().splitlines()) if log.is_file() else 0
    at.file_uploader[0].set_value([(good.name, _png(good), "image/png"), ("notes.png", b"not an image at all", "image/png"),
                                   ("empty.png", b"", "image/png")]).run()
    assert not at.exception, at.exception
    assert any("patches" in s.value and "confidence" in s.value for s in at.success)
    errors = "\n".join(e.value for e in at.error)
    assert "notes.png" in errors and "not an image" in errors and "empty.png" in errors
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 3
    entries = [json.loads(line) for line in log.read_text().splitlines()[before:]]
    assert [e["file"] for e in entries] == [good.name, "notes.png", "empty.png"] and entries[0]["label"] == "patches"
    at.run()  # a rerun (any widget change) does not log the same answers again
    assert len(log.read_text().splitlines()) == before + 3


def test_threshold_slider_changes_the_verdict_of_a_borderline_image(monkeypatch, tiny, tmp_path):
    from metal_defect.serving.predictor import Predictor

    image = sorted((tiny["data"] / "inclusion").glob("*.png"))[0]
    # a temperature that softens the tiny model's near-certain answer into a borderline one
    for temperature in (2.0, 4.0, 8.0, 16.0, 32.0):
        bundle = _soft_bundle(tiny, tmp_path / str(temperature), temperature=temperature, uncertain_threshold=0.0)
        confidence = Predictor.from_bundle(bundle).answer_file(image).confidence
        if confidence < 0.95:
            break
    assert 0.4 < confidence < 0.95
    at = _app(monkeypatch, tiny["folder"], bundle)
    assert at.sidebar.selectbox[0].value.startswith("bundle")
    at.file_uploader[0].set_value((image.name, _png(image), "image/png")).run()
    assert any("inclusion" in s.value for s in at.success) and not at.warning
    at.sidebar.slider[0].set_value(round(min(confidence + 0.05, 1.0), 2)).run()
    assert not at.success and any("Not sure" in w.value and "inclusion" in w.value for w in at.warning)


def test_weak_model_is_announced_before_any_answer(monkeypatch, tiny, tmp_path):
    bundle = _soft_bundle(tiny, tmp_path, weak_model=True, weak_reasons=("underfits: accuracy 0.500 on its own training images",))
    at = _app(monkeypatch, tiny["folder"], bundle)
    assert at.error and "Weak model" in at.error[0].value and "underfits" in at.error[0].value


def test_colour_image_for_a_grayscale_model_is_flagged_in_words(monkeypatch, tiny):
    at = _app(monkeypatch, tiny["folder"])
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 230
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    at.file_uploader[0].set_value(("red.png", buffer.getvalue(), "image/png")).run()
    assert any("Not like the training images" in e.value and "colour" in e.value for e in at.error)


def test_memory_stays_flat_over_many_uploads(monkeypatch, tiny):
    # measured 2026-12-07: 920 -> 923 MB from the 10th to the 50th upload (0.09 MB an upload); the bound
    # is 2 MB an upload over the last 15
    import psutil

    at = _app(monkeypatch, tiny["folder"])
    files = sorted(p for label in ("crazing", "inclusion", "patches") for p in (tiny["data"] / label).glob("*.png"))
    process = psutil.Process()
    rss = {}
    for i in range(1, 26):
        path = files[i % len(files)]
        # a different file each time (the same picture with one pixel changed), like a stream of new uploads
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = i
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        at.file_uploader[0].set_value((f"upload_{i}.png", buffer.getvalue(), "image/png")).run()
        assert not at.exception
        if i in (10, 25):
            rss[i] = process.memory_info().rss / 1e6
    assert rss[25] - rss[10] < 30, rss


def _png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_image_is_shown_and_answered(monkeypatch, tiny):
    # the page crashed: "cannot write mode I;16 as JPEG" at st.image, and the images after it were not shown
    at = _app(monkeypatch, tiny["folder"])
    deep = (np.asarray(Image.open(sorted((tiny["data"] / "patches").glob("*.png"))[0]), dtype=np.uint16) * 257).astype(np.uint16)
    good = sorted((tiny["data"] / "crazing").glob("*.png"))[0]
    at.file_uploader[0].set_value([("gray16.png", _png_of(deep), "image/png"), (good.name, _png(good), "image/png")]).run()
    assert not at.exception, at.exception
    assert "2 images: " in _text(at) and "0 unreadable" in _text(at)
    assert len(at.get("image")) >= 4, "both images and their heatmaps are on the page"


def test_web_users_cannot_type_a_server_folder_unless_the_operator_allows_it(monkeypatch, tiny):
    at = _app(monkeypatch, tiny["folder"])
    assert "a bundle folder…" not in at.sidebar.selectbox[0].options
    monkeypatch.setenv("METAL_DEFECT_ALLOW_BUNDLE_PATHS", "1")
    at = _app(monkeypatch, tiny["folder"])
    assert "a bundle folder…" in at.sidebar.selectbox[0].options


def test_file_names_are_shown_as_text_not_markdown(monkeypatch, tiny):
    at = _app(monkeypatch, tiny["folder"])
    name = "![x](http://127.0.0.1:9/x.png)**bold**.png"
    at.file_uploader[0].set_value((name, b"not an image", "image/png")).run()
    shown = "\n".join(e.value for e in at.error)
    assert "![x](" not in shown and "**bold**" not in shown and "\\!\\[x\\]\\(" in shown, shown


def test_a_broken_served_pointer_still_serves_the_configured_bundle(monkeypatch, tiny, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny["folder"], home)
    (home / "artifacts" / "served.json").write_text("{ not json")
    at = _app(monkeypatch, home, tiny["bundle"])
    assert any("pointer cannot be read" in w.value for w in at.sidebar.warning)
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    at.file_uploader[0].set_value((good.name, _png(good), "image/png")).run()
    assert not at.exception and any("patches" in s.value for s in at.success)
    assert "Traceback" not in _text(at)


# ----------------------------------------------------------------------------- a real browser
@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it with apt-get)")
def test_a_person_uploads_images_in_chromium_and_reads_the_answers(tiny, tmp_path):
    from metal_defect.screenshot import capture

    env = dict(os.environ, METAL_DEFECT_HOME=str(tiny["folder"]))
    env.pop(bundles.BUNDLE_ENV, None)
    image = sorted((tiny["data"] / "crazing").glob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but nothing after")
    shot = REPO / "artifacts" / "screenshots" / "browser-test.png"
    result = capture([image, broken], shot, env, wait_for="could not be read")
    body = result["text"]
    assert "crazing" in body and re.search(r"confidence \d+\.\d%", body), body[:2000]
    assert "broken.png could not be read" in body and "not an image" in body
    assert "Traceback" not in body and shot.stat().st_size > 10_000
    print(f"answers shown {result['seconds']:.2f} s after the upload; screenshot {shot}")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it with apt-get)")
def test_two_sessions_uploading_36_megapixel_pngs_keep_the_server_under_300_mb_more(tiny, tmp_path):
    # was: one 6000 x 6000 PNG raised the server from 881 to 2,408 MB, three at once peaked at 4.85 GB
    import threading
    import time

    import psutil
    from playwright.sync_api import sync_playwright

    from metal_defect.screenshot import CHROMIUM_ARGS, free_port, start_app

    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    grey = (np.add.outer(ramp, ramp) / 2).astype(np.uint8)
    uploads = []
    for i in range(3):
        path = tmp_path / f"big_{i}.png"
        Image.fromarray(np.stack([np.roll(grey, 100 * i, axis=0), grey.T, grey[::-1]], -1)).save(path)
        uploads.append(str(path))
    env = dict(os.environ, METAL_DEFECT_HOME=str(tiny["folder"]))
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"):
        env.pop(name, None)  # the launcher sets them
    env.pop(bundles.BUNDLE_ENV, None)
    port = free_port()
    server = start_app(env, port)
    process = psutil.Process(server.pid)
    peak, sampling = [0.0], [True]

    def sample() -> None:
        while sampling[0]:
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 1e6)
            time.sleep(0.05)

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            pages = [browser.new_context().new_page() for _ in range(2)]
            for page in pages:
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.get_by_text("Images of steel surfaces").wait_for(timeout=90_000)
            # a server that has answered once (its serving graph and heatmap model are built on first use)
            small = sorted((tiny["data"] / "patches").glob("*.png"))[0]
            warm = browser.new_context().new_page()
            warm.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            warm.locator("input[type=file]").set_input_files([str(small)])
            warm.wait_for_function("document.body.innerText.includes('where it looked')", timeout=90_000)
            time.sleep(2)
            baseline = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 1e6
            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            for page in pages:
                page.locator("input[type=file]").set_input_files(uploads)
            texts = []
            for page in pages:
                page.wait_for_function("document.body.innerText.includes('3 images:')", timeout=180_000)
                page.wait_for_function("!document.body.innerText.includes('Running...')", timeout=180_000)
                texts.append(page.inner_text("body"))
            sampling[0] = False
            watcher.join()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for text in texts:
        assert re.search(r"3 images: \d answered, \d flagged, 0 unreadable", text), text[:1500]
        assert "Traceback" not in text
    assert peak[0] - baseline < 300, f"server memory {baseline:.0f} MB -> peak {peak[0]:.0f} MB"
    print(f"server memory {baseline:.0f} MB -> peak {peak[0]:.0f} MB over two sessions of three 36 MP uploads")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it with apt-get)")
def test_flagged_uploads_labelled_on_the_review_page_keep_the_reviewer_and_the_next_run_learns_them(tiny, tmp_path):
    from playwright.sync_api import sync_playwright

    from metal_defect.cli import main
    from metal_defect.review import LABELS_LOG, ReviewStore
    from metal_defect.screenshot import CHROMIUM_ARGS, free_port, start_app

    home = write_config(tmp_path / "home", config={"paths": {"artifacts": str(tiny["folder"] / "artifacts"), "review": str(tmp_path / "review")}})
    rng = np.random.default_rng(0)
    odd = {"noise.png": Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)), "grain.png": Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)),
           "colour.png": Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB")}
    for name, image in odd.items():
        image.save(tmp_path / name)
    env = dict(os.environ, METAL_DEFECT_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop(bundles.BUNDLE_ENV, None)
    env.pop("METAL_DEFECT_NO_REVIEW", None)
    port = free_port()
    server = start_app(env, port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.get_by_text("Images of steel surfaces").first.wait_for(timeout=90_000)
            page.locator("input[type=file]").set_input_files([str(tmp_path / n) for n in odd])
            page.wait_for_function("document.body.innerText.includes('3 images:')", timeout=90_000)
            page.wait_for_function("!document.body.innerText.includes('Running...')", timeout=90_000)
            queued = ReviewStore(tmp_path / "review").items()
            assert len(queued) >= 2, page.inner_text("body")[:2000]  # the model flags most of these
            page.get_by_role("link", name="Review").click()
            reviewer = page.get_by_role("textbox", name="Reviewer")
            reviewer.wait_for(timeout=60_000)
            reviewer.fill("Ana")
            reviewer.press("Enter")
            for remaining in range(len(queued), 0, -1):  # each decision brings the next image at once
                page.get_by_text(f"({remaining} to go)").first.wait_for(timeout=60_000)
                page.wait_for_function("!document.body.innerText.includes('Running...')", timeout=60_000)
                page.get_by_role("button", name="inclusion", exact=True).click()
            page.get_by_text("Nothing left to review").wait_for(timeout=60_000)
            page.get_by_text("History").first.wait_for(timeout=60_000)
            page.screenshot(path=str(REPO / "artifacts" / "screenshots" / "review-page.png"))
            assert "Traceback" not in page.inner_text("body")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    decisions = [json.loads(line) for line in (tmp_path / "review" / LABELS_LOG).read_text().splitlines()]
    assert sorted(d["name"] for d in decisions) == sorted(i.name for i in queued)
    assert all(d["reviewer"] == "Ana" and d["class"] == "inclusion" for d in decisions)
    listing = tmp_path / "listing.txt"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["review", "list", "--config", str(home)]) == 0
    listing.write_text(out.getvalue())
    assert all("labelled inclusion" in line and "Ana" in line for line in out.getvalue().splitlines()[1:]), out.getvalue()

    # the next run trains on them: the model it serves answers the labelled images that went to training with their class
    from metal_defect import served as served_model
    from metal_defect.artifacts import ArtifactStore
    from metal_defect.config import load_config
    from metal_defect.pipeline import Runner
    from metal_defect.review import REVIEWED_SPLIT, reviewed_split
    from metal_defect.serving.predictor import Predictor

    config = load_config(tiny["folder"], [f"paths.artifacts={tmp_path / 'next'}", f"paths.review={tmp_path / 'review'}", "train.epochs=24"])
    manifest = Runner(config).run()
    assert manifest["status"] == "succeeded"
    predictor = Predictor.from_bundle(served_model.resolve_bundle(ArtifactStore(tmp_path / "next"), None))
    trained_on = [i for i in queued if reviewed_split(i.sha256) == "train"]
    assert trained_on, "every labelled image fell in the reviewed slice"
    answers = predictor.answer_paths([str(ReviewStore(tmp_path / "review").image_path(i)) for i in trained_on])
    assert [a.label for a in answers] == ["inclusion"] * len(trained_on), [(a.label, a.verdict) for a in answers]
    held = [i for i in queued if reviewed_split(i.sha256) == REVIEWED_SPLIT]
    assert manifest["metrics"].get("reviewed_n", 0) == len(held)


def test_this_answer_is_wrong_puts_the_image_in_the_review_queue_with_the_users_class(monkeypatch, tiny, tmp_path):
    from metal_defect.review import ReviewStore

    home = write_config(tmp_path / "home", config={"paths": {"artifacts": str(tiny["folder"] / "artifacts"), "review": str(tmp_path / "review")}})
    at = _app(monkeypatch, home)
    good = sorted((tiny["data"] / "patches").glob("*.png"))[0]
    at.file_uploader[0].set_value([(good.name, _png(good), "image/png")]).run()
    assert not at.exception, at.exception
    label = next(s.value for s in at.success if "confidence" in s.value).split("**")[1]
    other = next(c for c in ("crazing", "inclusion", "patches") if c != label)
    sha = hashlib.sha256(_png(good)).hexdigest()
    at.selectbox(key=f"dispute-class-{sha}").set_value(other).run()
    at.button(key=f"dispute-{sha}").click().run()
    assert not at.exception, at.exception
    (item,) = ReviewStore(tmp_path / "review").items()
    assert (item.name, item.why, item.user_class, item.label) == (good.name, "disputed", other, label)
    assert any("queued for review" in s.value for s in at.success)

