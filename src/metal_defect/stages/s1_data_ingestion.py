"""Stage 1, `data_ingestion`: find the labelled images of the source (c01) and write the index and the report.

The stage's outside input is fingerprinted by `c01_data_ingestion.source_fingerprint`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from metal_defect.artifacts import write_json_atomic
from metal_defect.components.c01_data_ingestion import Item, Skipped, ingest, reason_kind
from metal_defect.config import DataIngestionParams, SchemaConfig

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"  # what stage 2 reads: classes, layout, items
REPORT_FILE = "ingestion_report.json"  # what a person (and the model card) reads


def run_stage(io: Any, *, data_ingestion: DataIngestionParams, schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: resolve the source, list images, write index.json and the report."""
    items, skipped, meta = ingest(data_ingestion, schema, io.out_dir, io.cache_dir)
    return write_outputs(items, skipped, meta, io.out_dir)


def write_outputs(items: list[Item], skipped: list[Skipped], meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """index.json (what stage 2 reads) and ingestion_report.json (what a person reads)."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), n in sorted(Counter((i.split or "all" if i.origin == "source" else f"reviewed ({i.split})", i.label) for i in items).items()):
        counts[split][label] = n
    reasons = Counter(reason_kind(s.reason) for s in skipped)
    report = {
        **meta,
        "images_found": len(items),
        "counts": counts,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(reasons),
        "skipped": [asdict(s) for s in skipped],
    }
    write_json_atomic(out_dir / INDEX_FILE, {"classes": report["classes"], "layout": meta["layout"], "items": [asdict(i) for i in items]})
    write_json_atomic(out_dir / REPORT_FILE, report)
    log.info("ingestion: %d images in %d classes (%s layout, %s source); %d files skipped", len(items), len(report["classes"]),
             meta["layout"], meta["source_kind"], len(skipped))
    for split, per_class in counts.items():
        log.info("  %-5s %s", split, ", ".join(f"{c}={n}" for c, n in per_class.items()))
    for reason, n in reasons.most_common():
        example = next(s for s in skipped if reason_kind(s.reason) == reason)
        log.warning("  skipped %d file(s): %s (e.g. %s)", n, reason, example.path)
    return {"images_found": len(items), "classes": report["classes"], "layout": meta["layout"], "skipped": len(skipped)}
