"""Image file -> model input: THE conversion used for training data and for serving.

Decode (any Pillow mode, EXIF orientation, first frame), check the pixel budget before
decoding, convert to the model's colour mode and resize (aspect ratio kept by padding, or
stretched: `base.resize`). c02 prepares the training data with `to_model_input` and the
predictor calls the same function, so serving cannot drift from training. Pure functions:
no stage state, no TensorFlow.
"""

from __future__ import annotations

import io as _io
import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
# Pixels an image keeps once decoded: a larger one is box-averaged by a whole factor right after
# decoding, before any conversion, so every later step (8-bit scaling, content checks, the resize
# to the model input, heatmaps) works on at most this many pixels. Far above every training set
# here (NEU 200 px, X-SDD, magnetic tiles) and 25x the model's input area at 400 px: the model
# sees the same input within rounding. A 36 MP upload costs its decode, not 3 GB of float copies.
WORK_MAX_PIXELS = 4_000_000
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (Pillow resizes with support scaling)
COLOUR_MIN_CHANNEL_GAP = 4.0  # mean |R-G| + |G-B| in grey levels above which an RGB image is colourful
# decode_image checks its own pixel limit (data_preprocessing.max_image_pixels) before decoding;
# Pillow's global check would only add a raw DecompressionBombWarning in the middle of the progress bar.
Image.MAX_IMAGE_PIXELS = None


class ImageProblem(ValueError):
    """This file cannot be used as an image; the message says why (for skip lists)."""


# ----------------------------------------------------------------------------- conversion
def decode_image(source: str | os.PathLike | bytes | BinaryIO | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> Image.Image:
    """Open and fully decode an image, returning it in mode 'L' or 'RGB'.

    Handles any Pillow mode (1, L, LA, P, PA, RGB, RGBA, CMYK, I;16, I, F, ...): alpha is
    flattened onto white, 16/32-bit and float images are scaled to 8 bits, EXIF rotation
    is applied, multi-frame files use their first frame. Raises ImageProblem with a reason.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        data = read_bytes(source, max_bytes)
        try:
            image = Image.open(_io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageProblem("not an image: Pillow cannot identify the file format") from exc
        except Image.DecompressionBombError as exc:
            raise ImageProblem(f"too many pixels: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageProblem(f"empty image: {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageProblem(f"too many pixels: {width}x{height} is more than data_preprocessing.max_image_pixels ({max_pixels})")
    try:
        if image.format == "JPEG" and width * height > WORK_MAX_PIXELS:  # decoded at 1/2, 1/4 or 1/8 scale directly
            scale = math.sqrt(width * height / WORK_MAX_PIXELS)
            image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
        image.load()
        image = reduce_to_budget(image, WORK_MAX_PIXELS)
        reduced_by = width / image.size[0]  # before the EXIF rotation: the same factor on both sides
        image = ImageOps.exif_transpose(image) or image
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"truncated or corrupt: {exc}") from exc
    except Image.DecompressionBombError as exc:  # pragma: no cover - caught by the size check above
        raise ImageProblem(f"too many pixels: {exc}") from exc
    converted = _to_8bit_l_or_rgb(image)
    converted.info["reduced_by"] = reduced_by
    return converted


def reduce_to_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` box-averaged by the smallest whole factor that brings it to at most `max_pixels`
    (itself when it is small enough). `decode_image` keeps original width / decoded width in
    `info["reduced_by"]`, so that positions (a heatmap's peak) can be given in the original pixels."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    factor = math.ceil(math.sqrt(width * height / max_pixels))  # (w // f) * (h // f) <= w * h / f**2 <= max_pixels
    info = image.info
    if image.mode in ("1", "P", "PA") or image.mode.startswith("I;16"):  # modes Pillow cannot average
        image = image.convert("L" if image.mode == "1" else "I" if image.mode.startswith("I;16")
                              else "RGBA" if image.mode == "PA" or "transparency" in info else "RGB")
    reduced = image.reduce(factor)
    reduced.info = dict(info)  # the EXIF orientation still applies
    return reduced


def content_problem(image: Image.Image, min_side: int, min_std: float) -> str | None:
    """Why a decoded image carries too little to learn from (too small, or blank), or None."""
    width, height = image.size
    if min(width, height) < min_side:
        return f"too small: {width}x{height} pixels, below data_preprocessing.min_image_side ({min_side})"
    std = float(np.asarray(image, dtype=np.float32).std()) / 255.0
    if std < min_std:
        return f"blank: pixel std {std:.4f} (0..1 scale) is below data_preprocessing.min_pixel_std ({min_std:g}); the image has no visible content"
    return None


# What a reader takes from one user-named file when no smaller limit is set: far above any image
# (the data and upload limits are 50 MB), far below a machine's memory.
HARD_MAX_BYTES = 512 * 1024 * 1024


def read_bytes(source: str | os.PathLike | bytes | BinaryIO, max_bytes: int | None,
               limit: str = "data_preprocessing.max_file_mb") -> bytes:
    """The bytes of a file (path, bytes or file object), refusing empty files and files over
    `max_bytes`; `limit` names the setting in the message. A path goes through `read_user_file`."""
    bound = HARD_MAX_BYTES if max_bytes is None else max_bytes
    if isinstance(source, bytes):
        data = source
    elif hasattr(source, "read"):
        data = source.read(bound + 1)  # type: ignore[union-attr]
    else:
        data = read_user_file(Path(source), bound, limit)
    if not data:
        raise ImageProblem("empty file: 0 bytes")
    if len(data) > bound:
        raise ImageProblem(f"too large: more than {limit} ({bound / 1e6:g} MB)" if not isinstance(source, bytes)
                           else f"too large: {len(data) / 1e6:.1f} MB is more than {limit} ({bound / 1e6:g} MB)")
    return data


def read_user_file(path: Path, max_bytes: int, limit: str = "the size limit") -> bytes:
    """Read a file a user named: a regular file only (links are followed), at most `max_bytes + 1`
    bytes read, and never blocking. A device (`/dev/zero`), FIFO, socket or folder is refused
    with ImageProblem before a byte is read: opened non-blocking, then checked on the open
    descriptor, so a FIFO without a writer cannot hang the reader and nothing can be swapped in
    between the check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise ImageProblem("unreadable: no such file" + (" (a broken symbolic link)" if path.is_symlink() else "")) from exc
    except IsADirectoryError as exc:
        raise ImageProblem("a folder, not a file") from exc
    except OSError as exc:
        raise ImageProblem(f"cannot be read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageProblem(f"not a regular file ({special_kind(info.st_mode)}): left out unread")
        if info.st_size > max_bytes:
            raise ImageProblem(f"too large: {info.st_size / 1e6:.1f} MB is more than {limit} ({max_bytes / 1e6:g} MB)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: back to ordinary reads
        chunks, left = [], max_bytes + 1  # one byte more than allowed tells a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def walked_file_problem(path: Path) -> str | None:
    """Why a file found in a walked folder is left out unread, or None for a regular file (links
    followed): a FIFO would block its reader, /dev/zero never ends, a broken link has nothing to read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return ("broken or looping link: the file it points to does not exist" if path.is_symlink()
                else f"cannot be read: {exc.strerror or exc}")
    if stat.S_ISDIR(mode):
        return "a link to a folder: not followed"
    if not stat.S_ISREG(mode):
        return f"not a regular file ({special_kind(mode)}): left out unread"
    return None


def special_kind(mode: int) -> str:
    """A file type in words, for messages about files that are not regular files."""
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "a special file"


def _to_8bit_l_or_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" and arr.max(initial=0) <= 1.0 else 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB" if mode != "LA" else "L")
    if mode in ("1", "L;16"):
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX...


def to_model_input(source: str | os.PathLike | bytes | BinaryIO | Image.Image, image_size: int, color_mode: str,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None, resize: str = "pad") -> np.ndarray:
    """Image file (path, bytes, file object or PIL image) -> uint8 array (size, size, 1|3).

    The one conversion used for training data and for serving. Raises ImageProblem.
    """
    image = decode_image(source, max_pixels=max_pixels, max_bytes=max_bytes)
    return convert_decoded(image, image_size, color_mode, resize)


def convert_decoded(image: Image.Image, image_size: int, color_mode: str, resize: str = "pad") -> np.ndarray:
    """The mode-conversion and resize half of `to_model_input` (for an already decoded image).

    `resize`: pad (keep the aspect ratio: the long side becomes image_size, the short side is
    centred on a band of the image's mean colour, so a 3:1 image is not squashed and nothing
    at its edges is cut off) or stretch (to a square, ignoring the aspect ratio).
    """
    image = image.convert("L" if color_mode == "grayscale" else "RGB")
    width, height = image.size
    if (width, height) != (image_size, image_size):
        x0, y0, x1, y1 = content_box(width, height, image_size, resize)
        if (x1 - x0, y1 - y0) == (image_size, image_size):
            image = image.resize((image_size, image_size), RESAMPLE)
        else:
            inner = image.resize((x1 - x0, y1 - y0), RESAMPLE)
            mean = np.asarray(inner, dtype=np.float64).reshape(-1, len(inner.getbands())).mean(axis=0)
            fill = tuple(int(v + 0.5) for v in mean) if inner.mode == "RGB" else int(mean[0] + 0.5)
            canvas = Image.new(inner.mode, (image_size, image_size), fill)
            canvas.paste(inner, (x0, y0))
            image = canvas
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def content_box(width: int, height: int, image_size: int, resize: str = "pad") -> tuple[int, int, int, int]:
    """Where a width x height image lands in the image_size square model input: (x0, y0, x1, y1).

    The whole square when stretched (or square); the centred, aspect-preserving band when
    padded. Heatmaps use it to map the model's frame back onto the original pixels.
    """
    if resize == "stretch" or width == height:
        return 0, 0, image_size, image_size
    scale = image_size / max(width, height)
    inner_w, inner_h = max(1, round(width * scale)), max(1, round(height * scale))
    x0, y0 = (image_size - inner_w) // 2, (image_size - inner_h) // 2
    return x0, y0, x0 + inner_w, y0 + inner_h


def is_colourful(image: Image.Image) -> bool:
    """Does a decoded image carry colour (not grey stored as RGB)? Evidence for a grayscale model."""
    if image.mode != "RGB":
        return False
    rgb = np.asarray(image, dtype=np.int16)
    return float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()) > COLOUR_MIN_CHANNEL_GAP
