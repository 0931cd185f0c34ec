"""c03 dataset loader: tf.data pipelines over c02's prepared images.

Batches are (uint8 images [B, H, W, C], int32 labels [B]): the model does its own
normalisation, so training and serving feed it the same raw pixels. Training data is
shuffled (seeded) and augmented; validation and test are neither. A split is cached in
memory after decoding only if it fits under `cache_max_mb`; otherwise it streams from
disk every epoch, so memory does not grow with the dataset.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect.artifacts import read_json
from metal_defect.components.c02_data_preprocessing import RECORDS_FILE, SPLITS
from metal_defect.config import AugmentationParams, DataLoaderParams
from metal_defect.errors import ArtifactError

log = logging.getLogger(__name__)
MB = 1024 * 1024
# tf.data seeds are (global seed, op seed); with no global seed set TensorFlow uses this one
# (tensorflow/python/framework/random_seed.py, DEFAULT_GRAPH_SEED): fixing it keeps the streams of a fresh process
TF_DEFAULT_GLOBAL_SEED = 87654321
IMBALANCE_FOR_AUTO = 1.5  # `auto` class balancing: on when the largest training class has more than this many times the smallest's images


@dataclass
class SplitData:
    """One split: its pipeline and what it holds."""

    dataset: Any  # tf.data.Dataset of (uint8 images, int32 labels) batches
    files: list[Path]
    labels: np.ndarray
    cached: bool
    balanced: bool = False  # drawn class by class (data_loader.class_sampling), not shuffled as it comes
    augmented_share: Any = None  # a tf.Variable: the probability that a training image is augmented (1; train.regularisation_ramp moves it)

    @property
    def size(self) -> int:
        return len(self.files)


@dataclass
class Datasets:
    """train/valid/test pipelines plus the label encoding and input shape."""

    splits: dict[str, SplitData]
    class_names: list[str]
    image_shape: tuple[int, int, int]
    batch_size: int

    def __getitem__(self, split: str) -> SplitData:
        if split not in self.splits:
            raise ArtifactError(f"the prepared data has no '{split}' split (it has {sorted(self.splits)})")
        return self.splits[split]

    def steps(self, split: str) -> int:
        return math.ceil(self[split].size / self.batch_size)


def read_records(prepared_dir: Path) -> dict[str, Any]:
    """c02's records.json: classes, image size, colour mode and one record per image."""
    return read_json(Path(prepared_dir) / RECORDS_FILE)


def build_datasets(prepared_dir: Path, params: DataLoaderParams, seed: int, splits: tuple[str, ...] = SPLITS) -> Datasets:
    """Pipelines for the requested splits of a c02 output folder (empty splits are left out).

    Their shuffling and augmentation streams depend on `seed` alone: TensorFlow folds its global
    seed into every tf.data seed, and a run earlier in the same process (bench loops, tests) has
    set it, so it is reset to TensorFlow's own unset default, the value a fresh process sees."""
    import tensorflow as tf  # lazy: read_records serves the CLI and the app, which must not start TensorFlow for it

    tf.random.set_seed(TF_DEFAULT_GLOBAL_SEED)
    prepared_dir = Path(prepared_dir)
    data = read_records(prepared_dir)
    channels = 1 if data["color_mode"] == "grayscale" else 3
    shape = (data["image_size"], data["image_size"], channels)
    result: dict[str, SplitData] = {}
    for split in splits:
        rows = [r for r in data["records"] if r["split"] == split]
        if not rows:
            continue
        if split == "train":
            rows = with_reviewed_share(rows, params.reviewed_share)
        files = [prepared_dir / r["file"] for r in rows]
        labels = np.array([r["label_index"] for r in rows], dtype=np.int32)
        result[split] = make_split(files, labels, shape, params, seed, training=split == "train")
    return Datasets(result, list(data["classes"]), shape, params.batch_size)


def with_reviewed_share(rows: list[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    """Training records with the reviewed ones (origin "reviewed") repeated until they make up at least `share` of
    them: a few dozen corrected hard cases among a thousand images would otherwise hardly move the model
    (measured on NEU: 27 reviewed images drawn once each, and the next model still got the same 7 of them wrong)."""
    reviewed = [r for r in rows if r.get("origin") == "reviewed"]
    others = len(rows) - len(reviewed)
    if not reviewed or share <= 0 or len(reviewed) >= share * len(rows):
        return rows
    repeat = math.ceil(share * others / ((1 - share) * len(reviewed)))
    log.info("%d reviewed training images drawn %d times each: %.0f %% of an epoch (data_loader.reviewed_share %g)", len(reviewed), repeat,
             100 * repeat * len(reviewed) / (others + repeat * len(reviewed)), share)
    return rows + reviewed * (repeat - 1)


def imbalance_ratio(labels: np.ndarray) -> float:
    """The largest class's image count over the smallest's (classes present only)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    counts = counts[counts > 0]
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def balanced_sampling(setting: str, labels: np.ndarray) -> bool:
    """data_loader.class_sampling: balanced / shuffle as given; auto when the training split is imbalanced."""
    if setting != "auto":
        return setting == "balanced"
    return imbalance_ratio(labels) > IMBALANCE_FOR_AUTO


def class_draw_shares(labels: np.ndarray, power: float) -> np.ndarray:
    """Each present class's share of the drawn training images: proportional to count**(1 - power).

    power 1 draws every class equally often, 0 as often as it occurs; 0.5 halfway (in log terms),
    the same scale as train.class_weight_power."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64)).astype(np.float64)
    shares = np.where(counts > 0, counts ** (1.0 - power), 0.0)
    return shares / shares.sum()


def make_split(files: list[Path], labels: np.ndarray, shape: tuple[int, int, int], params: DataLoaderParams, seed: int, training: bool) -> SplitData:
    """One tf.data pipeline: decode, cache if it fits, shuffle (or draw class-balanced) + augment when training, batch."""
    import tensorflow as tf

    decoded_mb = len(files) * int(np.prod(shape)) / MB
    cache = decoded_mb <= params.cache_max_mb
    balanced = training and balanced_sampling(params.class_sampling, labels)
    if balanced:
        ds = _balanced_stream(files, labels, shape, params, seed, cache)
    else:
        ds = _shuffled_stream(files, labels, shape, params, seed, cache, training)
    share = None
    if training and augmentation_enabled(params.augmentation):
        # read at every image, so the training callbacks can phase the augmentation in (c05 AdaptiveRegularisation)
        share = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="augmented_share")
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, s: (augment(pair[0], s, params.augmentation, share), pair[1]), num_parallel_calls=tf.data.AUTOTUNE
        )
    ds = ds.batch(params.batch_size).prefetch(tf.data.AUTOTUNE)
    log.debug("dataset: %d images, %.0f MB decoded, %s, %s", len(files), decoded_mb, "cached in memory" if cache else "streamed from disk",
              "class-balanced draws, augmented" if balanced else "augmented" if training else "not augmented")
    return SplitData(ds, files, labels, cache, balanced, share)


def _shuffled_stream(files: list[Path], labels: np.ndarray, shape: tuple[int, int, int], params: DataLoaderParams, seed: int, cache: bool,
                     training: bool) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(([str(f) for f in files], labels))
    if training and not cache:  # shuffle the file names (cheap) before decoding
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda path, label: (_decode_png(path, shape), label), num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
        if training:
            ds = ds.shuffle(min(params.shuffle_buffer, len(files)), seed=seed, reshuffle_each_iteration=True)
    return ds


def _balanced_stream(files: list[Path], labels: np.ndarray, shape: tuple[int, int, int], params: DataLoaderParams, seed: int, cache: bool) -> Any:
    """An epoch of len(files) images drawn class by class with `class_draw_shares`: a rare class's images
    come back (augmented differently) several times an epoch, a common class's images not all of them
    every epoch; each class's stream is its own shuffled, repeated pipeline (decoded once when cached)."""
    import tensorflow as tf

    shares = class_draw_shares(labels, params.class_sampling_power)
    streams, weights = [], []
    for label in np.flatnonzero(shares):
        chosen = [str(f) for f, lab in zip(files, labels) if lab == label]
        ds = tf.data.Dataset.from_tensor_slices((chosen, np.full(len(chosen), label, dtype=np.int32)))
        if cache:
            ds = ds.map(lambda path, lab: (_decode_png(path, shape), lab), num_parallel_calls=tf.data.AUTOTUNE).cache()
            ds = ds.shuffle(min(params.shuffle_buffer, len(chosen)), seed=seed + int(label), reshuffle_each_iteration=True)
        else:
            ds = ds.shuffle(len(chosen), seed=seed + int(label), reshuffle_each_iteration=True)
            ds = ds.map(lambda path, lab: (_decode_png(path, shape), lab), num_parallel_calls=tf.data.AUTOTUNE)
        streams.append(ds.repeat())
        weights.append(float(shares[label]))
    mixed = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed, rerandomize_each_iteration=True)
    return mixed.take(len(files))


def _decode_png(path: Any, shape: tuple[int, int, int]) -> Any:
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(path), channels=shape[-1])
    image.set_shape(shape)
    return image


def augmentation_enabled(aug: AugmentationParams) -> bool:
    return any([aug.flip_horizontal, aug.flip_vertical, aug.rotate90, aug.rotation_degrees, aug.brightness, aug.contrast, aug.noise_std,
                aug.resample_blur])


def augment(image: Any, seed: Any, aug: AugmentationParams, share: Any = None) -> Any:
    """Random label-preserving changes to one uint8 image; deterministic given `seed` ([2] int64).

    `share` (a scalar, may be a tf.Variable): the probability that the image is changed at all."""
    import tensorflow as tf

    if share is not None:
        coin = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 8))
        return tf.cond(coin < share, lambda: augment(image, seed, aug), lambda: image)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    if aug.flip_horizontal:
        image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    if aug.flip_vertical:
        image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    if aug.rotate90:
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        image = tf.image.rot90(image, k)
    photometric = aug.rotation_degrees or aug.brightness or aug.contrast or aug.noise_std or aug.resample_blur
    if not photometric:
        return image
    x = tf.cast(image, tf.float32)
    if aug.resample_blur:
        # the losses of a second resampling (a file saved at another size, then converted again):
        # down to a random share of the resolution, antialiased, and back up; on half of the
        # images only, so that the model also learns from the sharp images it is tested on
        share_and_coin = tf.random.stateless_uniform([2], seeds[7])
        share = 1.0 - aug.resample_blur * share_and_coin[0]
        size = tf.shape(x)[:2]
        smaller = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * share), tf.int32), 1)
        # a branch, not tf.where: the two resizes run only for the images that keep them
        x = tf.cond(share_and_coin[1] < 0.5, lambda: tf.image.resize(tf.image.resize(x, smaller, antialias=True), size), lambda: x)
    if aug.rotation_degrees:
        angle = tf.random.stateless_uniform([], seeds[3], -aug.rotation_degrees, aug.rotation_degrees) * (math.pi / 180.0)
        x = _rotate(x, angle)
    if aug.brightness:
        x = x + tf.random.stateless_uniform([], seeds[4], -aug.brightness, aug.brightness) * 255.0
    if aug.contrast:
        factor = tf.random.stateless_uniform([], seeds[5], 1.0 - aug.contrast, 1.0 + aug.contrast)
        mean = tf.reduce_mean(x)
        x = (x - mean) * factor + mean
    if aug.noise_std:
        x = x + tf.random.stateless_normal(tf.shape(x), seeds[6], stddev=aug.noise_std * 255.0)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _rotate(x: Any, angle: Any) -> Any:
    """Rotate a float image [H, W, C] about its centre, reflecting at the borders."""
    import tensorflow as tf

    height = tf.cast(tf.shape(x)[0], tf.float32)
    width = tf.cast(tf.shape(x)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # maps output (x, y) to input coordinates: inverse rotation about the centre
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2], fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT"
    )
    return out[0]
