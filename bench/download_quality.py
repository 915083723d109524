"""Output quality of the download resize, ours vs img2dataset 1.47.0, against a high-quality reference.

    .venv/bin/python bench/download_quality.py [--inputs imagenet,web]   # prints the figures as JSON

``bench/download_bench.py`` runs the same measurement and records it beside the speed figures in
``bench/results/download.json``. Why: our decode takes shortcuts img2dataset does not (libjpeg's DCT scaling
and its fast integer IDCT, then a BOX filter), so "same settings" has to be shown on the output pixels.

- **Reference**: Pillow's full-resolution decode (libjpeg's accurate integer IDCT, no DCT scaling), EXIF
  orientation applied, alpha on white, then a LANCZOS resize in 32-bit float per channel to the exact size
  each tool's content has (the tools round the scaled side differently: we round, img2dataset truncates),
  clipped to [0, 255] and not rounded.
- **Tools** at the same settings: 256 px, border mode (white padding), JPEG quality 95. Ours is
  ``laion_tasks.stages.image_ops.process_image``; img2dataset's is its own ``Resizer`` called in its own venv
  exactly as its downloader calls it (OpenCV full decode, INTER_AREA down / LANCZOS4 up, albumentations
  LongestMaxSize + PadIfNeeded, ``cv2.imencode`` q95). Each output JPEG is decoded (accurate IDCT) and
  compared on its content box only: the white border is identical everywhere and would only inflate the scores.
- **PSNR** per image over the RGB content pixels, 10 log10(255^2 / MSE); averaged over images in dB.
- **SSIM** per Wang et al. 2004 on luma (BT.601 Y'), 11x11 Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03,
  L = 255, mean over the window positions that fit inside the image ("valid", as the authors' ssim_index.m);
  no downsampling is needed at 256 px. Implemented with numpy (separable convolution).
- **Ablations of ours** (to show what each shortcut costs): the same path with the accurate IDCT, and with a
  full-size decode. They are a bench-local copy of our path; the copy with the shortcuts our code takes is
  checked to give byte-identical output to ``process_image`` before any figure is reported.

The peer side runs in img2dataset's venv (``--peer-resize IN OUT``; that venv has no Pillow), so this
module imports only the standard library and numpy at the top.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGES_DIR = SHARED / "images" / "imagenet_sample200"
PEER_VENV = Path("/work/peers/img2dataset")
SIZE = 256
QUALITY = 95
Box = tuple[int, int, int, int]  # left, top, width, height of the content inside the SIZE x SIZE output


# ---------------------------------------------------------------- metrics


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """PSNR in dB of ``out`` (uint8 or float, HxWx3) against the float reference; inf when identical."""
    mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``window`` keeping only the positions where it fits (MATLAB 'valid')."""
    k = len(window)
    rows = sum(window[i] * img[i : img.shape[0] - k + 1 + i, :] for i in range(k))
    return sum(window[i] * rows[:, i : rows.shape[1] - k + 1 + i] for i in range(k))


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 Y' of an RGB array, in float64 on the 0-255 scale."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def ssim(ref: np.ndarray, out: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) of two grey images: 11x11 Gaussian sigma 1.5, valid part."""
    window = _gaussian_window()
    if min(ref.shape[:2]) < len(window):
        raise ValueError(f"SSIM needs at least {len(window)}x{len(window)} pixels, got {ref.shape[1]}x{ref.shape[0]}")
    x, y = ref.astype(np.float64), out.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter_valid(x, window), _filter_valid(y, window)
    sxx = _filter_valid(x * x, window) - mx * mx
    syy = _filter_valid(y * y, window) - my * my
    sxy = _filter_valid(x * y, window) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


# ---------------------------------------------------------------- reference and decode (Pillow; our venv)


def full_decode(data: bytes) -> Any:
    """Full-resolution RGB decode with the accurate IDCT, EXIF orientation applied, alpha composited on white."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def reference(full: Any, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize of the full decode to ``size`` (w, h) in float32 per channel, clipped to [0, 255]."""
    from PIL import Image

    rgb = np.asarray(full, dtype=np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize(size, Image.Resampling.LANCZOS))
             for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255)


def decode_output(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.size != (SIZE, SIZE):
            raise ValueError(f"output is {img.size[0]}x{img.size[1]}, expected {SIZE}x{SIZE} (border mode)")
        return np.asarray(img.convert("RGB"))


def _centered_box(width: int, height: int) -> Box:
    return (SIZE - width) // 2, (SIZE - height) // 2, width, height


# ---------------------------------------------------------------- ours, and bench-local variants of it


def ours(data: bytes) -> tuple[bytes, Box]:
    """Our download path as the stage runs it, and where its content sits."""
    from laion_tasks.stages.image_ops import ImageOptions, _target_size, process_image

    opts = ImageOptions(image_size=SIZE, resize_mode="border", encode_quality=QUALITY)
    result = process_image(data, opts, sha256="0" * 64)
    if result.status != "success" or result.data is None:
        raise RuntimeError(f"process_image refused a bench image: {result.status}: {result.error_message}")
    w, h = _target_size(result.original_width or 0, result.original_height or 0, opts)
    return result.data, _centered_box(w, h)


def variant(data: bytes, draft_margin: float | None, fast_idct: bool, downscale: str) -> tuple[bytes, Box]:
    """Our path (border, q95) with the decode shortcuts and the downscale filter chosen by the caller.

    ``draft_margin``: JPEGs shrunk 1.5x or more decode DCT-scaled to at least that many times the target
    (None: always full size); ``downscale``: a Pillow filter name. With image_ops' own settings this must equal
    :func:`ours` byte for byte (checked in :func:`measure`), so the other settings show what each choice costs.
    """
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    orientation = img.getexif().get(0x0112, 1)
    swapped = orientation in (5, 6, 7, 8)
    width, height = (img.height, img.width) if swapped else img.size
    scale = SIZE / max(width, height)
    target = max(1, round(width * scale)), max(1, round(height * scale))
    shrink_on_load = target[0] * 3 <= width * 2 and target[1] * 3 <= height * 2
    if draft_margin is not None and img.format == "JPEG" and shrink_on_load:
        wanted = round(target[0] * draft_margin), round(target[1] * draft_margin)
        if img.draft("RGB", wanted[::-1] if swapped else wanted) is not None and fast_idct:
            img.decoderconfig = (img.decoderconfig[0], 1)
    img.load()
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    if img.mode != "RGB":
        img = img.convert("RGB")  # the bench inputs have no transparency
    if target != img.size:
        shrinking = target[0] <= img.width and target[1] <= img.height
        img = img.resize(target, Image.Resampling[downscale] if shrinking else Image.Resampling.LANCZOS)
    box = _centered_box(*target)
    if target != (SIZE, SIZE):  # a square result is saved as it is (keeping e.g. its JPEG comment), as ours does
        canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        canvas.paste(img, box[:2])
        img = canvas
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue(), box


def our_settings() -> dict[str, Any]:
    """image_ops' decode settings, read from the module and from the decoder config it sets (not assumed)."""
    import laion_tasks.stages.image_ops as ops

    return {"draft_margin": float(ops.SHRINK_ON_LOAD_MARGIN), "fast_idct": ours_uses_fast_idct(),
            "downscale": ops.DOWNSCALE_FILTER.name}


PREVIOUS = {"draft_margin": 1.0, "fast_idct": True, "downscale": "BOX"}
"""The path image_ops took until 2026-12 (commit 291ea17): DCT scaling down to the target itself, fast IDCT, BOX."""


def ours_uses_fast_idct() -> bool:
    """Whether image_ops asks libjpeg for the fast IDCT (read from the decoder config it sets, not assumed)."""
    from PIL import Image

    import laion_tasks.stages.image_ops as ops

    seen: list[tuple] = []
    real = Image._getdecoder

    def spy(mode: str, decoder_name: str, args: Any, extra: tuple = ()) -> Any:
        if decoder_name == "jpeg":
            seen.append(tuple(extra))
        return real(mode, decoder_name, args, extra)

    gradient = Image.linear_gradient("L").resize((1024, 768)).convert("RGB")
    buf = io.BytesIO()
    gradient.save(buf, "JPEG", quality=90)
    Image._getdecoder = spy  # type: ignore[assignment]
    try:
        ops.process_image(buf.getvalue(), ops.ImageOptions(image_size=SIZE), sha256="0" * 64)
    finally:
        Image._getdecoder = real  # type: ignore[assignment]
    if not seen:
        raise RuntimeError("could not see the JPEG decoder config process_image uses (Pillow internals changed)")
    return any(len(cfg) > 1 and cfg[1] == 1 for cfg in seen)


# ---------------------------------------------------------------- img2dataset (its venv)

PEER_RESIZER_ARGS = dict(image_size=SIZE, resize_mode="border", resize_only_if_bigger=False,
                         upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=QUALITY,
                         encode_format="jpg", skip_reencode=False, disable_all_reencoding=False, min_image_size=0,
                         max_image_area=float("inf"), max_aspect_ratio=float("inf"), blurrer=None)
"""img2dataset's defaults for these flags, and the bench's ``--image_size 256 --resize_mode border
--encode_quality 95`` (img2dataset/main.py -> downloader.py builds ``Resizer`` with exactly these)."""


def peer_resize(in_path: Path, out_path: Path) -> None:
    """In img2dataset's venv: run its Resizer on each payload; record output, content box and CPU per image."""
    import albumentations as A
    import cv2
    from img2dataset.resizer import Resizer

    resizer = Resizer(**PEER_RESIZER_ARGS)
    payloads: list[bytes] = pickle.loads(in_path.read_bytes())
    results = []
    for i, data in enumerate(payloads):
        img, width, height, orig_w, orig_h, err = resizer(io.BytesIO(data))
        if err is not None or img is None:
            raise RuntimeError(f"img2dataset's Resizer refused bench image {i}: {err}")
        # Where the content is: the same albumentations transforms on an empty image of the original shape.
        shape = A.LongestMaxSize(max_size=SIZE, interpolation=cv2.INTER_AREA, p=1.0)(
            image=np.zeros((orig_h, orig_w, 1), np.uint8))["image"].shape
        h, w = shape[:2]
        results.append((img, (int((SIZE - w) / 2.0), int((SIZE - h) / 2.0), w, h)))
    times = []
    for _ in range(3):  # CPU per image of the Resizer alone, best of 3 (one core, in-process)
        start = time.process_time()
        for data in payloads:
            resizer(io.BytesIO(data))
        times.append(time.process_time() - start)
    out_path.write_bytes(pickle.dumps({"results": results, "cpu_ms_per_img": 1000 * min(times) / len(payloads)}))


def run_peer(payloads: list[bytes], venv: Path = PEER_VENV) -> tuple[list[tuple[bytes, Box]], float]:
    python = venv / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} missing: install img2dataset 1.47.0 there (../shared/PEERS.md)")
    with tempfile.TemporaryDirectory(prefix="laion-dlq-") as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps(payloads))
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.run([str(python), __file__, "--peer-resize", str(src), str(dst)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"img2dataset resize in {venv} failed: {proc.stderr[-2000:]}")
        got = pickle.loads(dst.read_bytes())
    return got["results"], got["cpu_ms_per_img"]


# ---------------------------------------------------------------- measurement

METHOD = (
    "Reference: Pillow's full-resolution decode (accurate IDCT, no DCT scaling), EXIF orientation applied, then a "
    "LANCZOS resize in 32-bit float per channel to the size of each tool's content (not rounded). Each tool's output "
    "JPEG is decoded and compared on its content box (the white border left out). PSNR over the RGB pixels, mean "
    "of per-image dB. SSIM per Wang et al. 2004 on luma (BT.601), 11x11 Gaussian window sigma 1.5, K1 0.01, K2 0.03, "
    "valid window positions. img2dataset: its own `Resizer`, built as its downloader builds it, in its venv. Ours: "
    "`process_image`; the ablations are a bench-local copy of our path, checked byte-identical to `process_image` "
    "at our settings. Image-path CPU: one core, in-process, best of 3 passes over the payloads."
)


def _per_image_cpu_ms(fn: Callable[[bytes], object], payloads: list[bytes], repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.process_time()
        for data in payloads:
            fn(data)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(payloads)


def _summary(psnrs: list[float], ssims: list[float]) -> dict[str, float]:
    p, s = np.array(psnrs), np.array(ssims)
    return {"psnr_mean_db": float(p.mean()), "psnr_median_db": float(np.median(p)),
            "psnr_p5_db": float(np.percentile(p, 5)), "psnr_min_db": float(p.min()),
            "ssim_mean": float(s.mean()), "ssim_min": float(s.min())}


def measure(payloads: list[bytes], peer_venv: Path = PEER_VENV) -> dict[str, Any]:
    """PSNR/SSIM of each tool's output against the reference, per image and summarised, plus image-path CPU."""
    mine = our_settings()
    ours_out = [ours(d) for d in payloads]
    copy = [variant(d, **mine) for d in payloads]
    for i, (a, b) in enumerate(zip(ours_out, copy)):
        if a != b:
            raise RuntimeError(f"bench image {i}: the bench-local copy of our path ({mine}) differs from "
                               "process_image; fix download_quality.variant before trusting the ablations")
    other_idct = "accurate" if mine["fast_idct"] else "fast"
    ablations = {
        f"as laion-tasks, {other_idct} IDCT": {**mine, "fast_idct": not mine["fast_idct"]},
        "as laion-tasks, full-size decode (no DCT scaling)": {**mine, "draft_margin": None},
    }
    if mine != PREVIOUS:
        ablations["previous laion-tasks path (DCT scaling to the target, fast IDCT, BOX)"] = PREVIOUS
    tools: dict[str, list[tuple[bytes, Box]]] = {"img2dataset": [], "laion-tasks": ours_out}
    tools.update({name: [variant(d, **cfg) for d in payloads] for name, cfg in ablations.items()})
    tools["img2dataset"], peer_cpu = run_peer(payloads, peer_venv)
    scores: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in tools}
    for i, data in enumerate(payloads):
        full = full_decode(data)
        refs: dict[tuple[int, int], np.ndarray] = {}
        for name, outputs in tools.items():
            out, (left, top, w, h) = outputs[i]
            if (w, h) not in refs:
                refs[(w, h)] = reference(full, (w, h))
            got = decode_output(out)[top : top + h, left : left + w]
            scores[name][0].append(psnr(refs[(w, h)], got))
            scores[name][1].append(ssim(luma(refs[(w, h)]), luma(got)))
    result: dict[str, Any] = {"n_images": len(payloads), "method": METHOD, "tools": {}}
    for name, (ps, ss) in scores.items():
        result["tools"][name] = _summary(ps, ss)
    gaps = np.array(scores["laion-tasks"][0]) - np.array(scores["img2dataset"][0])
    result["psnr_gap_db"] = float(gaps.mean())  # ours - img2dataset, mean of per-image differences
    result["images_more_than_0_5_db_below_peer"] = int((gaps < -0.5).sum())
    result["ssim_gap"] = float(np.mean(np.array(scores["laion-tasks"][1]) - np.array(scores["img2dataset"][1])))
    result["same_content_size"] = sum(a[1][2:] == b[1][2:] for a, b in zip(tools["laion-tasks"], tools["img2dataset"]))
    result["ours"] = {"idct": "fast (JDCT_IFAST)" if mine["fast_idct"] else "accurate (JDCT_ISLOW)",
                      "shrink_on_load_margin": mine["draft_margin"], "downscale_filter": mine["downscale"]}
    result["cpu_ms_per_img"] = {  # image path only, one core, in-process, best of 3
        "img2dataset Resizer": peer_cpu,
        "laion-tasks process_image": _per_image_cpu_ms(lambda d: ours(d), payloads),
        **{name: _per_image_cpu_ms(lambda d, cfg=cfg: variant(d, **cfg), payloads) for name, cfg in ablations.items()},
    }
    return result


def load_inputs(names: list[str]) -> dict[str, list[bytes]]:
    sys.path.insert(0, str(REPO / "bench"))
    from download_bench import web_mix

    images = [p.read_bytes() for p in sorted(IMAGES_DIR.glob("*.JPEG"))]
    if len(images) != 200:
        raise RuntimeError(f"{IMAGES_DIR}: expected the 200 ImageNet sample JPEGs, found {len(images)}")
    sets = {"imagenet": images, "web": web_mix(images)}
    return {n: sets[n] for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", default="imagenet,web")
    parser.add_argument("--peer-resize", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_resize:
        peer_resize(*args.peer_resize)
        return
    sys.path.insert(0, str(REPO))
    out = {name: measure(payloads) for name, payloads in load_inputs(args.inputs.split(",")).items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
