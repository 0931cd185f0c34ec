"""Stage 3, `train`: train every model in train.models (c03 loader, c04 builder, c05 callbacks, c06 training).

c06_training writes the trained-models folder (models/<name>/model.keras and history.json,
train_summary.json, model_summaries.txt): a format the evaluation and the tuning read, so its
file names are c06_training's.
"""

from __future__ import annotations

from typing import Any

from metal_defect.components.c03_dataset_loader import build_datasets
from metal_defect.components.c06_training import train_models
from metal_defect.config import BaseParams, CallbacksParams, DataLoaderParams, ModelParams, TrainParams


def run_stage(io: Any, *, base: BaseParams, data_loader: DataLoaderParams, model: ModelParams, callbacks: CallbacksParams,
              train: TrainParams) -> dict[str, Any]:
    """Runner entry: train every model in train.models on stage 2's prepared images."""
    data = build_datasets(io.inputs["data_preprocessing"], data_loader, base.seed)
    return train_models(data, base, model, callbacks, train, io.work_dir, io.out_dir)
