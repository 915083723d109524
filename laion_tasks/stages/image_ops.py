"""Decode, filter, resize and re-encode one downloaded image (Pillow).

Runs in worker processes, so everything here is a plain function over bytes and a
small picklable :class:`ImageOptions`. Failures are returned as a status, never raised:
every sample must end with a status in the output Parquet.

Speed: when the target is at least 1.5x smaller than a JPEG, the decoder is asked for a
reduced-scale decode (``Image.draft``: libjpeg's DCT scaling, never below 1.5x the target) with
its fast integer IDCT; downscaling then uses Pillow's antialiased BICUBIC, and upscaling LANCZOS.
Why not less: measured against a full decode + LANCZOS reference (bench/download_quality.py), a
BOX filter (Pillow's BOX weighs whole pixels, it is not OpenCV's INTER_AREA) with DCT scaling down
to the target itself put our output 3 to 4 dB PSNR below img2dataset's; this path is above it
(bench/RESULTS.md). The fast IDCT costs 0.2 to 0.4 dB there, inside the 0.5 dB we allow. The
caller passes the sha256 it already computed, so the raw bytes are hashed once.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]

SHRINK_ON_LOAD_MARGIN = 1.5
"""A DCT-scaled JPEG decode keeps at least this many times the target's pixels per side, so the resize filter
still has input to filter (decoding straight to the target size cost 1.3 dB PSNR on the bench's web mix)."""
DOWNSCALE_FILTER = Image.Resampling.BICUBIC
UPSCALE_FILTER = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    min_image_size: int = 0
    min_image_bytes: int = 0
    max_aspect_ratio: float = 0.0
    max_image_pixels: int = 89_478_485
    max_image_side: int = 20_000
    encode_format: Literal["jpg", "webp"] = "jpg"
    encode_quality: int = 95

    @classmethod
    def from_config(cls, config: object) -> "ImageOptions":
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass
class ImageResult:
    """Outcome for one image: ``status`` is ``success`` or a failure name."""

    status: str
    error_message: str | None = None
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_bytes: int = 0
    mime_type: str | None = None
    sha256: str | None = None


def _target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """The size before padding/cropping for ``opts.resize_mode`` (no change for ``no``)."""
    size = opts.image_size
    mode = opts.resize_mode
    if mode == "no":
        return width, height
    if mode in ("border", "keep_ratio_largest"):
        scale = size / max(width, height)
    else:  # keep_ratio, center_crop: the smaller side becomes ``size``
        scale = size / min(width, height)
    if opts.resize_only_if_bigger and scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """Composite any transparency on white and return an RGB image."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _resize(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    if target == img.size:
        return img
    shrinking = target[0] <= img.size[0] and target[1] <= img.size[1]
    return img.resize(target, DOWNSCALE_FILTER if shrinking else UPSCALE_FILTER)


def _finish_geometry(img: Image.Image, opts: ImageOptions, resized: bool) -> Image.Image:
    """Pad (border) or crop (center_crop) to a square; untouched images stay as they are."""
    size = opts.image_size
    if not resized and opts.resize_only_if_bigger:
        return img
    if opts.resize_mode == "border" and img.size != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))  # white, as img2dataset pads
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        return canvas
    if opts.resize_mode == "center_crop" and img.size != (size, size):
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return img.crop((left, top, left + size, top + size))
    return img


Inspect = Callable[[Image.Image], "tuple[str, str] | None"]
"""Looks at the decoded image before it is resized; (status, message) refuses it (e.g. a PDQ hash-list match)."""


def process_image(data: bytes, opts: ImageOptions, inspect: Inspect | None = None, sha256: str | None = None) -> ImageResult:
    """Validate and transform one image; never raises for bad input. ``sha256``: the hex digest of ``data`` when the
    caller already has it (the fetcher hashes each body once)."""
    result = ImageResult(status="success", original_bytes=len(data), sha256=sha256 or hashlib.sha256(data).hexdigest())
    if opts.min_image_bytes and len(data) < opts.min_image_bytes:
        result.status, result.error_message = "too_few_bytes", f"{len(data)} bytes < min_image_bytes {opts.min_image_bytes}"
        return result
    try:
        with warnings.catch_warnings():
            # Our own header check below applies opts.max_image_pixels and records the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        # Pillow names the BytesIO object ("<_io.BytesIO object at 0x7f...>"): an address would make a re-run's
        # output differ from the first run's.
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the downloaded bytes", str(exc))
        result.status, result.error_message = "not_an_image", f"cannot identify image: {reason[:200]}"
        return result
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit
        result.status, result.error_message = "decompression_bomb", str(exc)[:300]
        return result
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on hostile input
        result.status, result.error_message = "decode_error", f"{type(exc).__name__}: {str(exc)[:200]}"
        return result
    with img:
        width, height = img.size
        result.original_width, result.original_height = width, height
        result.mime_type = Image.MIME.get(img.format or "", None)
        # Header-only checks first: refuse bombs before any pixel is decoded.
        if width * height > opts.max_image_pixels or max(width, height) > opts.max_image_side:
            result.status = "decompression_bomb"
            result.error_message = (
                f"{width}x{height} exceeds max_image_pixels {opts.max_image_pixels} or max_image_side {opts.max_image_side}"
            )
            return result
        if width < 1 or height < 1:
            result.status, result.error_message = "decode_error", f"invalid size {width}x{height}"
            return result
        try:
            return _transform(img, opts, result, inspect)
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
            result.status, result.error_message = "decode_error", f"{type(exc).__name__}: {str(exc)[:200]}"
            return result


def _transform(img: Image.Image, opts: ImageOptions, result: ImageResult, inspect: Inspect | None = None) -> ImageResult:
    # EXIF orientation can swap the axes: filter on the displayed size.
    orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "WEBP", "TIFF", "PNG") else 1
    swapped = orientation in (5, 6, 7, 8)
    width, height = (img.height, img.width) if swapped else img.size
    result.original_width, result.original_height = width, height
    if opts.min_image_size and min(width, height) < opts.min_image_size:
        result.status, result.error_message = "too_small", f"{width}x{height} < min_image_size {opts.min_image_size}"
        return result
    if opts.max_aspect_ratio and max(width, height) / min(width, height) > opts.max_aspect_ratio:
        result.status = "aspect_ratio"
        result.error_message = f"{width}x{height} aspect ratio > {opts.max_aspect_ratio}"
        return result
    target = _target_size(width, height, opts)
    if img.format == "JPEG" and target[0] * 3 <= width * 2 and target[1] * 3 <= height * 2:
        # Shrinking by 1.5x or more: libjpeg scales in the DCT domain (1/2, 1/4, 1/8, never below
        # SHRINK_ON_LOAD_MARGIN x the target, so the resize still has pixels to filter) and uses its fast integer
        # IDCT, whose small error the downscale averages away. Colour and EXIF handling are unchanged.
        wanted = (round(target[0] * SHRINK_ON_LOAD_MARGIN), round(target[1] * SHRINK_ON_LOAD_MARGIN))
        draft_size = (wanted[1], wanted[0]) if swapped else wanted
        if img.draft("RGB", draft_size) is not None:
            img.decoderconfig = (img.decoderconfig[0], 1)  # Pillow's "draft" flag: JDCT_IFAST
    img.load()
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    img = _flatten_to_rgb(img)
    if inspect is not None:
        verdict = inspect(img)
        if verdict is not None:
            result.status, result.error_message = verdict
            return result
    resized = target != (width, height)
    img = _resize(img, target)
    img = _finish_geometry(img, opts, resized)
    out = io.BytesIO()
    if opts.encode_format == "webp":
        img.save(out, format="WEBP", quality=opts.encode_quality, method=4)
    else:
        img.save(out, format="JPEG", quality=opts.encode_quality)
    result.data = out.getvalue()
    result.width, result.height = img.size
    return result
