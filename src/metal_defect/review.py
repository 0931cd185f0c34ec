"""The review store: images whose answers were flagged or disputed, kept for an engineer to label.

Layout of `paths.review` (default `<artifacts>/review`), every file append-only except the images:

- `images/<sha256>.<ext>`: the exact bytes of each image, stored once under their sha256;
- `queue.jsonl`: one line per event, `added` (the original file name, the model's answer, the
  model run, the time, why it was queued) or `dropped` (removed by the cap, with the reason);
- `labels.jsonl`: one line per decision (reviewer, time, class or `not_valid`, sha256, original
  name, the model's answer); a later decision on the same image supersedes an earlier one.

The labelled images are training data (`reviewed_examples`): stage 1 adds them to the source as
a second source with its own fingerprint, and each image's sha256 alone puts it in training
(80 %) or in the `reviewed` evaluation slice (20 %), never in the source's own test split.

Every append and every cap decision holds an exclusive lock on `.lock` (fcntl), so two app
sessions or a CLI and the app never lose a line. A corrupt line is reported with its file and
line number and skipped; nothing is ever rewritten in place, so no earlier decision is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from metal_defect.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

QUEUE_LOG = "queue.jsonl"
LABELS_LOG = "labels.jsonl"
IMAGES_DIR = "images"
LOCK_FILE = ".lock"
NOT_VALID = "not_valid"  # the decision "not a valid image": kept out of training
NO_REVIEW_ENV = "METAL_DEFECT_NO_REVIEW"
ANONYMOUS = "anonymous"
REVIEWED_SPLIT = "reviewed"  # the prepared split of reviewed images kept out of training, to measure what they taught
REVIEWED_EVAL_EVERY = 5  # one reviewed image in five (by its sha256) is in that slice


def reviewed_split(sha256: str) -> str:
    """`train` or `reviewed` (about one in REVIEWED_EVAL_EVERY) by the image's sha256 alone, so an image never
    changes side as others are labelled."""
    return REVIEWED_SPLIT if int(sha256[:8], 16) % REVIEWED_EVAL_EVERY == 0 else "train"


@dataclasses.dataclass(frozen=True)
class ReviewedExample:
    """A labelled image of the store as training data."""

    path: Path
    label: str
    split: str  # train or REVIEWED_SPLIT
    sha256: str
    name: str  # the original file name


def review_disabled() -> bool:
    """Whether the environment turns the queue off (METAL_DEFECT_NO_REVIEW=1)."""
    return os.environ.get(NO_REVIEW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class Item:
    """One queued image with its latest decision (None: not reviewed yet)."""

    sha256: str
    name: str
    file: str
    bytes: int
    time: str
    source: str
    why: str  # uncertain, out_of_distribution or disputed
    verdict: str | None
    label: str | None
    confidence: float | None
    probabilities: Mapping[str, float]
    model_run: str | None
    user_class: str | None = None
    decision: Mapping[str, Any] | None = None

    @property
    def status(self) -> str:
        return "unreviewed" if self.decision is None else f"labelled {self.decision['class']}"


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class ReviewStore:
    """The queue, the images and the labels log in one folder, bounded by `max_items` and `max_mb`."""

    def __init__(self, root: Path, max_items: int = 5000, max_mb: float = 1024.0):
        self.root = Path(root)
        self.max_items = max_items
        self.max_bytes = int(max_mb * 1e6)

    # ------------------------------------------------------------------ low level
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - closed by the with below, after the error is worded
        except OSError as exc:
            raise ArtifactError(f"review store {self.root}: cannot create it ({exc.strerror or exc}); set paths.review to a writable folder") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        """One whole line, flushed to disk (under the lock): a full disk raises before anything is half written."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        path = self.root / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ArtifactError(f"review store: cannot append to {path} ({exc.strerror or exc}); earlier entries are kept, "
                                "free some space or point paths.review elsewhere") from exc
        if written != len(line):  # a full disk mid-line: the partial line is skipped as corrupt when read
            raise ArtifactError(f"review store: {path} took {written} of {len(line)} bytes (disk full?); earlier entries are kept")

    def _read(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        if not path.is_file():
            return []
        rows = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "sha256" not in row:
                        raise ValueError("not a record with a sha256")
                except ValueError as exc:
                    log.warning("review store: %s line %d is not a valid record (%s); skipped", path, number, str(exc)[:80])
                    continue
                rows.append(row)
        return rows

    # ------------------------------------------------------------------ reading
    def items(self) -> list[Item]:
        """Every image in the queue (dropped ones left out), each with its latest decision."""
        present: dict[str, dict[str, Any]] = {}
        for event in self._read(QUEUE_LOG):
            if event.get("event") == "dropped":
                present.pop(event["sha256"], None)
            elif event.get("event") == "added":
                present[event["sha256"]] = event
        decisions: dict[str, dict[str, Any]] = {}
        for decision in self._read(LABELS_LOG):
            decisions[decision["sha256"]] = decision  # later lines supersede earlier ones
        fields = {f.name for f in dataclasses.fields(Item)}
        return [Item(**{k: v for k, v in event.items() if k in fields}, decision=decisions.get(sha)) for sha, event in present.items()]

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision in the order made (the labels log, corrupt lines skipped)."""
        return self._read(LABELS_LOG)

    def find(self, prefix: str) -> Item:
        """The item whose sha256 starts with `prefix` (at least 6 hex characters), or a clear error."""
        prefix = prefix.strip().lower()
        if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
            raise ConfigError(f"review: '{prefix}' is not a sha256 prefix; give at least 6 hex characters from `python main.py review list`")
        matches = [item for item in self.items() if item.sha256.startswith(prefix)]
        if not matches:
            raise DataError(f"review: no queued image has a sha256 starting with {prefix} in {self.root}; see `python main.py review list`")
        if len(matches) > 1:
            raise ConfigError(f"review: {prefix} matches {len(matches)} images ({', '.join(m.sha256[:12] for m in matches)}); give more characters")
        return matches[0]

    def image_path(self, item: Item) -> Path:
        return self.root / IMAGES_DIR / item.file

    # ------------------------------------------------------------------ writing
    def add(self, data: bytes, name: str, answer: Mapping[str, Any], why: str, source: str, user_class: str | None = None) -> tuple[bool, str]:
        """Queue an image (its bytes, once per sha256) with the model's answer; (added, message).

        Over the cap, the oldest resolved items are dropped first; with only unreviewed items left, the new
        one is refused with a logged reason (never an unreviewed one dropped silently). An image already queued
        is not stored twice; a user's "this answer is wrong" on it is recorded as a new event.
        """
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        suffix = Path(name).suffix.lower()
        suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ".img"
        with self._locked():
            items = self.items()
            if any(item.sha256 == sha for item in items) and user_class is None:
                return False, f"{name}: already in the review queue ({sha[:12]})"
            existing = {item.sha256 for item in items}
            if sha not in existing:
                refused = self._make_room(items, len(data))
                if refused:
                    log.warning("review queue full: %s not queued: %s", name, refused)
                    return False, f"{name}: not queued: {refused}"
                target = self.root / IMAGES_DIR / f"{sha}{suffix}"
                tmp = target.with_name(target.name + ".tmp")
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    raise ArtifactError(f"review store: cannot store {name} in {target.parent} ({exc.strerror or exc}); "
                                        "earlier entries are kept") from exc
            probabilities = {str(k): float(v) for k, v in (answer.get("probabilities") or {}).items()}
            self._append(QUEUE_LOG, {"event": "added", "sha256": sha, "name": Path(name).name, "file": f"{sha}{suffix}", "bytes": len(data),
                                     "time": _now(), "source": source, "why": why, "verdict": answer.get("verdict"),
                                     "label": answer.get("label"), "confidence": answer.get("confidence"), "probabilities": probabilities,
                                     "model_run": answer.get("model_run"), "user_class": user_class})
        return True, f"{name}: queued for review ({why}, {sha[:12]})"

    def _make_room(self, items: Sequence[Item], size: int) -> str:
        """Drop the oldest resolved items until one more image of `size` bytes fits; the reason when it cannot."""
        count, total = len(items), sum(item.bytes for item in items)
        resolved = sorted((item for item in items if item.decision is not None), key=lambda item: item.time)
        while (count + 1 > self.max_items or total + size > self.max_bytes) and resolved:
            oldest = resolved.pop(0)
            self._append(QUEUE_LOG, {"event": "dropped", "sha256": oldest.sha256, "time": _now(),
                                     "reason": "cap reached: the oldest resolved item makes room"})
            (self.root / IMAGES_DIR / oldest.file).unlink(missing_ok=True)
            count, total = count - 1, total - oldest.bytes
            log.info("review queue: dropped %s (%s, resolved) to stay within the cap", oldest.name, oldest.sha256[:12])
        if count + 1 > self.max_items or total + size > self.max_bytes:
            return (f"the queue holds {count} unreviewed images ({total / 1e6:.1f} MB; cap {self.max_items} images, {self.max_bytes / 1e6:.0f} MB); "
                    "review some (`python main.py review list`) or raise review.max_items / review.max_mb")
        return ""

    def label(self, prefix: str, label: str, classes: Sequence[str], reviewer: str | None = None) -> dict[str, Any]:
        """Record a decision on the item `prefix` names: a class of `classes` or NOT_VALID."""
        if label != NOT_VALID and label not in classes:
            raise ConfigError(f"review label: unknown class '{label}'; the model's classes are {', '.join(classes)} (or {NOT_VALID})")
        item = self.find(prefix)
        decision = {"time": _now(), "reviewer": (reviewer or "").strip() or ANONYMOUS, "sha256": item.sha256, "class": label,
                    "name": item.name, "model_label": item.label, "model_verdict": item.verdict, "model_run": item.model_run}
        with self._locked():
            self._append(LABELS_LOG, decision)
        return decision

    def reviewed_examples(self) -> tuple[list[ReviewedExample], int]:
        """Every labelled image whose bytes are in the store (latest decision; `not_valid` left out), and how many
        were `not_valid`. Read without the lock: the logs are append-only and a half-written line is skipped."""
        examples, not_valid = [], 0
        for item in sorted(self.items(), key=lambda i: i.sha256):
            if item.decision is None:
                continue
            if item.decision["class"] == NOT_VALID:
                not_valid += 1
                continue
            path = self.image_path(item)
            if not path.is_file():
                log.warning("review store: the image of %s (%s) is missing from %s; left out of training", item.name, item.sha256[:12], path.parent)
                continue
            examples.append(ReviewedExample(path, item.decision["class"], reviewed_split(item.sha256), item.sha256, item.name))
        return examples, not_valid

    def export(self, destination: Path) -> dict[str, int]:
        """Reviewed images (not the not-valid ones) as class folders under `destination`, named by their original names."""
        counts: dict[str, int] = {}
        for item in self.items():
            if item.decision is None or item.decision["class"] == NOT_VALID:
                continue
            source = self.image_path(item)
            if not source.is_file():
                log.warning("review export: the image of %s (%s) is missing from %s; skipped", item.name, item.sha256[:12], source.parent)
                continue
            folder = Path(destination) / item.decision["class"]
            folder.mkdir(parents=True, exist_ok=True)
            stem = Path(item.name).stem or "image"
            shutil.copy2(source, folder / f"{stem}_{item.sha256[:8]}{source.suffix}")
            counts[item.decision["class"]] = counts.get(item.decision["class"], 0) + 1
        return counts

    def stats(self) -> dict[str, Any]:
        """Counts by status, verdict and reviewer, and the bytes held."""
        items = self.items()
        by_class: dict[str, int] = {}
        for item in items:
            if item.decision is not None:
                by_class[item.decision["class"]] = by_class.get(item.decision["class"], 0) + 1
        reviewers: dict[str, int] = {}
        for decision in self.decisions():
            reviewers[decision.get("reviewer", ANONYMOUS)] = reviewers.get(decision.get("reviewer", ANONYMOUS), 0) + 1
        why: dict[str, int] = {}
        for item in items:
            why[item.why] = why.get(item.why, 0) + 1
        return {"items": len(items), "unreviewed": sum(item.decision is None for item in items), "labelled": by_class, "queued_because": why,
                "decisions_by_reviewer": reviewers, "megabytes": round(sum(item.bytes for item in items) / 1e6, 3),
                "cap": {"items": self.max_items, "megabytes": self.max_bytes / 1e6}}
