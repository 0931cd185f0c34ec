"""c01 data ingestion: find labelled images in a folder, an archive or a URL.

Recognised layouts (after an archive is extracted and a lone top folder is entered):

* class folders      root/<class>/**/image
* pre-split tree     root/{train, valid|val|validation, test}/<class>/**/image (split kept)
* flat, prefixed     root/Cr_1.bmp, root/PS_12.bmp (class = file name before the number)

Folder and prefix names map onto schema classes through the schema aliases (case-
insensitive, '-', '_' and ' ' alike). Nothing is decoded here: this stage lists files
and says why each skipped file was skipped; c02 decodes and checks them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from metal_defect.artifacts import ensure_dir, hash_strings, sha256_file, write_json_atomic
from metal_defect.config import DataIngestionParams, SchemaConfig
from metal_defect.errors import DataError
from metal_defect.review import REVIEWED_SPLIT, ReviewedExample, ReviewStore
from metal_defect.serving.images import walked_file_problem

log = logging.getLogger(__name__)

EXTRACT_DIR = "extracted"
SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test", "testing": "test"}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
IGNORED_DIRS = {"__MACOSX", ".git", ".ipynb_checkpoints"}


@dataclass(frozen=True)
class Item:
    """One labelled image file found in the source."""

    path: str  # absolute, or relative to the stage output when extracted from an archive
    label: str  # schema class name
    split: str | None  # train/valid/test for a pre-split source, else None (a reviewed image: train or reviewed)
    origin: str = "source"  # or "reviewed": a labelled image of the review store


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    unknown_class: str | None = None  # the folder or file-name prefix, for files skipped as "unknown class"


class CorruptArchive(DataError):
    """The archive cannot be read to the end (truncated or damaged)."""


# ----------------------------------------------------------------------------- fingerprint
def source_fingerprint(data_ingestion: DataIngestionParams, schema: SchemaConfig) -> str:
    """Content fingerprint of the source (every file's relative path and bytes, or the archive) and, when there are
    any, of the reviewed images (each one's sha256 and latest class): a new decision retrains, an unchanged queue does not."""
    fingerprint = _source_only_fingerprint(data_ingestion)
    examples = reviewed_examples(data_ingestion)
    if not examples:
        return fingerprint
    return hash_strings(fingerprint, "reviewed", *(f"{e.sha256}:{e.label}" for e in examples))


def reviewed_examples(params: DataIngestionParams) -> list[ReviewedExample]:
    """The review store's labelled images (none when data_ingestion.reviewed is off or there is no store)."""
    if not params.reviewed or params.review_store is None or not Path(params.review_store).is_dir():
        return []
    return ReviewStore(Path(params.review_store)).reviewed_examples()[0]


def _source_only_fingerprint(data_ingestion: DataIngestionParams) -> str:
    source = data_ingestion.source
    if _is_url(source):
        return hash_strings("url", source, data_ingestion.sha256 or "")
    path = _local_source(source)
    if path.is_file():
        return hash_strings("file", sha256_file(path))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def ingest(params: DataIngestionParams, schema: SchemaConfig, out_dir: Path, cache_dir: Path,
           require_all_classes: bool = True) -> tuple[list[Item], list[Skipped], dict[str, Any]]:
    """Find every labelled image of `params.source`; archives are extracted into out_dir.

    With `require_all_classes` (training) every schema class must have images; evaluating a
    folder only needs some.
    """
    source = params.source
    kind = "url" if _is_url(source) else "archive" if _local_source(source).is_file() else "folder"
    archive = None
    if kind == "url":
        archive, cached = download(source, cache_dir, params.sha256, params.max_download_mb)
        try:
            root = safe_extract(archive, out_dir / EXTRACT_DIR, params)
        except CorruptArchive as exc:
            if not cached:
                raise
            log.warning("cached download %s cannot be extracted (%s); discarding it and fetching it once more", archive, exc)
            discard_download(archive)
            archive, _ = download(source, cache_dir, params.sha256, params.max_download_mb)
            root = safe_extract(archive, out_dir / EXTRACT_DIR, params)
    elif kind == "archive":
        archive = Path(source)
        if params.sha256 and sha256_file(archive) != params.sha256:
            raise DataError(f"{archive}: sha256 does not match data_ingestion.sha256; the file is not the one expected")
        root = safe_extract(archive, out_dir / EXTRACT_DIR, params)
    if archive is not None:
        display_root = out_dir
    else:
        root = Path(source)
        display_root = None
    root = _enter_lone_folder(root)
    layout, items, skipped = scan(root, schema, require_all_classes)
    if display_root is not None:  # archive members are addressed relative to the stage output
        items = [Item(str(Path(i.path).relative_to(display_root)), i.label, i.split) for i in items]
    classes = list(schema.classes) if schema.classes != "auto" else sorted({i.label for i in items})
    meta = {"source": source, "source_kind": kind, "root": str(root), "layout": layout, "classes": classes}
    reviewed = reviewed_items(params, classes, ClassResolver(schema))
    if reviewed:
        meta["reviewed"] = {"store": str(params.review_store), "images": len(reviewed),
                            "train": sum(i.split == "train" for i in reviewed), REVIEWED_SPLIT: sum(i.split == REVIEWED_SPLIT for i in reviewed)}
        log.info("review store %s: %d labelled image(s) join the source (%d to train, %d to the reviewed evaluation slice)",
                 params.review_store, len(reviewed), meta["reviewed"]["train"], meta["reviewed"][REVIEWED_SPLIT])
    return items + reviewed, skipped, meta


def reviewed_items(params: DataIngestionParams, classes: list[str], resolver: ClassResolver) -> list[Item]:
    """The reviewed images as items of the data set's classes; a class the data set does not have is refused."""
    items, unknown = [], {}
    for example in reviewed_examples(params):
        label = example.label if example.label in classes else resolver.resolve(example.label)
        if label not in classes:
            unknown.setdefault(example.label, []).append(example)
            continue
        items.append(Item(str(example.path), label, example.split, origin="reviewed"))
    if unknown:
        described = "; ".join(f"'{label}' ({len(found)} image(s), e.g. {found[0].name}, sha256 {found[0].sha256[:12]})"
                              for label, found in sorted(unknown.items()))
        raise DataError(f"review store {params.review_store}: reviewed images are labelled with a class the data set does not have: "
                        f"{described}; its classes are {', '.join(classes)}. Add the class to schema.yaml's classes (with images "
                        "of it in the source), or label those images again with `python main.py review label SHA256 CLASS`")
    return items


def reason_kind(reason: str) -> str:
    """The kind of a skip reason ('unknown class: folder ...' -> 'unknown class'), for grouping."""
    return reason.split(":")[0]


# ----------------------------------------------------------------------------- layouts
def normalise_name(name: str) -> str:
    """'Rolled-In Scale' -> 'rolled_in_scale': how folder names are compared with aliases."""
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


class ClassResolver:
    """Maps folder names and file prefixes to schema classes (or collects them for `auto`)."""

    def __init__(self, schema: SchemaConfig):
        self.auto = schema.classes == "auto"
        self.lookup: dict[str, str] = {}
        names = list(schema.aliases) if self.auto else list(schema.classes)
        for name in names:
            self.lookup[normalise_name(name)] = name
            for alias in schema.aliases.get(name, []):
                self.lookup[normalise_name(alias)] = name

    def resolve(self, name: str) -> str | None:
        found = self.lookup.get(normalise_name(name))
        if found is None and self.auto:
            return name
        return found

    def known(self) -> list[str]:
        return sorted(set(self.lookup.values()))


def scan(root: Path, schema: SchemaConfig, require_all_classes: bool = True) -> tuple[str, list[Item], list[Skipped]]:
    """Detect the layout below `root` and list labelled images and skipped files."""
    resolver = ClassResolver(schema)
    extensions = {e.lower() for e in schema.extensions}
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not _hidden(d.name) and d.name not in IGNORED_DIRS]
    split_dirs = {d: SPLIT_NAMES[d.name.lower()] for d in subdirs if d.name.lower() in SPLIT_NAMES}
    items: list[Item] = []
    skipped: list[Skipped] = []
    if split_dirs and any(s == "train" for s in split_dirs.values()):
        layout = "pre-split"
        for d in subdirs:
            if d not in split_dirs:
                skipped.extend(Skipped(str(p), f"not in a split folder: '{d.name}' is not train/valid/test") for p in _files(d))
        for d, split in split_dirs.items():
            _scan_class_folders(d, split, resolver, extensions, items, skipped)
        for p in _files(root, recursive=False):
            skipped.append(Skipped(str(p), "not in a split folder: file at the top level of a pre-split tree"))
    elif subdirs:
        layout = "class-folders"
        _scan_class_folders(root, None, resolver, extensions, items, skipped)
    else:
        layout = "flat-prefixed"
        for p in _files(root, recursive=False):
            reason = _file_problem(p, extensions)
            if reason:
                skipped.append(Skipped(str(p), reason))
                continue
            match = re.match(r"^(.*?)[\s_\-]*\(?\d+\)?$", p.stem)
            prefix = match.group(1) if match and match.group(1) else p.stem
            label = resolver.resolve(prefix)
            if label is None:
                skipped.append(Skipped(str(p), f"unknown class: file-name prefix '{prefix}' is not a class or alias in the schema", prefix))
            else:
                items.append(Item(str(p), label, None))
    _check_against_schema(root, layout, items, schema, resolver, require_all_classes)
    return layout, items, skipped


def _scan_class_folders(root: Path, split: str | None, resolver: ClassResolver, extensions: set[str], items: list[Item], skipped: list[Skipped]) -> None:
    for p in _files(root, recursive=False):
        skipped.append(Skipped(str(p), "not in a class folder: file at the top level"))
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        if _hidden(d.name) or d.name in IGNORED_DIRS:
            skipped.extend(Skipped(str(p), "hidden file: inside a hidden or system folder") for p in _files(d))
            continue
        label = resolver.resolve(d.name)
        if label is None:
            skipped.extend(Skipped(str(p), f"unknown class: folder '{d.name}' is not a class or alias in the schema", d.name) for p in _files(d))
            continue
        for p in _files(d):
            reason = _file_problem(p, extensions)
            if reason:
                skipped.append(Skipped(str(p), reason))
            else:
                items.append(Item(str(p), label, split))


def _check_against_schema(root: Path, layout: str, items: list[Item], schema: SchemaConfig, resolver: ClassResolver, require_all: bool) -> None:
    found = Counter(i.label for i in items)
    if not items:
        raise DataError(f"no labelled images found in {root} ({layout} layout); expected class folders, a train/valid/test tree or "
                        f"files named like Cr_1.bmp, with classes {resolver.known()} and extensions {schema.extensions}")
    if not require_all:
        return
    if schema.classes != "auto":
        missing = [c for c in schema.classes if c not in found]
        if missing:
            raise DataError(f"{root}: no images for schema class(es) {missing}; found {dict(found)}. "
                            "Add an alias in schema.yaml if the folders are named differently")
    elif len(found) < 2:
        raise DataError(f"{root}: schema.classes is 'auto' but only {len(found)} class was found ({dict(found)}); a classifier needs at least 2")


def _files(root: Path, recursive: bool = True) -> list[Path]:
    if not recursive:
        return [p for p in sorted(root.iterdir()) if p.is_file() or p.is_symlink()]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames))
    return found


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in {"Thumbs.db", "desktop.ini"}


def _file_problem(path: Path, extensions: set[str]) -> str | None:
    parts = path.parts
    if any(_hidden(part) for part in parts[-3:]) or any(part in IGNORED_DIRS for part in parts):
        return "hidden file: name starts with '.' or is a system file"
    if path.suffix.lower() not in extensions:
        return f"unsupported extension: '{path.suffix or '(none)'}' is not one of {sorted(extensions)}"
    return walked_file_problem(path)


def _enter_lone_folder(root: Path) -> Path:
    """Archives often wrap everything in one top folder (NEU-DET/...); look inside it."""
    for _ in range(3):
        entries = [p for p in root.iterdir() if not _hidden(p.name) and p.name not in IGNORED_DIRS]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in SPLIT_NAMES:
            inner = [p for p in entries[0].iterdir() if p.is_dir()]
            if inner:
                root = entries[0]
                continue
        break
    return root


# ----------------------------------------------------------------------------- download
def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _local_source(source: str) -> Path:
    """The local source path, which must be a folder or a regular (archive) file."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {path} does not exist; set data_ingestion.source in params.yaml or pass --source PATH")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"data source {path} is a device or special file, not a folder, an archive or a URL; "
                        "set data_ingestion.source in params.yaml or pass --source PATH")
    return path


def download(url: str, cache_dir: Path, sha256: str | None, max_mb: float) -> tuple[Path, bool]:
    """Fetch `url` into `cache_dir` once; returns (path, whether it came from the cache).

    The file is written under a temporary name and renamed only when complete: as many
    bytes as the server announced, the expected sha256 when one is given, and a readable
    archive. A record beside it (`<file>.json`) says what was received; a cached file that
    does not match its record, or cannot be opened, is discarded and fetched again.
    Downloads larger than `max_mb` are refused before (announced size) or while fetching.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{url}: a URL source must point to a .zip, .tar.gz, .tgz or .tar archive")
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        problem = _cached_download_problem(target, sha256)
        if problem is None:
            log.info("using cached download %s", target)
            return target, True
        log.warning("cached download %s is not usable (%s); fetching it again", target, problem)
        discard_download(target)
    ensure_dir(cache_dir, "paths.download_cache")
    _fetch(url, target, sha256, max_mb)
    return target, False


def discard_download(path: Path) -> None:
    """Remove a cached download and its record."""
    path.unlink(missing_ok=True)
    _download_record(path).unlink(missing_ok=True)


def _download_record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _cached_download_problem(path: Path, sha256: str | None) -> str | None:
    try:
        record = json.loads(_download_record(path).read_text(encoding="utf-8"))
        expected = int(record["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no record of a complete download"
    if path.stat().st_size != expected:
        return f"{path.stat().st_size} bytes on disk, {expected} received"
    if sha256 and record.get("sha256") != sha256:
        return "its sha256 is not data_ingestion.sha256"
    if not _archive_opens(path):
        return "not a readable archive"
    return None


def _archive_opens(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)
    except OSError:
        return False


def _fetch(url: str, target: Path, sha256: str | None, max_mb: float) -> None:
    limit = int(max_mb * 1024 * 1024)
    too_big = f"more than data_ingestion.max_download_mb ({max_mb:g} MB); raise it, or download the file yourself and pass --source FILE"
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total is not None and total > limit:
                raise DataError(f"{url}: the server announces {total / 1e6:.1f} MB, {too_big}")
            received = 0
            with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    received += len(chunk)
                    if received > limit:
                        raise DataError(f"{url}: download stopped after {received / 1e6:.1f} MB, {too_big}")
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DataError(f"{url}: download cut short: received {received} of the {total} bytes announced; run again to retry")
        digest = sha256_file(partial)
        if sha256 and digest != sha256:
            raise DataError(f"{url}: downloaded file has sha256 {digest}, expected {sha256} (data_ingestion.sha256)")
        if not _archive_opens(partial):
            raise DataError(f"{url}: the downloaded file is not a readable .zip or .tar archive")
        os.replace(partial, target)
        write_json_atomic(_download_record(target), {"url": url, "bytes": received, "sha256": digest,
                                                     "fetched": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DataError(f"could not download {url}: {exc}; check the address or download it yourself and pass --source FILE") from exc
    finally:
        partial.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- extraction
def safe_extract(archive: Path, dest: Path, params: DataIngestionParams) -> Path:
    """Extract a .zip/.tar(.gz) into `dest`, refusing anything that could escape or explode.

    Refused (DataError naming the entry): absolute paths, '..' components, links, device
    files, more than `max_archive_members` entries, more than `max_extracted_mb` in total,
    or a member whose size / compressed size exceeds `max_compression_ratio`. Sizes are
    counted while writing, not trusted from headers. On refusal `dest` is removed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    limit = int(params.max_extracted_mb * 1024 * 1024)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, params, limit)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, params, limit)
        else:
            raise CorruptArchive(f"{archive}: not a .zip or .tar(.gz) archive (or a truncated one)")
    except DataError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise CorruptArchive(f"{archive}: corrupt or unreadable archive ({exc})") from exc
    return dest


def _safe_member_path(archive: Path, name: str, dest: Path) -> Path:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or name.startswith(("/", "\\")):
        raise DataError(f"{archive}: refused entry '{name}': absolute path")
    if ".." in posix.parts:
        raise DataError(f"{archive}: refused entry '{name}': '..' would write outside the extraction folder")
    target = (dest / Path(*posix.parts)).resolve() if posix.parts else dest
    if not str(target).startswith(str(dest.resolve()) + os.sep):
        raise DataError(f"{archive}: refused entry '{name}': it resolves outside the extraction folder")
    return target


def _copy_limited(src: Any, target: Path, written: int, limit: int, archive: Path, name: str, ratio_cap: float | None) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    member_bytes = 0
    with open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            member_bytes += len(chunk)
            written += len(chunk)
            if written > limit:
                raise DataError(f"{archive}: refused: extracting '{name}' passes data_ingestion.max_extracted_mb "
                                f"({limit // (1024 * 1024)} MB); possible decompression bomb")
            if ratio_cap is not None and member_bytes > ratio_cap:
                raise DataError(f"{archive}: refused entry '{name}': it expands past data_ingestion.max_compression_ratio; possible decompression bomb")
            out.write(chunk)
    return written


def _extract_zip(archive: Path, dest: Path, params: DataIngestionParams, limit: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > params.max_archive_members:
            raise DataError(f"{archive}: refused: {len(infos)} entries exceed data_ingestion.max_archive_members ({params.max_archive_members})")
        for info in infos:
            target = _safe_member_path(archive, info.filename, dest)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver stored no type
            if kind == stat.S_IFLNK:
                raise DataError(f"{archive}: refused entry '{info.filename}': symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise DataError(f"{archive}: refused entry '{info.filename}': device or special file")
            if info.file_size and info.file_size / max(info.compress_size, 1) > params.max_compression_ratio:
                raise DataError(f"{archive}: refused entry '{info.filename}': compression ratio "
                                f"{info.file_size / max(info.compress_size, 1):.0f} exceeds data_ingestion.max_compression_ratio "
                                f"({params.max_compression_ratio:g}); possible decompression bomb")
        written = 0
        for info in infos:
            target = _safe_member_path(archive, info.filename, dest)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            cap = max(info.compress_size, 1) * params.max_compression_ratio
            with zf.open(info) as src:
                written = _copy_limited(src, target, written, limit, archive, info.filename, cap)


def _extract_tar(archive: Path, dest: Path, params: DataIngestionParams, limit: int) -> None:
    packed = archive.stat().st_size
    with tarfile.open(archive) as tf:
        members = []
        for count, member in enumerate(tf, 1):
            if count > params.max_archive_members:
                raise DataError(f"{archive}: refused: more than data_ingestion.max_archive_members ({params.max_archive_members}) entries")
            _safe_member_path(archive, member.name, dest)
            if member.issym() or member.islnk():
                raise DataError(f"{archive}: refused entry '{member.name}': link to '{member.linkname}'")
            if not (member.isfile() or member.isdir()):
                raise DataError(f"{archive}: refused entry '{member.name}': device, FIFO or special file")
            members.append(member)
        # a tar stream has no per-member compressed size: bound the whole archive's ratio
        total_cap = min(limit, int(max(packed, 1) * params.max_compression_ratio))
        written = 0
        for member in members:
            target = _safe_member_path(archive, member.name, dest)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            src = tf.extractfile(member)
            if src is None:
                continue
            with src:
                try:
                    written = _copy_limited(src, target, written, total_cap, archive, member.name, None)
                except DataError as exc:
                    if total_cap < limit:
                        raise DataError(f"{archive}: refused entry '{member.name}': the archive expands more than "
                                        f"data_ingestion.max_compression_ratio ({params.max_compression_ratio:g}) times; possible decompression bomb") from exc
                    raise
