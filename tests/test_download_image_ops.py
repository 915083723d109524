"""Image processing for the download stage: geometry, EXIF, alpha, filters, formats."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from laion_tasks.stages.image_ops import ImageOptions, process_image
from tests.download_fixtures import make_exif_rotated_jpeg, make_jpeg, make_png_bomb, make_png_rgba


def decoded(data: bytes | None) -> Image.Image:
    assert data is not None
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("no", 256, (640, 320)),
        ("border", 256, (256, 256)),
        ("keep_ratio", 256, (512, 256)),
        ("keep_ratio_largest", 256, (256, 128)),
        ("center_crop", 256, (256, 256)),
        ("keep_ratio_largest", 1000, (1000, 500)),  # upscaling
    ],
)
def test_resize_modes(mode: str, size: int, expected: tuple[int, int]) -> None:
    result = process_image(make_jpeg(640, 320), ImageOptions(image_size=size, resize_mode=mode))  # type: ignore[arg-type]
    assert result.status == "success", result.error_message
    assert (result.width, result.height) == expected == decoded(result.data).size
    assert (result.original_width, result.original_height) == (640, 320)


def test_border_pads_with_white_and_keeps_content_centered() -> None:
    result = process_image(make_jpeg(640, 320, color=(0, 0, 0)), ImageOptions(resize_mode="border"))
    img = decoded(result.data).convert("RGB")
    assert min(img.getpixel((128, 5))) > 240  # padding band
    assert img.getpixel((128, 128)) != (255, 255, 255)


def test_resize_only_if_bigger_leaves_small_images() -> None:
    opts = ImageOptions(image_size=256, resize_mode="keep_ratio_largest", resize_only_if_bigger=True)
    assert (process_image(make_jpeg(100, 80), opts).width, process_image(make_jpeg(100, 80), opts).height) == (100, 80)
    assert process_image(make_jpeg(512, 256), opts).width == 256


def test_exif_orientation_is_applied() -> None:
    result = process_image(make_exif_rotated_jpeg(200, 100), ImageOptions(resize_mode="no"))
    assert (result.original_width, result.original_height) == (100, 200)
    assert decoded(result.data).size == (100, 200)


def test_alpha_is_composited_on_white() -> None:
    result = process_image(make_png_rgba(64, 48), ImageOptions(resize_mode="no"))
    img = decoded(result.data)
    assert img.mode == "RGB" and result.mime_type == "image/png"
    right = img.getpixel((60, 24))
    left = img.getpixel((2, 24))
    assert min(right) > 240, right  # transparent red became white
    assert left[2] > 200 and left[0] < 40, left  # opaque blue stays blue


def test_filters() -> None:
    small = make_jpeg(100, 40)
    assert process_image(small, ImageOptions(min_image_size=64)).status == "too_small"
    assert process_image(small, ImageOptions(max_aspect_ratio=2.0)).status == "aspect_ratio"
    assert process_image(small, ImageOptions(min_image_bytes=len(small) + 1)).status == "too_few_bytes"
    assert process_image(small, ImageOptions(min_image_size=40, max_aspect_ratio=2.5)).status == "success"


def test_webp_output_and_quality() -> None:
    result = process_image(make_jpeg(), ImageOptions(encode_format="webp", encode_quality=80))
    assert decoded(result.data).format == "WEBP"
    low = process_image(make_jpeg(), ImageOptions(encode_quality=20))
    high = process_image(make_jpeg(), ImageOptions(encode_quality=95))
    assert len(low.data or b"") < len(high.data or b"")


def test_hostile_inputs_get_statuses() -> None:
    jpeg = make_jpeg()
    assert process_image(jpeg[: len(jpeg) // 2], ImageOptions()).status == "decode_error"
    assert process_image(b"<html>hi</html>", ImageOptions()).status == "not_an_image"
    assert process_image(b"", ImageOptions()).status == "not_an_image"
    bomb = process_image(make_png_bomb(), ImageOptions())
    assert bomb.status == "decompression_bomb" and bomb.original_width == 12_000
    assert process_image(make_jpeg(300, 200), ImageOptions(max_image_side=299)).status == "decompression_bomb"
    assert process_image(make_jpeg(300, 200), ImageOptions(max_image_pixels=50_000)).status == "decompression_bomb"


def test_draft_decode_matches_full_decode_closely() -> None:
    """The reduced-scale JPEG decode used for speed gives (nearly) the same pixels."""
    gradient = Image.linear_gradient("L").resize((1600, 1200))
    photo = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_180), Image.radial_gradient("L").resize((1600, 1200))))
    photo.paste((250, 20, 20), (300, 300, 900, 700))
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=92)
    big = out.getvalue()
    fast = decoded(process_image(big, ImageOptions(image_size=256)).data).convert("RGB")
    full = Image.open(io.BytesIO(big)).convert("RGB").resize((256, 192), Image.Resampling.BOX)
    canvas = Image.new("RGB", (256, 256), (255, 255, 255))
    canvas.paste(full, (0, 32))
    from PIL import ImageChops, ImageStat

    assert max(ImageStat.Stat(ImageChops.difference(fast, canvas)).mean) < 2.0
