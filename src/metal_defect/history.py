"""What the line has been sending: answers per day by verdict, read from the predictions log.

The log (`predictions.jsonl`, one JSON line per answer) is rotated by `append_log` past a size
(`review.log_rotate_mb`) into `predictions.jsonl.1`, `.2`, ...; the history reads the current file
and the rotated ones still inside the window, and only the two fields it needs from each line,
so a log of a million lines is read in about a second, and later reads count only the lines
appended since (a process keeps each file's counts and how far it has read).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

HISTORY_DAYS = 90
FLAGGED = ("uncertain", "out_of_distribution")
TIME_PREFIX = '{"time": "'
VERDICT_KEY = '"verdict": '


def log_files(path: Path, days: int) -> list[Path]:
    """The log and its rotated files changed within the last `days` days, oldest first."""
    path = Path(path)
    cutoff = time.time() - days * 86400
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 10**9, reverse=True)
    return [p for p in [*rotated, path] if p.is_file() and p.stat().st_mtime >= cutoff]


# path -> (inode, bytes counted, (day, verdict) counts): the log only grows between rotations, so a
# later read counts only the lines appended since; a rotated file (never appended to) is read once
_COUNTED: dict[str, tuple[int, int, Counter]] = {}


def file_counts(file: Path) -> Counter:
    """(day, verdict) -> answers in one log file, all days; only the bytes appended since the last call are read."""
    info = file.stat()
    inode, done, counts = _COUNTED.get(str(file), (info.st_ino, 0, Counter()))
    if inode != info.st_ino or info.st_size < done:  # replaced or truncated: count it again
        done, counts = 0, Counter()
    if info.st_size > done:
        counts = counts.copy()
        start = len(TIME_PREFIX)
        with open(file, "rb") as handle:
            handle.seek(done)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: counted on a later read
                done += len(raw)
                line = raw.decode("utf-8", errors="replace")
                if not line.startswith(TIME_PREFIX):
                    continue
                at = line.find(VERDICT_KEY)
                if at < 0:
                    continue
                at += len(VERDICT_KEY)
                verdict = line[at + 1:line.find('"', at + 1)] if line[at] == '"' else "unreadable"
                counts[(line[start:start + 10], verdict)] += 1
    if len(_COUNTED) > 64:  # rotated files that are gone
        _COUNTED.clear()
    _COUNTED[str(file)] = (info.st_ino, done, counts)
    return counts


def count_verdicts(path: Path, days: int = HISTORY_DAYS, today: dt.date | None = None) -> Counter:
    """(day, verdict) -> answers, over the last `days` days (unreadable answers count as 'unreadable')."""
    first_day = ((today or dt.date.today()) - dt.timedelta(days=days - 1)).isoformat()
    counts: Counter = Counter()
    for file in log_files(path, days):
        counts.update({key: n for key, n in file_counts(file).items() if key[0] >= first_day})
    return counts


def daily_verdicts(path: Path, days: int = HISTORY_DAYS, today: dt.date | None = None) -> Any:
    """A pandas frame: one row per day with answers, a column per verdict (class names count as 'answered'),
    and the flagged share (uncertain + out of distribution) of that day's answers."""
    import pandas as pd

    rows: dict[str, Counter] = {}
    for (day, verdict), n in count_verdicts(path, days, today).items():
        kind = verdict if verdict in (*FLAGGED, "unreadable") else "answered"
        rows.setdefault(day, Counter())[kind] += n
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype(int).sort_index()
    for column in ("answered", *FLAGGED):
        if column not in frame:
            frame[column] = 0
    frame.index = pd.to_datetime(frame.index)
    frame["flagged_share"] = frame[list(FLAGGED)].sum(axis=1) / frame.sum(axis=1)
    return frame
