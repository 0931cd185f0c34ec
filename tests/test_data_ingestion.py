"""c01: layouts, aliases, auto classes, skip reasons, archive safety, URL download."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
from conftest import REPO

from metal_defect import synthetic
from metal_defect.components import c01_data_ingestion as c01
from metal_defect.config import load_config
from metal_defect.errors import DataError
from metal_defect.stages import s1_data_ingestion as s1


def _config(source: Path | str, *overrides: str):
    return load_config(REPO, [f"data_ingestion.source={source}", *overrides])


def _ingest(tmp_path: Path, source: Path | str, *overrides: str, cache: Path | None = None):
    config = _config(source, *overrides)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return c01.ingest(config.data_ingestion, config.schema, out, cache or tmp_path / "cache")


def test_class_folder_layout(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", classes=("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"), per_class=3)
    items, skipped, meta = _ingest(tmp_path, root)
    assert meta["layout"] == "class-folders" and len(items) == 18 and not skipped
    assert {i.split for i in items} == {None}


def test_presplit_mirror_layout_with_capitalised_aliases_and_bmp(tmp_path):
    classes = tuple(synthetic.PRESPLIT_FOLDERS)
    root = synthetic.make_dataset(tmp_path / "NEU Metal Surface Defects Data", classes=classes, layout="pre-split", ext=".bmp",
                                  split_counts={"train": 4, "valid": 2, "test": 2})
    os.rename(root / "valid", root / "val")  # 'val' is recognised too
    items, skipped, meta = _ingest(tmp_path, root)
    assert meta["layout"] == "pre-split" and not skipped
    assert {i.label for i in items} == set(classes)  # Pitted -> pitted_surface, Rolled -> rolled-in_scale
    assert sum(i.split == "valid" for i in items) == 12 and sum(i.split == "train" for i in items) == 24


def test_flat_prefixed_layout_like_neu_cls(tmp_path):
    classes = tuple(synthetic.PREFIXES)
    root = synthetic.make_dataset(tmp_path / "NEU-CLS", classes=classes, per_class=3, layout="flat", ext=".bmp")
    items, _, meta = _ingest(tmp_path, root)
    assert meta["layout"] == "flat-prefixed"
    by_name = {Path(i.path).name: i.label for i in items}
    assert by_name["PS_1.bmp"] == "pitted_surface" and by_name["RS_2.bmp"] == "rolled-in_scale" and by_name["Cr_3.bmp"] == "crazing"


def test_auto_classes_take_the_folders_found(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", classes=("bolt", "nut"), per_class=3)
    items, _, meta = _ingest(tmp_path, root, "schema.classes=auto", "schema.aliases={}")
    assert meta["classes"] == ["bolt", "nut"] and len(items) == 6


def test_skipped_files_are_listed_with_reasons(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", classes=synthetic.CLASSES, per_class=3)
    (root / "crazing" / "notes.txt").write_text("x")
    (root / "crazing" / ".DS_Store").write_bytes(b"\0")
    (root / "mystery").mkdir()
    (root / "mystery" / "m_1.png").write_bytes((root / "crazing" / "crazing_1.png").read_bytes())
    items, skipped, meta = _ingest(tmp_path, root, "schema.classes=[crazing,inclusion,patches]", "schema.aliases={}")
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons["notes.txt"].startswith("unsupported extension")
    assert reasons[".DS_Store"].startswith("hidden file")
    assert reasons["m_1.png"].startswith("unknown class: folder 'mystery'")
    assert len(items) == 9
    s1.write_outputs(items, skipped, meta, tmp_path / "out")
    report = (tmp_path / "out" / s1.REPORT_FILE).read_text()
    assert '"unknown class": 1' in report and '"unsupported extension": 1' in report


def test_missing_schema_class_and_missing_source_are_clear_errors(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", classes=("crazing", "inclusion"), per_class=3)
    with pytest.raises(DataError, match=r"no images for schema class\(es\) \['patches'"):
        _ingest(tmp_path, root, "schema.classes=[crazing,inclusion,patches]", "schema.aliases={}")
    with pytest.raises(DataError, match="does not exist"):
        c01.source_fingerprint(_config(tmp_path / "nope").data_ingestion, _config(tmp_path / "nope").schema)


# ----------------------------------------------------------------------------- archives
def _zip_of(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, Path("NEU-DET") / path.relative_to(folder))
    return target


def test_zip_and_tar_sources_are_extracted_and_ingested(tmp_path):
    root = synthetic.make_dataset(tmp_path / "d", per_class=3)
    archive = _zip_of(root, tmp_path / "data.zip")
    items, _, meta = _ingest(tmp_path / "z", archive, "schema.classes=[crazing,inclusion,patches]", "schema.aliases={}")
    assert meta["source_kind"] == "archive" and len(items) == 9
    assert all(i.path.startswith("extracted/NEU-DET/") for i in items)  # relative to the stage output
    tar = tmp_path / "data.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(root, arcname="top")
    items, _, _ = _ingest(tmp_path / "t", tar, "schema.classes=[crazing,inclusion,patches]", "schema.aliases={}")
    assert len(items) == 9


def _params(**kw):
    config = load_config(REPO, [f"data_ingestion.{k}={v}" for k, v in kw.items()])
    return config.data_ingestion


def _assert_refused(archive: Path, dest: Path, match: str, **limits) -> None:
    with pytest.raises(DataError, match=match):
        c01.safe_extract(archive, dest, _params(**limits))
    assert not dest.exists()


def test_zip_with_parent_traversal_is_refused_and_writes_nothing_outside(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/a.png", b"x")
        zf.writestr("../evil", b"pwned")
    _assert_refused(archive, tmp_path / "x" / "dest", r"refused entry '\.\./evil'")
    assert not (tmp_path / "x" / "evil").exists() and not (tmp_path / "evil").exists()


def test_zip_with_absolute_path_is_refused(tmp_path):
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("ok.png")
        zf.writestr(info, b"x")
        info = zipfile.ZipInfo("/tmp/evil-absolute")
        zf.writestr(info, b"x")
    # zipfile strips the leading '/' when *writing* names; patch the stored name directly
    data = archive.read_bytes().replace(b"tmp/evil-absolute", b"/tmp/evil-absolut")
    archive.write_bytes(data)
    _assert_refused(archive, tmp_path / "dest", "absolute path")
    assert not Path("/tmp/evil-absolut").exists()


def test_tar_with_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("data/passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    _assert_refused(archive, tmp_path / "dest", "link to '/etc/passwd'")


def test_tar_with_device_file_is_refused(tmp_path):
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("data/null")
        info.type = tarfile.CHRTYPE
        tf.addfile(info)
    _assert_refused(archive, tmp_path / "dest", "device")


def test_zip_bomb_is_refused_by_ratio_and_by_total_size(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("crazing/zeros.png", b"\0" * (30 * 1024 * 1024))
    _assert_refused(archive, tmp_path / "d1", "compression ratio")
    _assert_refused(archive, tmp_path / "d2", "max_extracted_mb", max_compression_ratio=100000, max_extracted_mb=5)


def test_tar_gz_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    payload = b"\0" * (20 * 1024 * 1024)
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("crazing/zeros.png")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    _assert_refused(archive, tmp_path / "d", "possible decompression bomb")


def test_too_many_members_is_refused(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(5):
            zf.writestr(f"crazing/{i}.png", b"x")
    _assert_refused(archive, tmp_path / "d", "max_archive_members", max_archive_members=3)


# ----------------------------------------------------------------------------- URL
@pytest.fixture
def http_root(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_source_is_downloaded_once_and_checked(tmp_path, http_root):
    served, base_url = http_root
    archive = _zip_of(synthetic.make_dataset(tmp_path / "d", per_class=3), served / "neu.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    extra = ("schema.classes=[crazing,inclusion,patches]", "schema.aliases={}", f"data_ingestion.sha256={digest}")
    items, _, meta = _ingest(tmp_path / "a", f"{base_url}/neu.zip", *extra, cache=tmp_path / "cache")
    assert meta["source_kind"] == "url" and len(items) == 9
    archive.unlink()  # second time it comes from the cache
    items, _, _ = _ingest(tmp_path / "b", f"{base_url}/neu.zip", *extra, cache=tmp_path / "cache")
    assert len(items) == 9
    with pytest.raises(DataError, match="could not download"):
        _ingest(tmp_path / "c", f"{base_url}/missing.zip")


def test_url_with_wrong_sha256_is_refused(tmp_path, http_root):
    served, base_url = http_root
    _zip_of(synthetic.make_dataset(tmp_path / "d", per_class=3), served / "neu.zip")
    with pytest.raises(DataError, match="expected 0000"):
        _ingest(tmp_path / "a", f"{base_url}/neu.zip", "data_ingestion.sha256=" + "0" * 64, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*neu.zip"))
