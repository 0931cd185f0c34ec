"""c04 model builder: the custom CNN and keras.applications backbones, one entry point.

Every model maps raw pixels (uint8, the c02 input contract) to class probabilities:
casting, grey-to-RGB replication, the backbone's own preprocessing and normalisation are
layers inside the model, so a saved model cannot be fed differently from training.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

from metal_defect.config import CustomCnnParams, ModelParams, TransferParams
from metal_defect.errors import ConfigError, DataError
from metal_defect.serving.keras_objects import FusedBatchNormalization, PixelPreprocess, ScheduledDropout

log = logging.getLogger(__name__)

CUSTOM = "custom_cnn"
# keras.applications name -> the input preprocessing it was trained with
BACKBONES: dict[str, str] = {
    "VGG16": "caffe", "VGG19": "caffe", "ResNet50": "caffe", "ResNet101": "caffe", "ResNet152": "caffe",
    "ResNet50V2": "tf", "ResNet101V2": "tf", "ResNet152V2": "tf", "MobileNet": "tf", "MobileNetV2": "tf",
    "InceptionV3": "tf", "Xception": "tf", "NASNetMobile": "tf", "DenseNet121": "torch", "DenseNet169": "torch",
    "DenseNet201": "torch", "MobileNetV3Small": "none", "MobileNetV3Large": "none",
    **{f"EfficientNetB{i}": "none" for i in range(8)},
    **{f"EfficientNetV2{s}": "none" for s in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    **{f"ConvNeXt{s}": "none" for s in ("Tiny", "Small", "Base")},
}


# ----------------------------------------------------------------------------- building
@dataclass
class BuiltModel:
    """A compiled-to-be model and how it was made (recorded in the manifest and model card)."""

    name: str
    model: keras.Model
    pretrained: bool
    weights: str  # "random", "imagenet" or the weights file used
    backbone: keras.Model | None = None

    @property
    def schedule(self) -> str:
        """two_phase (frozen base, then top unfrozen) for pretrained backbones, else end_to_end."""
        return "two_phase" if self.backbone is not None and self.pretrained else "end_to_end"


def build_model(name: str, image_shape: tuple[int, int, int], n_classes: int, params: ModelParams,
                pixel_stats: tuple[float, float] = (0.5, 0.25)) -> BuiltModel:
    """Build base model `name` (custom_cnn or a keras.applications name) for uint8 input."""
    if name == CUSTOM:
        return BuiltModel(name, custom_cnn(image_shape, n_classes, params.custom_cnn, pixel_stats), pretrained=False, weights="random")
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, [CUSTOM, *BACKBONES], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"train.models: unknown model '{name}'{hint}; use custom_cnn or one of {', '.join(BACKBONES)}")
    return transfer_model(name, image_shape, n_classes, params.transfer)


def custom_cnn(image_shape: tuple[int, int, int], n_classes: int, params: CustomCnnParams, pixel_stats: tuple[float, float]) -> keras.Model:
    """conv blocks (conv-BN-ReLU x n, max-pool), global pooling (`params.pooling`), dense head.

    Global average pooling alone averages a defect that covers a few cells of the last
    feature map away into the background texture; global max pooling keeps the strongest
    local response, so `avg_max` (both, concatenated) serves large textures and small defects.
    `pool_from: all_blocks` pools every block's output, not only the last: the head then sees
    fine-scale texture statistics (what a local-binary-pattern histogram measures) and the
    response to a defect of a few pixels before four poolings have merged it into its context.
    """
    inputs = keras.Input(image_shape, dtype="uint8", name="pixels")
    mean, std = pixel_stats
    # `auto` is decided by the train stage from the training split (c06 input_normalization); a model built
    # without that decision (a preview, a test) normalises with the statistics it was given
    mode = "dataset" if params.input_normalization == "auto" else params.input_normalization
    x = PixelPreprocess(mode, mean=mean, std=max(std, 1e-3), name="preprocess")(inputs)
    if params.input_scale < 1:  # inside the model: the input contract (the prepared size) stays the same
        height, width = (max(8, round(side * params.input_scale)) for side in image_shape[:2])
        x = layers.Resizing(height, width, interpolation="bilinear", antialias=True, name="input_resize")(x)
    taps = []
    for block, filters in enumerate(params.filters, 1):
        for conv in range(params.convs_per_block):
            x = layers.Conv2D(filters, params.kernel_size, padding="same", use_bias=False, name=f"block{block}_conv{conv + 1}")(x)
            x = FusedBatchNormalization(momentum=params.bn_momentum, name=f"block{block}_bn{conv + 1}")(x)
            x = layers.ReLU(name=f"block{block}_relu{conv + 1}")(x)
        before = x  # before the pooling: a few-pixel defect still holds its own cells here
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        # The global maximum of a map is that of its 2x2 max-pooled map when both sides are even
        # (nothing dropped): the same number from a quarter of the values, which in training
        # saves the backward pass over the full-resolution map (589 -> 533 ms a step at 160 px)
        taps.append((before, x if before.shape[1] % 2 == 0 and before.shape[2] % 2 == 0 else before))
    pooled = []
    for block, (for_avg, for_max) in enumerate(taps if params.pool_from == "all_blocks" else [(x, x)], 1):
        suffix = f"_block{block}" if params.pool_from == "all_blocks" else ""
        if params.pooling in ("avg", "avg_max"):
            pooled.append(layers.GlobalAveragePooling2D(name=f"gap{suffix}")(for_avg))
        if params.pooling in ("max", "avg_max"):
            pooled.append(layers.GlobalMaxPooling2D(name=f"gmp{suffix}")(for_max))
    x = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="pooled")(pooled)
    x = _head(x, n_classes, params.dropout, params.dense_units)
    return keras.Model(inputs, x, name=CUSTOM)


def _head(x: Any, n_classes: int, dropout: float, dense_units: int) -> Any:
    # ScheduledDropout: train.regularisation_ramp phases it in with the augmentation (c05 AdaptiveRegularisation)
    if dropout:
        x = ScheduledDropout(dropout, name="head_dropout1")(x)
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
        if dropout:
            x = ScheduledDropout(dropout, name="head_dropout2")(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def transfer_model(name: str, image_shape: tuple[int, int, int], n_classes: int, params: TransferParams) -> BuiltModel:
    """A keras.applications backbone with its preprocessing inside and a new classifier head."""
    height, width, _ = image_shape
    constructor = getattr(keras.applications, name)
    extra = {"include_preprocessing": True} if name.startswith(("EfficientNetV2", "MobileNetV3", "ConvNeXt")) else {}
    weights, pretrained, used = _resolve_weights(params)

    def make(weights_arg: str | None) -> keras.Model:
        return constructor(include_top=False, weights=weights_arg, input_shape=(height, width, 3), pooling="avg", **extra)

    try:
        backbone = make(weights)
    except Exception as exc:  # Keras raises a bare Exception("URL fetch failure ...") when offline
        if weights == "imagenet" and _is_download_failure(exc):
            backbone, pretrained, used = _offline_fallback(name, exc, params, make)
        elif weights is not None and weights != "imagenet":
            raise DataError(f"model.transfer.weights: could not load {weights} into {name}: {exc}") from exc
        else:
            raise
    inputs = keras.Input(image_shape, dtype="uint8", name="pixels")
    x = PixelPreprocess(BACKBONES[name], to_rgb=True, name="preprocess")(inputs)
    # a pretrained base runs in inference mode (its BatchNorm statistics stay ImageNet's);
    # a randomly initialised one must learn them, so it trains in training mode
    x = backbone(x, training=False if pretrained else None)
    x = _head(x, n_classes, params.dropout, params.dense_units)
    model = keras.Model(inputs, x, name=name)
    log.info("%s: %s weights (%s)", name, "pretrained" if pretrained else "random", used)
    return BuiltModel(name, model, pretrained, used, backbone)


def _offline_fallback(name: str, exc: Exception, params: TransferParams, make: Any) -> tuple[keras.Model, bool, str]:
    if params.offline_fallback == "error":
        raise DataError(f"{name}: ImageNet weights could not be downloaded ({exc}). Go online once (Keras caches them in "
                        "~/.keras/models), set model.transfer.weights to a local file, or model.transfer.offline_fallback=random") from exc
    log.warning("!" * 78)
    log.warning("%s: ImageNet weights could not be downloaded (%s).", name, str(exc).splitlines()[0][:160])
    log.warning("%s: TRAINING FROM RANDOM INITIALISATION INSTEAD (model.transfer.offline_fallback=random); recorded as pretrained: false", name)
    log.warning("!" * 78)
    return make(None), False, "random"


def _resolve_weights(params: TransferParams) -> tuple[str | None, bool, str]:
    if params.weights == "none":
        return None, False, "random"
    if params.weights == "imagenet":
        return "imagenet", True, "imagenet"
    if not os.path.isfile(params.weights):
        raise DataError(f"model.transfer.weights: weights file {params.weights} not found; use imagenet, none or an existing file")
    return params.weights, True, params.weights


def _is_download_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("url fetch failure", "urlopen", "urlerror", "name resolution", "network", "connection", "http error"))


# ----------------------------------------------------------------------------- phases
def freeze_backbone(built: BuiltModel) -> None:
    """Phase 1 of transfer learning: only the new head trains."""
    if built.backbone is not None:
        built.backbone.trainable = False


def unfreeze_top(built: BuiltModel, n_layers: int) -> int:
    """Phase 2: the top `n_layers` layers of the backbone train, BatchNorm stays frozen.

    Returns how many backbone layers are now trainable. Recompile after calling this.
    """
    backbone = built.backbone
    if backbone is None:
        return 0
    backbone.trainable = True
    cut = max(len(backbone.layers) - n_layers, 0)
    count = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)
        count += int(layer.trainable and bool(layer.weights))
    return count


# ----------------------------------------------------------------------------- reporting
def summary_text(model: keras.Model) -> str:
    """model.summary() as text, with trainable and total parameter counts."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model.summary(print_fn=lambda line, **_: print(line), line_length=110, expand_nested=False)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    return f"{buffer.getvalue()}\nparameters: {total:,} total, {trainable:,} trainable\n"


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """Total and trainable parameters, and multiply-adds for one image (convolutions and dense layers)."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    return {"total": int(model.count_params()), "trainable": trainable, "multiply_adds": multiply_adds(model)}


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass for one image, counted over Conv2D, DepthwiseConv2D and Dense
    layers (nested backbones included); pooling, normalisation and activations are left out."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += multiply_adds(layer)
            continue
        if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.Dense)) and layer.built:
            out_shape = layer.output.shape
            positions = int(np.prod([d for d in out_shape[1:-1] if d])) if len(out_shape) > 2 else 1
            kernel = layer.weights[0].shape  # (kh, kw, cin, cout), (kh, kw, cin, multiplier) or (in, out): one MAC per weight and position
            total += positions * int(np.prod(kernel))
    return int(total)
