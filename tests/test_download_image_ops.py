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


def _jpeg(img: Image.Image, **save: object) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


@pytest.mark.parametrize(("size", "orientation"), [((2000, 1500), 1), ((1000, 700), 1), ((500, 400), 1),
                                                     ((2000, 1000), 6)])
def test_shrink_on_load_keeps_at_least_the_target_resolution(monkeypatch, size, orientation) -> None:
    """The DCT-scaled decode never hands the resize fewer pixels than the target, EXIF rotation included."""
    import laion_tasks.stages.image_ops as ops

    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = ops._resize
    monkeypatch.setattr(ops, "_resize", lambda img, target: seen.append((img.size, target)) or real(img, target))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(Image.linear_gradient("L").convert("RGB").resize(size), exif=exif.tobytes())
    result = process_image(data, ImageOptions(image_size=256, resize_mode="keep_ratio_largest"))
    (decoded_size, target), = seen
    assert decoded_size[0] >= target[0] and decoded_size[1] >= target[1], (decoded_size, target)
    shown = size if orientation == 1 else size[::-1]
    assert target == ops._target_size(*shown, ImageOptions(image_size=256, resize_mode="keep_ratio_largest"))
    if max(size) >= 1000:  # 2x or more above the target: the decoder did shrink
        assert decoded_size[0] < shown[0]
    assert decoded(result.data).size == target
    assert (result.original_width, result.original_height) == shown


def test_exif_rotation_with_shrink_on_load_puts_content_the_right_way_up() -> None:
    """A stored-landscape photo with orientation 6 comes out portrait, its top-left corner where EXIF says."""
    img = Image.new("RGB", (1600, 800), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 400, 400))  # red: stored top-left -> displayed top-right after rotate 90 cw
    exif = Image.Exif()
    exif[0x0112] = 6
    result = process_image(_jpeg(img, exif=exif.tobytes()), ImageOptions(image_size=256, resize_mode="keep_ratio_largest"))
    out = decoded(result.data).convert("RGB")
    assert out.size == (128, 256)
    red, blue = out.getpixel((120, 8)), out.getpixel((8, 248))
    assert red[0] > 200 and red[2] < 60, red
    assert blue[2] > 200 and blue[0] < 60, blue


def test_cmyk_grayscale_palette_and_16_bit_inputs_come_out_rgb() -> None:
    cmyk = Image.new("CMYK", (800, 600), (0, 255, 255, 0))  # pure red in CMYK
    out = io.BytesIO()
    cmyk.save(out, "JPEG", quality=95)
    for data, expected in (
        (out.getvalue(), (255, 0, 0)),
        (_jpeg(Image.new("L", (900, 600), 128)), (128, 128, 128)),
    ):
        result = process_image(data, ImageOptions(image_size=256))
        img = decoded(result.data)
        assert result.status == "success" and img.mode == "RGB" and img.size == (256, 256)
        center = img.getpixel((128, 128))
        assert all(abs(a - b) <= 6 for a, b in zip(center, expected)), (center, expected)
    palette = Image.new("P", (300, 200), 0)
    palette.putpalette([0, 160, 0] + [255, 0, 0] * 255)
    palette.paste(1, (150, 0, 300, 200))
    for transparent in (None, 1):
        out = io.BytesIO()
        palette.save(out, "PNG", **({"transparency": transparent} if transparent is not None else {}))
        img = decoded(process_image(out.getvalue(), ImageOptions(resize_mode="no")).data)
        assert img.getpixel((10, 100))[1] > 140  # green stays green
        right = img.getpixel((290, 100))
        assert (min(right) > 240) if transparent else (right[0] > 230 and right[1] < 30), right
    deep = Image.new("I;16", (400, 300), 40000)
    out = io.BytesIO()
    deep.save(out, "PNG")
    result = process_image(out.getvalue(), ImageOptions(image_size=128))
    assert result.status == "success" and decoded(result.data).mode == "RGB"


def test_the_given_sha256_is_used_and_otherwise_computed() -> None:
    import hashlib

    data = make_jpeg()
    assert process_image(data, ImageOptions()).sha256 == hashlib.sha256(data).hexdigest()
    assert process_image(data, ImageOptions(), sha256="ab" * 32).sha256 == "ab" * 32
