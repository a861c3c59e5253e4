"""Image conversions for prepare (any input -> R x R L/RGB) and decoding for the loader.

Inputs come from users and may be anything: CMYK JPEGs, palette PNGs with
transparency, 16-bit scans, truncated downloads. `convert_image` either returns
the encoded R x R image or raises `SkippedImageError` with a short, stable reason that
prepare lists in the manifest. `NotSquareError` is the one input problem that stops a
run: the user asked for no cropping, so a non-square image is a mistake in the
request, not in the data.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROP_MODES = ("center", "center-wide", "none")
RESIZE_FILTERS = {"box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
FORMATS = ("png", "jpg")


class SkippedImageError(Exception):
    """This input is unusable; the message is the reason listed in the manifest."""


class NotSquareError(Exception):
    """A non-square input with crop 'none'."""


@dataclass(frozen=True)
class ConvertSettings:
    resolution: int
    channels: int = 3  # 3 = RGB, 1 = grayscale
    crop: str = "center"
    resize_filter: str = "box"
    image_format: str = "png"
    quality: int = 95  # JPEG only
    min_size: int = 0  # skip inputs whose shorter side is below this (0 = keep all)


def _stable_reason(exc: Exception) -> str:
    """A reason without memory addresses, so the manifest is the same on every run."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or damaged format)"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)) or type(exc).__name__
    return f"damaged image data ({text})"


def _decode(data: bytes) -> Image.Image:
    """Fully decode `data` (so truncation shows up here), upright per EXIF."""
    if not data:
        raise SkippedImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise SkippedImageError("image too large (decompression bomb guard)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad input
        raise SkippedImageError(_stable_reason(exc)) from None


def _to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 8-bit "L" or "RGB"; transparency is composited onto white."""
    if img.mode.startswith("I"):
        # PIL's own convert("L") clips 16-bit values at 255 instead of scaling them.
        # "I" (32-bit) holds 16-bit data from some decoders, or 8-bit values as-is.
        values = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or values.max() > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _crop_and_resize(img: Image.Image, s: ConvertSettings, name: str) -> Image.Image:
    width, height = img.size
    resample = RESIZE_FILTERS[s.resize_filter]
    if s.crop == "none" and width != height:
        raise NotSquareError(
            f"{name} is {width}x{height}, not square, and --crop none keeps images whole; "
            "use --crop center or center-wide, or make the inputs square"
        )
    if s.crop == "center-wide" and width > height:
        # Keep the full width: scale to R wide and letterbox into a black R x R canvas.
        new_height = max(1, round(s.resolution * height / width))
        scaled = img.resize((s.resolution, new_height), resample)
        canvas = Image.new(img.mode, (s.resolution, s.resolution))
        canvas.paste(scaled, (0, (s.resolution - new_height) // 2))
        return canvas
    side = min(width, height)
    if side != width or side != height:
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != s.resolution:
        img = img.resize((s.resolution, s.resolution), resample)
    return img


def encode(img: Image.Image, image_format: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        img.save(buffer, format="PNG", compress_level=6)
    else:
        img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def convert_image(data: bytes, settings: ConvertSettings, name: str) -> bytes:
    """Input file bytes -> encoded R x R image, or SkippedImageError / NotSquareError."""
    img = _decode(data)
    if settings.min_size and min(img.size) < settings.min_size:
        raise SkippedImageError(
            f"too small ({img.size[0]}x{img.size[1]} < --min-size {settings.min_size})"
        )
    img = _to_8bit(img, settings.channels)
    img = _crop_and_resize(img, settings, name)
    return encode(img, settings.image_format, settings.quality)


def decode_sample(data: bytes, resolution: int, channels: int) -> np.ndarray:
    """Shard image bytes -> uint8 array [C, R, R]; ValueError if not what the manifest says."""
    out = np.empty((channels, resolution, resolution), np.uint8)
    decode_into(data, out, flip=False)
    return out


# From this size on, RGB images are split into planes by PIL's raw encoder, one band at a
# time; below it numpy's HWC -> CHW transpose is cheaper than three encoder calls (the
# crossover was measured: README, Performance).
BANDS_MIN_RESOLUTION = 128


def decode_into(data: bytes, out: np.ndarray, *, flip: bool) -> None:
    """Decode shard image bytes into `out` (uint8 [C, R, R]), mirrored left-right if `flip`.

    ValueError if the bytes are not an image of the shape `out` expects; `out` is then
    left as it was. Writing straight into the caller's batch slot saves a copy per image.
    """
    channels, resolution = out.shape[0], out.shape[1]
    planes = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            square = img.size == (resolution, resolution)
            if square and img.mode == ("L" if channels == 1 else "RGB"):
                if channels == 3 and resolution >= BANDS_MIN_RESOLUTION:
                    _rgb_planes_into(img, out, flip)
                    return
                # What np.asarray(img) gives, minus its slower generic path.
                pixels = np.frombuffer(img.tobytes(), np.uint8)
                planes = pixels.reshape(resolution, resolution, channels).transpose(2, 0, 1)
            else:
                pixels = np.asarray(img)  # not what the manifest says, probably: checked below
    except Exception as exc:  # any decoder failure means a corrupt sample
        raise ValueError(_stable_reason(exc)) from None
    if planes is None:
        expected = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
        if pixels.shape != expected or pixels.dtype != np.uint8:
            raise ValueError(f"image is {pixels.shape} {pixels.dtype}, expected {expected} uint8")
        planes = pixels[np.newaxis] if channels == 1 else pixels.transpose(2, 0, 1)
    out[...] = planes[:, :, ::-1] if flip else planes


def _rgb_planes_into(img: Image.Image, out: np.ndarray, flip: bool) -> None:
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for band, name in enumerate("RGB"):
        plane = np.frombuffer(img.tobytes("raw", name), np.uint8)
        out[band] = plane.reshape(out.shape[1:])
