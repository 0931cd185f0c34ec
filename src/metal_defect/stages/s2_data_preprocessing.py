"""Stage 2, `data_preprocessing`: decode, check, de-duplicate, resize and split the indexed images (c02).

c02 writes the prepared-data folder (images/, records.json, class_labels.json,
pre_processor.joblib, preprocessing_report.json, eda/): a format the loader (c03) and the
evaluation (c06) read, so its file names are c02's.
"""

from __future__ import annotations

import os
from typing import Any

from metal_defect.artifacts import read_json
from metal_defect.components.c02_data_preprocessing import prepare
from metal_defect.config import BaseParams, DataPreprocessingParams, SchemaConfig
from metal_defect.stages.s1_data_ingestion import INDEX_FILE


def run_stage(io: Any, *, base: BaseParams, data_preprocessing: DataPreprocessingParams, schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: read stage 1's index and prepare the images into io.out_dir."""
    ingested = io.inputs["data_ingestion"]
    index = read_json(ingested / INDEX_FILE)
    items = [dict(item, path=str(ingested / item["path"]) if not os.path.isabs(item["path"]) else item["path"]) for item in index["items"]]
    return prepare(items, index["classes"], base, data_preprocessing, schema, io.out_dir)
