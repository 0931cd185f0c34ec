"""Out-of-distribution score: distances to the training images, each over its validation threshold.

Four k-NN distances, all post-hoc (no retraining, a few matrix products per image), each
divided by its threshold (a quantile over validation images and their benign copies); the
score is the largest, so about (1 - quantile) of in-distribution images per part are flagged:

- **semantic**: L2-normalised penultimate features, Euclidean distance to the k-th nearest
  training image (Sun et al., "Out-of-distribution detection with deep nearest neighbors",
  ICML 2022). Catches other defects and other materials (near outliers).
- **statistics**: a few standardised image statistics (grey-level moments, edge energy, clipped
  shares). Catches blank, clipped and noise images the network's features map near training.
- **texture**: standardised channel means and spreads of a fine feature map (stride 4, the
  heatmap layer's rule): a texture description in the network's own filters (Gatys et al.'s
  style statistics). Catches photographs and other scenes whose penultimate features land
  near a class.
- **polarity**: the texture distance to the training images over the distance to their
  *negatives* (255 - pixels). An in-distribution image is far closer to the training images
  than to their negatives (ratio ~0.3 on NEU); an inverted image is the other way round
  (~3), and an unrelated image is about as far from both (~1). A likelihood-ratio test with
  the negatives as the background (Ren et al., NeurIPS 2019, in spirit). It adapts: where
  the training data holds both polarities, validation ratios are near 1, the threshold lands
  above them and inversion is not taken as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def neighbours_for(reference_count: int) -> int:
    """k for `ood_neighbours: auto`: 0.1 % of the reference images, at least 1 (the ratio of Sun et al.'s
    k=50 for CIFAR-10's 50,000 and k=1000 for ImageNet's 1.28 M training images)."""
    return max(1, round(reference_count / 1000))


def feature_layer(model: Any) -> str:
    """Name of the layer whose output feeds the final classifier (dropout layers skipped)."""
    import keras

    classifier = model.layers[-1]
    if not isinstance(classifier, keras.layers.Dense):
        raise ValueError(f"{model.name}: the last layer is {type(classifier).__name__}, not the Dense classifier")
    layer = _producer(classifier)
    while isinstance(layer, keras.layers.Dropout):
        layer = _producer(layer)
    return layer.name


def _producer(layer: Any) -> Any:
    return layer._inbound_nodes[0].parent_nodes[0].operation


def texture_layer(model: Any) -> str:
    """The feature map described by the texture statistics: the heatmap layer's default (the deepest
    layer at stride 4 or finer), fine enough to hold texture, deep enough to be the network's own."""
    from metal_defect.serving.explain import heatmap_layer

    return heatmap_layer(model)


def with_features(model: Any, feature_layer_name: str, texture_layer_name: str | None = None) -> Any:
    """The same network returning (probabilities, features): the penultimate features, followed by
    the texture layer's channel means and standard deviations when `texture_layer_name` is given."""
    import keras

    from metal_defect.serving.explain import tap_model

    names = [feature_layer_name] + ([texture_layer_name] if texture_layer_name else [])
    tapped = tap_model(model, names)
    probabilities, features, *maps = tapped.outputs
    if maps:
        feature_map = maps[0]
        features = keras.layers.Concatenate(name="ood_features")([
            keras.layers.Flatten()(features), keras.ops.mean(feature_map, axis=(1, 2)), keras.ops.std(feature_map, axis=(1, 2))])
    return keras.Model(tapped.inputs[0], [probabilities, features], name=f"{model.name}_serving")


def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def standardised_knn(z: np.ndarray, reference: np.ndarray, k: int, reference_norms: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance of each (standardised) row to its k-th nearest reference row
    (`reference_norms`: the reference rows' squared norms, when kept from an earlier call)."""
    if len(z) == 0:
        return np.zeros(0, dtype=np.float64)
    norms = (reference ** 2).sum(axis=1) if reference_norms is None else reference_norms
    d2 = (z ** 2).sum(axis=1)[:, None] + norms[None, :] - 2 * z @ reference.T
    k = min(k, len(reference))
    return np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0)).astype(np.float64)


def knn_scores(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Distance of each (normalised) feature row to its k-th nearest reference row."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    k = min(k, len(reference))
    similarity = normalise(features) @ reference.T
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an outlier scores higher than an inlier (ties count half)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


# ----------------------------------------------------------------------------- image statistics
STATISTICS = ("mean", "std", "skewness", "kurtosis", "gradient_x", "gradient_y", "laplacian", "dark_share", "bright_share")


def image_statistics(images: np.ndarray) -> np.ndarray:
    """A few numbers per image that describe how it looks, not what it shows: grey-level moments,
    edge energy along each axis, fine-detail energy, clipped shares; plus channel offsets for RGB.

    The network's features are trained to ignore much of this, which is why an inverted image or
    a photograph can land near a training image there; here they stand out.
    """
    x = np.asarray(images, dtype=np.float32) / 255.0
    grey = x.mean(axis=-1)
    n = len(grey)
    flat = grey.reshape(n, -1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    centred = (flat - mean[:, None]) / np.maximum(std[:, None], 1e-3)
    gx = np.abs(np.diff(grey, axis=2)).reshape(n, -1).mean(axis=1)
    gy = np.abs(np.diff(grey, axis=1)).reshape(n, -1).mean(axis=1)
    lap = np.abs(grey[:, 1:-1, 1:-1] * 4 - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).reshape(n, -1).mean(axis=1)
    squared = centred * centred  # (x ** 3 with an integer power takes numpy's slow general path: 2 ms a picture)
    columns = [mean, std, (squared * centred).mean(axis=1), np.log1p((squared * squared).mean(axis=1)), gx, gy, lap,
               (flat < 0.02).mean(axis=1), (flat > 0.98).mean(axis=1)]
    if x.shape[-1] == 3:
        columns += [x[..., 0].reshape(n, -1).mean(axis=1) - x[..., 1].reshape(n, -1).mean(axis=1),
                    x[..., 2].reshape(n, -1).mean(axis=1) - x[..., 1].reshape(n, -1).mean(axis=1)]
    return np.stack(columns, axis=1).astype(np.float32)


COMPONENTS = ("semantic", "statistics", "texture", "polarity")


@dataclass
class OodScorer:
    """k-NN distances (see the module's docstring), each divided by its validation threshold; the
    score is the largest. A score above 1 means out of distribution.

    `features` from the serving model: [penultimate | texture means | texture stds]. A scorer fitted
    without texture statistics (`texture` None) has the first two components only.
    """

    features: np.ndarray  # [N, D] normalised training penultimate features
    statistics: np.ndarray  # [N, S] standardised training image statistics
    stats_mean: np.ndarray
    stats_scale: np.ndarray
    neighbours: int
    feature_threshold: float = 1.0
    statistics_threshold: float = 1.0
    texture: np.ndarray | None = None  # [N, T] standardised texture statistics of the training images
    texture_inverted: np.ndarray | None = None  # [N, T] the same of their negatives
    texture_mean: np.ndarray | None = None
    texture_scale: np.ndarray | None = None
    texture_threshold: float = 1.0
    polarity_threshold: float = 1.0
    _norms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _nearest(self, z: np.ndarray, reference: str) -> np.ndarray:
        """k-NN distance to the named reference array, its squared row norms computed once per array
        (kept with the array they belong to, so a reference replaced later gets its own)."""
        rows = getattr(self, reference)
        kept = self._norms.get(reference)
        if kept is None or kept[0] is not rows:
            kept = self._norms[reference] = (rows, (rows ** 2).sum(axis=1))
        return standardised_knn(z, rows, self.neighbours, kept[1])

    @property
    def thresholds(self) -> tuple[float, ...]:
        both = (self.feature_threshold, self.statistics_threshold)
        return both if self.texture is None else (*both, self.texture_threshold, self.polarity_threshold)

    def set_thresholds(self, components: np.ndarray, quantile: float) -> None:
        """Each threshold = the `quantile` of its component's distances ([N, parts], in-distribution images)."""
        values = [max(float(np.quantile(c, quantile)), 1e-6) for c in components.T]
        self.feature_threshold, self.statistics_threshold = values[:2]
        if len(values) > 2:
            self.texture_threshold, self.polarity_threshold = values[2:]

    def components(self, features: np.ndarray, images: np.ndarray) -> np.ndarray:
        """[N, parts] distances before the thresholds: semantic, statistics (, texture, polarity)."""
        penultimate = features[:, :self.features.shape[1]]
        parts = [knn_scores(penultimate, self.features, self.neighbours), self.statistics_distance(images)]
        if self.texture is not None:
            z = (features[:, self.features.shape[1]:] - self.texture_mean) / self.texture_scale
            to_training, to_negatives = self._nearest(z, "texture"), self._nearest(z, "texture_inverted")
            parts += [to_training, to_training / np.maximum(to_negatives, 1e-9)]
        return np.stack(parts, axis=1) if len(features) else np.zeros((0, len(parts)))

    def statistics_distance(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0)
        return self._nearest((image_statistics(images) - self.stats_mean) / self.stats_scale, "statistics")

    def combine(self, components: np.ndarray) -> np.ndarray:
        """The OOD score from the component distances: the largest over its threshold."""
        return (components / np.asarray(self.thresholds)).max(axis=1) if len(components) else np.zeros(0)

    def deciding(self, components: np.ndarray) -> list[str]:
        """Per image, the component that decided its score."""
        return [COMPONENTS[i] for i in (components / np.asarray(self.thresholds)).argmax(axis=1)]

    def __call__(self, features: np.ndarray, images: np.ndarray) -> np.ndarray:
        return self.combine(self.components(features, images))


def _standardise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = values.mean(axis=0)
    return mean.astype(np.float32), np.maximum(values.std(axis=0), 1e-6).astype(np.float32)


def fit_scorer(train_features: np.ndarray, train_images: np.ndarray, neighbours: int, penultimate_size: int | None = None,
               inverted_features: np.ndarray | None = None) -> OodScorer:
    """The reference sets from the training images (thresholds left at 1: see `set_thresholds`).

    With a texture part (`penultimate_size` < the feature width) the negatives' features
    (`inverted_features`, the serving model on 255 - images) give the polarity reference.
    """
    size = train_features.shape[1] if penultimate_size is None else penultimate_size
    stats = image_statistics(train_images)
    mean, scale = _standardise(stats)
    scorer = OodScorer(normalise(train_features[:, :size]), ((stats - mean) / scale).astype(np.float32), mean, scale, neighbours)
    if size < train_features.shape[1]:
        if inverted_features is None:
            raise ValueError("fit_scorer: a texture part needs the negatives' features (inverted_features)")
        texture = train_features[:, size:]
        scorer.texture_mean, scorer.texture_scale = _standardise(texture)
        scorer.texture = ((texture - scorer.texture_mean) / scorer.texture_scale).astype(np.float32)
        scorer.texture_inverted = ((inverted_features[:, size:] - scorer.texture_mean) / scorer.texture_scale).astype(np.float32)
    return scorer


BENIGN_CHANGES = ((1.0, 75), (1.25, None), (1.6, 75))  # (scale, JPEG quality or None)


def benign_variants(images: np.ndarray) -> np.ndarray:
    """The same images after changes that keep them in distribution (BENIGN_CHANGES): JPEG at quality
    75; a 1.25x upscale and back (a second resampling's blur); saved 1.6x larger as JPEG and brought
    back to size (a file exported at another size)."""
    import io

    from PIL import Image

    out = []
    for array in images:
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        size = image.size
        for scale, quality in BENIGN_CHANGES:
            changed = image if scale == 1 else image.resize((round(size[0] * scale), round(size[1] * scale)), Image.Resampling.BILINEAR)
            if quality is not None:
                buffer = io.BytesIO()
                changed.save(buffer, format="JPEG", quality=quality)
                changed = Image.open(buffer).convert(image.mode)
            out.append(np.asarray(changed if scale == 1 else changed.resize(size, Image.Resampling.BILINEAR)))
    stacked = np.stack(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
    return stacked[..., None] if stacked.ndim == 3 else stacked
