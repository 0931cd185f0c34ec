"""Integrity of the runner and the data stages: reuse only what is intact, recover from broken state,
report usage errors as such, and keep the screen clean. One test (or a few) per failure found by probing."""

from __future__ import annotations

import ast
import contextlib
import http.server
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_SCHEMA, write_config
from PIL import Image
from toy_stages import TOY_STAGES

from metal_defect import pipeline, synthetic
from metal_defect import served as served_model
from metal_defect.artifacts import ArtifactStore, read_json
from metal_defect.cli import main
from metal_defect.components import c01_data_ingestion as c01
from metal_defect.components import c02_data_preprocessing as c02
from metal_defect.config import load_config
from metal_defect.errors import ConfigError, DataError
from metal_defect.pipeline import STAGES, Runner, Stage

TESTS = Path(__file__).resolve().parent


def _record(manifest: dict, stage: str) -> dict:
    return read_json(Path(manifest["stages"][stage]["output"]) / "_stage.json")


# ----------------------------------------------------------------------------- 1. downstream depends on content
def test_forcing_an_unchanged_stage_or_changing_only_its_figures_keeps_its_content_hash(tiny_config):
    folder = tiny_config()
    first = Runner(load_config(folder)).run("1-2")
    forced = Runner(load_config(folder)).run("1-2", force=["data_preprocessing"])
    assert not forced["stages"]["data_preprocessing"]["reused"]
    assert _record(forced, "data_preprocessing")["output_hash"] == _record(first, "data_preprocessing")["output_hash"]
    fewer_samples = Runner(load_config(folder, ["data_preprocessing.eda_samples_per_class=1"])).run("1-2")
    assert fewer_samples["stages"]["data_preprocessing"]["fingerprint"] != first["stages"]["data_preprocessing"]["fingerprint"]
    assert _record(fewer_samples, "data_preprocessing")["output_hash"] == _record(first, "data_preprocessing")["output_hash"]
    # and a stage reading it is reused rather than recomputed
    stages = (*STAGES[:2], Stage("reader", "toy_stages:reader", upstream=("data_preprocessing",)))
    Runner(load_config(folder), stages).run()
    again = Runner(load_config(folder), stages).run(force=["data_preprocessing"])
    assert again["stages"]["reader"]["reused"] and not again["stages"]["data_preprocessing"]["reused"]


def test_code_chain_is_read_from_imports_without_importing_tensorflow():
    script = ("import sys; from metal_defect import pipeline; "
              "chains = {s.name: pipeline.code_chain(s) for s in pipeline.STAGES}; "
              "[pipeline.code_fingerprint(s) for s in pipeline.STAGES]; "
              "import json; print(json.dumps({'chains': chains, 'tf': 'tensorflow' in sys.modules or 'keras' in sys.modules}))")
    result = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    chains = result["chains"]
    assert result["tf"] is False
    assert "metal_defect.plots" in chains["data_preprocessing"]  # the module the hand-kept list missed
    for module in ("c03_dataset_loader", "c04_model_builder", "c05_callbacks"):
        assert f"metal_defect.components.{module}" in chains["train"]
    for module in ("metal_defect.metrics", "metal_defect.plots", "metal_defect.serving.predictor", "metal_defect.config"):
        assert module in chains["evaluation"]
    assert "metal_defect.components.c06_training" not in chains["data_ingestion"]


def test_a_change_to_an_imported_helper_changes_the_stage_fingerprint(tmp_path, monkeypatch):
    package = tmp_path / "pkgroot" / "metal_defect_probe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("VALUE = 1\n")
    (package / "stage.py").write_text("def go(io, *, base):\n    from .helper import VALUE\n    return {'v': VALUE}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    monkeypatch.setattr(pipeline, "PACKAGE", "metal_defect_probe")
    stage = Stage("probe", "metal_defect_probe.stage:go", sections=("base",))
    assert "metal_defect_probe.helper" in pipeline.code_chain(stage)
    before = pipeline.code_fingerprint(stage)
    (package / "helper.py").write_text("VALUE = 2\n")
    assert pipeline.code_fingerprint(stage) != before


def test_readme_lists_each_stage_code_chain():
    readme = (REPO / "README.md").read_text()
    for stage in STAGES:
        line = next((ln for ln in readme.splitlines() if ln.startswith(f"| `{stage.name}` | `")), None)
        assert line is not None, f"README: no code-chain row for {stage.name}"
        listed = {m.strip(" `") for m in line.split("|")[2].split(",")}
        assert listed == {m.removeprefix("metal_defect.") for m in pipeline.code_chain(stage)}, stage.name


# ----------------------------------------------------------------------------- 2. verify before reuse
PACKAGE_DIR = REPO / "src" / "metal_defect"
ENTRY_POINTS = {"run_stage", "select_stage", "publish"}


def _modules(folder: Path) -> dict[str, Path]:
    return {"metal_defect." + ".".join(p.relative_to(PACKAGE_DIR).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(folder.rglob("*.py"))}


def test_every_stage_runs_from_its_own_stage_script_and_no_component_holds_an_entry_point():
    for number, stage in enumerate(STAGES, 1):
        assert stage.target.startswith(f"metal_defect.stages.s{number}_"), stage.target
        stage.resolve()  # it exists
    for module, path in _modules(PACKAGE_DIR / "components").items():
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert not defined & ENTRY_POINTS, f"{module} defines the stage entry point(s) {defined & ENTRY_POINTS}"


def test_serving_imports_nothing_from_components_or_stages_and_names_no_stage():
    stage_names = {s.name for s in STAGES}
    for module, path in _modules(PACKAGE_DIR / "serving").items():
        inside = pipeline._module_imports(module)[0]
        assert not [m for m in inside if m.startswith(("metal_defect.components", "metal_defect.stages", "metal_defect.pipeline"))], module
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & stage_names, f"{module} names the stage(s) {strings & stage_names}"


def test_no_source_file_is_over_550_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE_DIR.rglob("*.py") if (n := len(p.read_text().splitlines())) > 550}
    assert not long


def test_the_stages_reports_are_the_names_their_stages_write():
    from metal_defect.stages import s5_tune

    reports = {s.name: s.reports for s in STAGES}
    assert reports["data_preprocessing"] == (f"{c02.EDA_DIR}/",)
    assert reports["tune"] == (s5_tune.TRIALS_PLOT,)
    assert {name for name, r in reports.items() if r} == {"data_preprocessing", "tune"}


def test_damaged_finished_output_is_reported_and_recomputed(tiny_config, caplog):
    folder = tiny_config()
    first = Runner(load_config(folder)).run("1-2")
    prepared = Path(first["stages"]["data_preprocessing"]["output"])
    pngs = sorted(prepared.glob("images/train/*/*.png"))[:3]
    for png in pngs:
        png.unlink()
    (prepared / "class_labels.json").write_text("{ not json")
    again = Runner(load_config(folder)).run("1-2")
    assert again["stages"]["data_ingestion"]["reused"] and not again["stages"]["data_preprocessing"]["reused"]
    assert "does not match its record" in caplog.text and "3 file(s) missing" in caplog.text
    assert all(p.is_file() for p in pngs) and json.loads((prepared / "class_labels.json").read_text())["classes"]
    assert Runner(load_config(folder)).run("1-2")["stages"]["data_preprocessing"]["reused"]


def test_same_size_corruption_is_caught_by_the_content_hash(tiny_config):
    folder = tiny_config()
    first = Runner(load_config(folder)).run("1-2")
    labels = Path(first["stages"]["data_preprocessing"]["output"]) / "class_labels.json"
    text = labels.read_text()
    labels.write_text(text.replace("crazing", "crazinG"))
    assert not Runner(load_config(folder)).run("1-2")["stages"]["data_preprocessing"]["reused"]
    assert labels.read_text() == text


# ----------------------------------------------------------------------------- 3. downloads
class _Server:
    """A local HTTP server on 127.0.0.1 whose answers the test sets per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}  # path -> (body, Content-Length to announce: None = true, -1 = none)
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, announced = routes[self.path]
                self.send_response(200)
                if announced != -1:  # -1: no Content-Length at all, the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body) if announced is None else announced))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # the client stopped reading (a size limit): expected
                    self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.stop()


def _zip_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _ingest_url(url: str, tmp_path: Path, **params: object) -> list:
    config = load_config(write_config(tmp_path / "cfg", {"data_ingestion": {"source": url, **params}}, TINY_SCHEMA))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    items, _, _ = c01.ingest(config.data_ingestion, config.schema, out, tmp_path / "cache")
    return items


def test_download_cut_short_is_not_cached_and_the_next_try_succeeds(server, tmp_path):
    body = _zip_of(synthetic.make_dataset(tmp_path / "data", per_class=3))
    server.routes["/data.zip"] = (body[: len(body) // 2], len(body))  # half the bytes under the full Content-Length
    with pytest.raises(DataError, match="cut short"):
        _ingest_url(server.url("/data.zip"), tmp_path)
    assert not any((tmp_path / "cache").glob("*data.zip*"))  # nothing half-written is kept
    server.routes["/data.zip"] = (body, None)
    assert len(_ingest_url(server.url("/data.zip"), tmp_path)) == 9
    assert len(_ingest_url(server.url("/data.zip"), tmp_path)) == 9
    assert server.hits["/data.zip"] == 2  # the complete download is reused from the cache


def test_a_cached_file_that_cannot_be_used_is_fetched_once_more(server, tmp_path):
    body = _zip_of(synthetic.make_dataset(tmp_path / "data", per_class=3))
    server.routes["/data.zip"] = (body, None)
    assert len(_ingest_url(server.url("/data.zip"), tmp_path)) == 9
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith("data.zip")]
    cached.write_bytes(body[: len(body) // 2])  # damaged on disk after a complete download
    assert len(_ingest_url(server.url("/data.zip"), tmp_path)) == 9
    assert server.hits["/data.zip"] == 2 and cached.read_bytes() == body


def test_download_size_limit_stops_early(server, tmp_path):
    big = os.urandom(3 * 1024 * 1024)
    server.routes["/big.zip"] = (big, None)
    with pytest.raises(DataError, match="max_download_mb"):
        _ingest_url(server.url("/big.zip"), tmp_path, max_download_mb=1)
    server.routes["/unannounced.zip"] = (big, -1)  # no Content-Length: stopped while streaming
    with pytest.raises(DataError, match="download stopped after"):
        _ingest_url(server.url("/unannounced.zip"), tmp_path, max_download_mb=1)
    assert not list((tmp_path / "cache").iterdir())


def test_download_checks_the_sha256_when_given(server, tmp_path):
    body = _zip_of(synthetic.make_dataset(tmp_path / "data", per_class=3))
    server.routes["/data.zip"] = (body, None)
    with pytest.raises(DataError, match="expected 0000"):
        _ingest_url(server.url("/data.zip"), tmp_path, sha256="0" * 64)
    assert not list((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- 4. broken partial state
def test_force_discards_the_stage_partial_state(tmp_path, monkeypatch):
    folder = write_config(tmp_path / "cfg")
    monkeypatch.setenv("TOY_INTERRUPT_AT", "2")
    with pytest.raises(KeyboardInterrupt):
        Runner(load_config(folder), TOY_STAGES).run()
    monkeypatch.delenv("TOY_INTERRUPT_AT")
    manifest = Runner(load_config(folder), TOY_STAGES).run(force=["second"])
    assert manifest["stages"]["second"]["summary"]["resumed_from"] == 0  # started again, not resumed


def test_unreadable_training_state_is_discarded_and_training_goes_on(tiny_config, monkeypatch, caplog):
    import keras
    from conftest import tiny_training_params

    from metal_defect.components import c03_dataset_loader as c03
    from metal_defect.components import c05_callbacks, c06_training

    folder = tiny_config(tiny_training_params(epochs=3))
    config = load_config(folder)
    prepared = Path(Runner(config).run("1-2")["stages"]["data_preprocessing"]["output"])
    data = c03.build_datasets(prepared, config.data_loader, config.base.seed)

    class StopAfterSecondEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt("simulated kill after epoch 2")

    real = c05_callbacks.make_callbacks
    monkeypatch.setattr(c06_training, "make_callbacks", lambda params, work, **kwargs: [*real(params, work, **kwargs), StopAfterSecondEpoch()])
    work, out = folder / "work", folder / "out"
    args = (data, config.base, config.model, config.callbacks, config.train, work)
    with pytest.raises(KeyboardInterrupt):
        c06_training.train_models(*args, out)
    backups = sorted(work.glob("custom_cnn/end_to_end/backup/*.weights.h5"))
    assert backups
    for backup in backups:
        backup.write_bytes(backup.read_bytes()[:100])  # truncated by a crash or a full disk
    monkeypatch.setattr(c06_training, "make_callbacks", real)
    summary = c06_training.train_models(*args, out)
    assert summary["models"]["custom_cnn"]["epochs_run"] == 3
    assert "partial training state unreadable" in caplog.text and (out / "models" / "custom_cnn" / "model.keras").is_file()


# ----------------------------------------------------------------------------- 5. usage errors are exit 2
def test_binary_params_file_is_a_config_error(tmp_path, capsys):
    folder = write_config(tmp_path / "cfg")
    (folder / "params.yaml").write_bytes(bytes(range(256)) * 4)
    assert main(["run", "--config", str(folder)]) == 2
    assert "params.yaml: not a text file" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_unusable_artifacts_folder_is_a_config_error(tmp_path, capsys, where):
    folder = write_config(tmp_path / "cfg")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "artifacts" if where == "under_a_file" else Path("/proc/metal_defect_artifacts")
    assert main(["run", "--config", str(folder), "--stages", "1", f"paths.artifacts={target}"]) == 2
    err = capsys.readouterr().err
    assert "paths.artifacts" in err and "cannot create or write" in err and "unexpected" not in err


# ----------------------------------------------------------------------------- 6. degenerate images
def test_tiny_and_blank_images_are_skipped_with_a_reason(tiny_config):
    folder = tiny_config()
    data = Path(load_config(folder).data_ingestion.source)
    Image.new("L", (1, 1), 128).save(data / "crazing" / "one_pixel.png")
    Image.new("L", (64, 64), 90).save(data / "inclusion" / "flat_grey.png")
    noisy = np.full((64, 64), 90, np.uint8)
    noisy[::2, ::2] = 91  # one grey level of texture: still blank to the eye and to the model
    Image.fromarray(noisy).save(data / "inclusion" / "almost_flat.png")
    manifest = Runner(load_config(folder)).run("1-2")
    prepared = Path(manifest["stages"]["data_preprocessing"]["output"])
    reasons = {Path(s["path"]).name: s["reason"] for s in read_json(prepared / "preprocessing_report.json")["skipped"]}
    assert reasons["one_pixel.png"].startswith("too small") and "min_image_side" in reasons["one_pixel.png"]
    assert reasons["flat_grey.png"].startswith("blank") and reasons["almost_flat.png"].startswith("blank")
    sources = {Path(r["source"]).name for r in read_json(prepared / "records.json")["records"]}
    assert not {"one_pixel.png", "flat_grey.png", "almost_flat.png"} & sources and len(sources) == 36


@pytest.mark.integration
@pytest.mark.parametrize("dataset", ["neu", "xsdd"])
def test_no_real_image_is_skipped_as_degenerate(dataset):
    from conftest import require_shared

    root = require_shared(REPO.parent / "shared" / "datasets" / dataset / "images")
    params = load_config(REPO).data_preprocessing
    files = [p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"}]
    assert len(files) >= 1360
    flagged = [(p.name, c02.content_problem(c02.decode_image(p), params.min_image_side, params.min_pixel_std)) for p in files]
    assert [f for f in flagged if f[1]] == []


# ----------------------------------------------------------------------------- 7. (evaluate DIR) lives in test_training_pipeline.py
# ----------------------------------------------------------------------------- 8. noise and small wrongs
def test_tensorflow_lines_stay_off_the_terminal_for_a_whole_training_run(tiny_config):
    from conftest import tiny_training_params

    folder = tiny_config(tiny_training_params(epochs=2))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    for noise in ("absl", "oneDNN", "cuInit", "cuda", "cpu_feature_guard", "I0000", "W0000", "E0000"):
        assert noise not in result.stderr, result.stderr
    assert "stage evaluation: done" in result.stderr
    assert "tensorflow start-up: " in (folder / "logs" / "metal_defect.log").read_text()


def test_oversized_image_is_skipped_without_a_raw_pillow_warning(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (9500, 9500)).save(path)  # above Pillow's own bomb-warning size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(c02.ImageProblem, match="too many pixels"):
            c02.decode_image(path, max_pixels=40_000_000)


def test_a_stage_failure_is_printed_once(tmp_path, capsys):
    folder = write_config(tmp_path / "cfg", params={"data_ingestion": {"source": str(tmp_path / "empty")}})
    (tmp_path / "empty").mkdir()
    assert main(["run", "--config", str(folder), "--stages", "1"]) == 3
    err = capsys.readouterr().err
    assert err.count("no labelled images found") == 1


def test_force_errors_name_the_force_option(tmp_path, capsys):
    assert main(["run", "--config", str(write_config(tmp_path / "cfg")), "--force", "nonsense"]) == 2
    assert "--force: unknown stage 'nonsense'" in capsys.readouterr().err


def test_a_device_as_source_is_named_as_such(tmp_path, capsys):
    assert main(["run", "--config", str(write_config(tmp_path / "cfg")), "--stages", "1", "--source", "/dev/zero"]) == 3
    assert "/dev/zero is a device or special file" in capsys.readouterr().err


def test_split_given_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line.*must sum to 1"):
        load_config(write_config(tmp_path / "cfg"), ["data_preprocessing.split.train=0.9"])


def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path):
    folder = write_config(tmp_path / "cfg")
    text = (folder / "params.yaml").read_text()
    (folder / "params.yaml").write_text(text + "\nbase:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"key 'base' appears twice \(lines 1 and \d+\)"):
        load_config(folder)


def test_finished_outputs_respect_the_umask(tmp_path):
    folder = write_config(tmp_path / "cfg")
    old = os.umask(0o022)
    try:
        manifest = Runner(load_config(folder), TOY_STAGES).run()
    finally:
        os.umask(old)
    output = Path(manifest["stages"]["first"]["output"])
    assert stat.S_IMODE(output.stat().st_mode) == 0o755
    assert stat.S_IMODE((output / "_stage.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "artifacts" / "runs" / manifest["run_id"] / "manifest.json").stat().st_mode) == 0o644


def test_refused_archive_leaves_no_empty_work_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escape.png", b"x")
    folder = write_config(tmp_path / "cfg", params={"data_ingestion": {"source": str(archive)}})
    assert main(["run", "--config", str(folder), "--stages", "1"]) == 3
    work = folder / "artifacts" / "work"
    assert not work.exists() or not [p for p in work.rglob("*") if p.is_dir() and not any(p.iterdir())]


# ----------------------------------------------------------------------------- 9. a rollback survives the next run
def _publish(store: ArtifactStore, run_id: str, output: Path) -> dict:
    pointer = {"run_id": run_id}
    served_model.write_pointer(store, pointer)
    return pointer


def test_a_rerun_that_reuses_the_evaluation_does_not_undo_a_promote(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    stages = (*TOY_STAGES[:1], Stage("second", "toy_stages:second", sections=("data_loader",), upstream=("first",),
                                     publish="test_integrity:_publish"))
    folder = write_config(tmp_path / "cfg")
    store = ArtifactStore(folder / "artifacts")
    old = Runner(load_config(folder), stages).run()
    new = Runner(load_config(folder, ["data_loader.batch_size=7"]), stages).run()
    assert served_model.read_pointer(store)["run_id"] == new["run_id"]  # a new evaluation is published
    served_model.write_pointer(store, {"run_id": old["run_id"]})  # what `promote OLD` does
    rerun = Runner(load_config(folder, ["data_loader.batch_size=7"]), stages).run()
    assert rerun["stages"]["second"]["reused"] and served_model.read_pointer(store)["run_id"] == old["run_id"]
    (folder / "artifacts" / "served.json").unlink()  # nothing served at all: a reused evaluation may be served
    Runner(load_config(folder, ["data_loader.batch_size=7"]), stages).run()
    assert served_model.read_pointer(store)["run_id"] != old["run_id"]
