"""What the line has been sending: answers per day by verdict, read from the predictions log.

The log (`predictions.jsonl`, one JSON line per answer) is rotated by `append_log` past a size
(`review.log_rotate_mb`) into `predictions.jsonl.1`, `.2`, ...; the history reads the current file
and the rotated ones still inside the window, and only the two fields it needs from each line,
so a log of a million lines is read in about a second.
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


def count_verdicts(path: Path, days: int = HISTORY_DAYS, today: dt.date | None = None) -> Counter:
    """(day, verdict) -> answers, over the last `days` days (unreadable answers count as 'unreadable')."""
    first_day = ((today or dt.date.today()) - dt.timedelta(days=days - 1)).isoformat()
    counts: Counter = Counter()
    start = len(TIME_PREFIX)
    for file in log_files(path, days):
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.startswith(TIME_PREFIX):
                    continue
                day = line[start:start + 10]
                if day < first_day:
                    continue
                at = line.find(VERDICT_KEY)
                if at < 0:
                    continue
                at += len(VERDICT_KEY)
                verdict = line[at + 1:line.find('"', at + 1)] if line[at] == '"' else "unreadable"
                counts[(day, verdict)] += 1
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
