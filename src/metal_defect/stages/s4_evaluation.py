"""Stage 4, `evaluation`: judge the trained models on validation, bundle the best, report it once on test (c06_evaluation).

The files it writes (base_models_metrics.json, best_base_model.json, quality_gate.json,
model_card.md, served/, models/, test/) are named by `c06_evaluation.evaluate`, which the tune
stage uses again for its tuned model.
"""

from __future__ import annotations

from typing import Any

from metal_defect.artifacts import read_json
from metal_defect.components.c06_evaluation.evaluate import evaluate_models
from metal_defect.config import DataPreprocessingParams, EvaluationParams, SchemaConfig
from metal_defect.stages.s1_data_ingestion import REPORT_FILE as INGESTION_REPORT


def run_stage(io: Any, *, evaluation: EvaluationParams, data_preprocessing: DataPreprocessingParams, schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: evaluate the models of stage 3 on stage 2's valid/test splits."""
    return evaluate_models(read_json(io.inputs["data_ingestion"] / INGESTION_REPORT), io.inputs["data_preprocessing"], io.inputs["train"],
                           evaluation, io.out_dir, run_id=io.run_id, limits=data_preprocessing, extensions=tuple(schema.extensions))
