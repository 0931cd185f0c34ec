"""Where the model looked: class activation heatmaps, and how often they point at the defect.

Two gradient-based maps over a convolutional layer's output A for the predicted class c:
Grad-CAM (Selvaraju et al., 2017) weights each channel by its mean gradient,
ReLU(sum_k mean(dy/dA_k) A_k); LayerCAM (Jiang et al., 2021) weights every position by its
own positive gradient, ReLU(sum_k ReLU(dy/dA_k) A_k), which stays sharp at finer layers.
LayerCAM is the default: on NEU it points at the defect far more often (README). The map is
computed in the model's input frame, then the padding is cut away and it is resized to the
original image's pixel frame, so a peak is a pixel of the file the user gave.

Pointing accuracy: a hit when the heatmap's peak lies inside a ground-truth region (a Pascal
VOC box, or the white pixels of a defect mask), and the pointing game's variant with a
15-pixel tolerance (Zhang et al., 2016).
Nothing here runs unless a heatmap is asked for: the predictor's fast path never builds it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metal_defect.serving.images import content_box

POINTING_TOLERANCE_PX = 15


METHODS = ("layercam", "gradcam")
METHOD_NAMES = {"layercam": "LayerCAM", "gradcam": "Grad-CAM"}


def spatial_layers(model: Any) -> list[tuple[str, int]]:
    """(name, side of its feature map) of every layer with a spatial (4-D) output after the input
    conversion, in order; layers of a nested keras.applications backbone as `backbone/layer`."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += [(f"{layer.name}/{inner.name}", int(_shape(inner)[1])) for inner in layer.layers
                    if len(_shape(inner)) == 4 and not isinstance(inner, keras.layers.InputLayer)]
        elif len(_shape(layer)) == 4 and not isinstance(layer, keras.layers.InputLayer) and layer.name != "preprocess":
            out.append((layer.name, int(_shape(layer)[1])))
    return out


def last_spatial_layer(model: Any) -> str:
    """The last layer with a spatial output: Grad-CAM's usual choice."""
    layers = spatial_layers(model)
    if not layers:
        raise ValueError(f"{model.name}: no layer with a spatial output to explain")
    return layers[-1][0]


def candidate_layers(model: Any, input_size: int) -> list[tuple[str, int]]:
    """The deepest layer at each feature-map size smaller than the input, coarsest (deepest) first."""
    deepest: dict[int, str] = {}
    for name, side in spatial_layers(model):
        if side < input_size:
            deepest[side] = name
    return sorted(((name, side) for side, name in deepest.items()), key=lambda item: item[1])


def heatmap_layer(model: Any, input_size: int | None = None) -> str:
    """The default layer without boxes to choose by: the deepest whose map is at least a quarter
    of the input's side (stride 4; the best stride measured on NEU), else the last spatial layer."""
    size = input_size or int(model.inputs[0].shape[1])
    fine = [name for name, side in candidate_layers(model, size) if side * 4 >= size]
    return fine[0] if fine else last_spatial_layer(model)


def _shape(layer: Any) -> tuple:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def tap_model(model: Any, layers: list[str]) -> Any:
    """A model returning [probabilities, output of each of `layers`]; a layer of a nested
    keras.applications backbone is named `backbone/layer`."""
    import keras

    if not any("/" in name for name in layers):
        # one input tensor, not a list of one: called with a bare array, Keras would warn about the structure
        return keras.Model(model.inputs[0], [model.outputs[0], *(model.get_layer(name).output for name in layers)])
    # our transfer models are a chain: input -> preprocess -> backbone -> head layers
    inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
    x, tapped = inputs, {}
    for current in model.layers[1:]:
        inner = [name for name in layers if name.startswith(f"{current.name}/")]
        if inner:
            split = keras.Model(current.inputs, [current.outputs[0], *(current.get_layer(name.split("/", 1)[1]).output for name in inner)])
            x, *maps = split(x)
            tapped.update(zip(inner, maps))
        else:
            x = current(x)
        if current.name in layers:
            tapped[current.name] = x
    return keras.Model(inputs, [x, *(tapped[name] for name in layers)])


def gradcam_model(model: Any, layer: str) -> Any:
    """A model returning (feature map of `layer`, probabilities)."""
    import keras

    tapped = tap_model(model, [layer])
    return keras.Model(tapped.inputs[0], [tapped.outputs[1], tapped.outputs[0]])


class GradCam:
    """A class activation map (LayerCAM or Grad-CAM) for one model and layer; call with uint8
    images [N, H, W, C] and class indices."""

    def __init__(self, model: Any, layer: str | None = None, method: str = "layercam"):
        import tensorflow as tf

        if method not in METHODS:
            raise ValueError(f"heatmap method {method!r}: use one of {', '.join(METHODS)}")
        self.layer, self.method = layer or heatmap_layer(model), method
        network = gradcam_model(model, self.layer)

        @tf.function(reduce_retracing=True)
        def maps(pixels: Any, classes: Any) -> Any:
            with tf.GradientTape() as tape:
                feature, probs = network(pixels, training=False)
                tape.watch(feature)
                # the log-probability keeps gradients alive when the softmax saturates at 1.0
                score = tf.gather(tf.math.log(probs + 1e-12), classes, axis=1, batch_dims=1)
            grads = tape.gradient(score, feature)
            if method == "gradcam":
                weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            else:
                weights = tf.nn.relu(grads)
            return tf.nn.relu(tf.reduce_sum(weights * feature, axis=-1))

        self._maps = maps

    def __call__(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Heatmaps [N, h, w] in the feature map's frame, each scaled to 0..1."""
        out = np.asarray(self._maps(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(classes, dtype=np.int32)), dtype=np.float64)
        top = out.reshape(len(out), -1).max(axis=1).reshape(-1, 1, 1)
        return np.divide(out, top, out=np.zeros_like(out), where=top > 0)


def to_original_frame(heat: np.ndarray, original_size: tuple[int, int], image_size: int, resize: str) -> np.ndarray:
    """A heatmap over the model input, resized to the input, cut to the image's area, resized to (width, height), scaled to 0..1."""
    width, height = original_size
    full = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((image_size, image_size), Image.Resampling.BILINEAR))
    x0, y0, x1, y1 = content_box(width, height, image_size, resize)
    inner = Image.fromarray(np.ascontiguousarray(full[y0:y1, x0:x1]), mode="F")
    out = np.clip(np.asarray(inner.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32), 0, None)
    top = out.max(initial=0.0)
    return out / top if top > 0 else out


def peak(heat: np.ndarray) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum (the first one in reading order on ties)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(x), int(y)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image in grey with the heatmap in a colour scale over it, and the peak marked.

    Worked in 8 bits by Pillow (a 256-colour table, then a blend): about 7 bytes per pixel,
    where float colour arrays took over 60."""
    from PIL import ImageDraw

    grey = image.convert("L").convert("RGB")
    levels = Image.fromarray(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), "L")
    colour = levels.convert("P")
    colour.putpalette(_jet_palette())
    blended = Image.blend(grey, colour.convert("RGB"), alpha)
    x, y = peak(heat)
    radius = max(3, min(blended.size) // 40)
    draw = ImageDraw.Draw(blended)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(255, 255, 255), width=max(1, radius // 2))
    return blended


def _jet_palette() -> list[int]:
    """matplotlib's jet colour map as 256 RGB entries (a Pillow palette)."""
    from matplotlib import colormaps

    table = np.round(colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return table.reshape(-1).tolist()


# ----------------------------------------------------------------------------- pointing accuracy
@dataclass(frozen=True)
class Boxes:
    """Ground-truth boxes of one image in its Pascal VOC frame."""

    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # xmin, ymin, xmax, ymax (pixels, inclusive)

    def scaled_to(self, width: int, height: int) -> Boxes:
        sx, sy = width / self.width, height / self.height
        return Boxes(width, height, tuple((a * sx, b * sy, c * sx, d * sy) for a, b, c, d in self.boxes))

    def distance(self, x: float, y: float) -> float:
        """Pixels from (x, y) to the nearest box (0 inside one)."""
        best = np.inf
        for xmin, ymin, xmax, ymax in self.boxes:
            dx = max(xmin - x, 0.0, x - xmax)
            dy = max(ymin - y, 0.0, y - ymax)
            best = min(best, float(np.hypot(dx, dy)))
        return best

    def share(self) -> float:
        """Share of the image inside the union of the boxes (the chance rate of a random peak)."""
        mask = np.zeros((self.height, self.width), bool)
        for xmin, ymin, xmax, ymax in self.boxes:
            mask[int(max(ymin, 0)):int(min(ymax, self.height - 1)) + 1, int(max(xmin, 0)):int(min(xmax, self.width - 1)) + 1] = True
        return float(mask.mean())


MAX_MASK_PIXELS = 40_000_000  # a larger mask file is refused (decoded, it would take this many bytes)


@dataclass(frozen=True)
class Mask:
    """A defect's pixel mask (True = defect) in its image's pixel frame: the same questions as Boxes."""

    pixels: np.ndarray  # bool [height, width]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def scaled_to(self, width: int, height: int) -> Mask:
        if (width, height) == (self.width, self.height):
            return self
        return Mask(np.asarray(Image.fromarray(self.pixels).resize((width, height), Image.NEAREST), dtype=bool))

    def distance(self, x: float, y: float) -> float:
        """Pixels from (x, y) to the nearest defect pixel (0 on one)."""
        ys, xs = np.nonzero(self.pixels)
        if not len(xs):
            return float("inf")
        return float(np.sqrt(np.min((xs - x) ** 2 + (ys - y) ** 2)))

    def share(self) -> float:
        return float(self.pixels.mean())

    def outline(self) -> np.ndarray:
        """The defect pixels with a non-defect 4-neighbour (for drawing)."""
        padded = np.pad(self.pixels, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return self.pixels & ~inner


def read_mask(path: Path) -> Mask:
    """A defect mask image (white or any non-black pixel = defect; any size, any mode). Raises
    ValueError naming the file when it cannot be read or is too large; an empty mask is returned
    as such (an image without a defect)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_MASK_PIXELS:
                raise ValueError(f"{path}: mask of {image.width} x {image.height} px is larger than {MAX_MASK_PIXELS:,} pixels")
            return Mask(np.asarray(image.convert("L")) > 127)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable mask image ({exc})") from exc


Region = Boxes | Mask


def read_voc(path: Path) -> Boxes:
    """Boxes of a Pascal VOC XML file. Raises ValueError naming the file when it cannot be read."""
    try:
        root = ET.parse(path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        boxes = tuple(tuple(float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")) for obj in root.iter("object"))
    except (ET.ParseError, TypeError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable Pascal VOC annotation ({exc})") from exc
    if width < 1 or height < 1 or not boxes:
        raise ValueError(f"{path}: no size or no boxes")
    return Boxes(width, height, boxes)


def pointing_accuracy(peaks: list[tuple[int, int]], boxes: list[Region], labels: list[str], tolerance: float = POINTING_TOLERANCE_PX) -> dict[str, Any]:
    """Strict hits (peak inside a box or on a mask's defect pixel) and tolerant hits (within `tolerance` px),
    per class and overall, beside chance."""
    strict = [b.distance(x, y) == 0 for (x, y), b in zip(peaks, boxes)]
    tolerant = [b.distance(x, y) <= tolerance for (x, y), b in zip(peaks, boxes)]
    chance = [b.share() for b in boxes]

    def summary(index: list[int]) -> dict[str, Any]:
        return {"n": len(index), "strict": float(np.mean([strict[i] for i in index])) if index else None,
                "tolerant": float(np.mean([tolerant[i] for i in index])) if index else None,
                "chance": float(np.mean([chance[i] for i in index])) if index else None}

    per_class = {label: summary([i for i, lab in enumerate(labels) if lab == label]) for label in dict.fromkeys(labels)}
    return {"overall": summary(list(range(len(peaks)))), "per_class": per_class, "tolerance_px": tolerance, "hits": strict}


def draw_regions(picture: Image.Image, boxes: Region, colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The ground truth drawn on a picture: box outlines, or a mask's outline."""
    from PIL import ImageDraw

    picture = picture.copy()
    if isinstance(boxes, Mask):
        array = np.asarray(picture.convert("RGB")).copy()
        array[boxes.scaled_to(*picture.size).outline()] = colour
        return Image.fromarray(array)
    draw = ImageDraw.Draw(picture)
    for xmin, ymin, xmax, ymax in boxes.scaled_to(*picture.size).boxes:
        draw.rectangle((xmin, ymin, xmax, ymax), outline=colour, width=max(1, min(picture.size) // 100))
    return picture


def overlay_grid(pictures: list[Image.Image], captions: list[str], title: str, path: Path, columns: int = 6) -> None:
    """A grid of overlay images with captions, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(pictures) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, caption in zip(axes.flat, pictures, captions):
        ax.imshow(picture)
        ax.set_title(caption, fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
