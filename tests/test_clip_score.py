"""CLIP scoring stage: exact open_clip preprocessing, reference-equal embeddings, bad input, routing."""

from __future__ import annotations

import io
import logging
import re
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clip_fixtures import FixtureSample, encode_image, skimage_samples, synthetic_image, write_shard
from laion_tasks.config import ClipConfig, ClipModelConfig
from laion_tasks.models.clip import cached_clip
from laion_tasks import wds
from laion_tasks.stages.clip import data as cs_data, encode as cs
from laion_tasks.stages.clip.encode import clip_score_shard

EN = "a small dog playing with a red ball in the garden"
DE = "Ein kleiner Hund spielt im Garten mit einem roten Ball"
FR = "Un petit chien joue dans le jardin avec une balle rouge"
NOLANG = "1234 5678"


def tiny_config(**overrides) -> ClipConfig:
    base = dict(
        english=ClipModelConfig(model="laion-tiny-clip", pretrained=None, threshold=0.0),
        multilingual=ClipModelConfig(model="laion-tiny-clip-multi", pretrained=None, threshold=-0.05),
        num_workers=1,
        batch_size=4,
        device="cpu",
    )
    base.update(overrides)
    return ClipConfig(**base)


def run(tmp_path: Path, parquet: Path, tar: Path, config: ClipConfig, name: str = "out"):
    out = tmp_path / f"{name}.parquet"
    img, txt = tmp_path / f"{name}.img.npy", tmp_path / f"{name}.txt.npy"
    stats = clip_score_shard(str(parquet), str(tar), str(out), str(img), str(txt), config)
    return stats, pq.read_table(out).to_pylist(), np.load(img, mmap_mode="r"), np.load(txt, mmap_mode="r")


def reference_encode(model_name: str, images: list[Image.Image], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own path: its transform on the PIL image, encode, L2-normalise, fp32."""
    clip = cached_clip(model_name, None, None, "cpu", 0)
    with torch.no_grad():
        pixels = torch.stack([clip.preprocess(im) for im in images])
        img = torch.nn.functional.normalize(clip.model.encode_image(pixels).float(), dim=-1)
        txt = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(captions)).float(), dim=-1)
    return img.numpy(), txt.numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def skimage_shard(shared_data: Path, tmp_path: Path):
    samples = skimage_samples(shared_data)
    assert len(samples) == 8
    parquet, tar = write_shard(tmp_path / "shard", samples)
    return samples, parquet, tar


def test_preprocessing_equals_open_clip_transform(shared_data: Path, tmp_path: Path) -> None:
    """The tensors our DataLoader workers produce from the tar are bit-identical to open_clip's transform."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    root = shared_data / "images" / "skimage_clip8"
    originals = sorted(p for p in root.iterdir() if p.suffix in (".png", ".jpg"))
    # The real files as-is (PNG grey, RGBA/RGB, JPEG), plus WebP and a large-aspect JPEG.
    samples = [FixtureSample(f"{i:04d}", "caption", p.read_bytes(), ext=p.suffix[1:]) for i, p in enumerate(originals)]
    samples.append(FixtureSample("webp", "caption", encode_image(synthetic_image(3, (300, 500)), "WEBP"), ext="webp"))
    samples.append(FixtureSample("wide", "caption", encode_image(synthetic_image(4, (900, 120)))))
    _, tar = write_shard(tmp_path, samples)
    members = wds.index_images(tar)
    clip = cached_clip("laion-tiny-clip", None, None, "cpu", 0)
    items = [cs_data.PairItem(i, s.caption, members[s.key]) for i, s in enumerate(samples)]
    dataset = cs_data.ShardPairs(tar, items, clip.preprocess, clip.tokenizer, raw_jpeg=False)
    # Reference built independently from open_clip's public transform factory.
    reference = open_clip.image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    for i, sample in enumerate(samples):
        got = dataset[i]
        assert got["error"] is None
        expected = reference(Image.open(io.BytesIO(sample.image)))
        assert got["pixels"].shape == (3, 224, 224)
        assert torch.equal(got["pixels"], expected), sample.key
        assert torch.equal(got["tokens"], clip.tokenizer(["caption"])[0])


def test_gpu_decode_path_is_close_to_pil(shared_data: Path, tmp_path: Path) -> None:
    """torchvision decode_jpeg + tensor resize (the CUDA path, run here on the CPU) vs the exact PIL path."""
    samples = skimage_samples(shared_data)
    clip = cached_clip("laion-tiny-clip", None, None, "cpu", 0)
    transform = cs_data.TensorTransform.from_open_clip(clip.preprocess)
    assert transform is not None and transform.crop == (224, 224)
    jpegs = [torch.frombuffer(bytearray(s.image), dtype=torch.uint8) for s in samples]
    decoded, errors = cs.decode_jpegs_on_device(jpegs, torch.device("cpu"))
    assert errors == [None] * len(samples)
    fast = transform(decoded)
    exact = torch.stack([clip.preprocess(Image.open(io.BytesIO(s.image))) for s in samples])
    assert fast.shape == exact.shape
    # Bicubic antialias differs slightly between Pillow and torch: close, not equal.
    assert (fast - exact).abs().mean() < 0.02
    with torch.no_grad():
        a = clip.model.encode_image(fast)
        b = clip.model.encode_image(exact)
    assert cosine_rows(a.numpy(), b.numpy()).min() >= 0.995


def test_tensor_transform_batches_by_size_in_order() -> None:
    """Same-size images are resized as one batch; the result equals one image at a time, in input order."""
    clip = cached_clip("laion-tiny-clip", None, None, "cpu", 0)
    transform = cs_data.TensorTransform.from_open_clip(clip.preprocess)
    assert transform is not None
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 256, 256), (3, 300, 200), (3, 256, 256), (3, 120, 400), (3, 300, 200), (3, 256, 256)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=gen) for s in shapes]
    batched = transform(images)
    one_by_one = torch.cat([transform([img]) for img in images])
    assert batched.shape == (len(images), 3, *transform.crop)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_gpu_decode_path_in_stage_isolates_bad_jpegs(
    skimage_shard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples, _, _ = skimage_shard
    samples = samples + [FixtureSample("bad", EN, samples[0].image[: len(samples[0].image) // 3])]
    samples.append(FixtureSample("garbage", EN, b"\xff\xd8\xffnot a jpeg at all"))
    parquet, tar = write_shard(tmp_path / "g", samples)
    config = tiny_config(use_multilingual=False)
    _, exact_rows, exact_img, _ = run(tmp_path, parquet, tar, config, "exact")
    monkeypatch.setattr(cs, "TENSOR_DECODE_ON_CPU", True)
    stats, rows, img, _ = run(tmp_path, parquet, tar, config, "tensor")
    assert [r["clip_status"] for r in rows][-1] == "decode_error"
    assert stats.counts["fail:decode_error"] >= 1
    # Both paths agree on which rows were scored (the truncated JPEG may decode partially in both).
    assert [r["has_embedding"] for r in rows] == [r["has_embedding"] for r in exact_rows]
    scored = [i for i, r in enumerate(rows) if r["has_embedding"]]
    assert cosine_rows(img[scored], exact_img[scored]).min() >= 0.995
    for r, e in zip(rows, exact_rows):
        if r["has_embedding"]:
            assert abs(r["similarity"] - e["similarity"]) < 0.02


def test_embeddings_equal_open_clip_reference(skimage_shard, tmp_path: Path) -> None:
    samples, parquet, tar = skimage_shard
    stats, rows, img, txt = run(tmp_path, parquet, tar, tiny_config(use_multilingual=False))
    assert stats.counts["success"] == 8
    images = [Image.open(io.BytesIO(s.image)) for s in samples]
    ref_img, ref_txt = reference_encode("laion-tiny-clip", images, [s.caption for s in samples])
    assert cosine_rows(img, ref_img).min() >= 0.999
    assert cosine_rows(txt, ref_txt).min() >= 0.999
    ref_sim = (ref_img * ref_txt).sum(1)
    np.testing.assert_allclose([r["similarity"] for r in rows], ref_sim, atol=1e-4)
    for r in rows:
        assert r["clip_model"] == "laion-tiny-clip"
        assert r["clip_status"] == "scored"  # no threshold in this stage: curate applies clip.*.threshold


def test_bad_input_gets_a_status_and_the_rest_is_scored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="laion_tasks.progress")
    good = encode_image(synthetic_image(10))
    truncated = encode_image(synthetic_image(11, (640, 480)))[:400]
    samples = [
        FixtureSample("ok1", EN, good),
        FixtureSample("garbage", EN, b"this is not an image"),
        FixtureSample("truncated", EN, truncated),
        FixtureSample("empty", "", good),
        FixtureSample("blank", "   \n\t", good),
        FixtureSample("none", None, good),
        FixtureSample("nodl", EN, None),
        FixtureSample("nodl2", EN, None, status="failed_to_resize"),
        FixtureSample("ok2", "a webp picture of a landscape", encode_image(synthetic_image(12), "WEBP"), ext="webp"),
        FixtureSample("gif", EN, encode_image(synthetic_image(13).convert("P"), "GIF"), ext="png"),
    ]
    parquet, tar = write_shard(tmp_path / "bad", samples)
    # A row that claims success but whose image is not in the tar: decode_error, not silently lost.
    table = pq.read_table(parquet)
    extra = table.slice(0, 1).to_pylist()[0] | {"key": "ghost", "uid": "uid-ghost"}
    import pyarrow as pa

    table = pa.concat_tables([table, pa.Table.from_pylist([extra], schema=table.schema)])
    pq.write_table(table, parquet)

    stats, rows, img, txt = run(tmp_path, parquet, tar, tiny_config(use_multilingual=False))
    status = {r["key"]: r["clip_status"] for r in rows}
    assert [r["key"] for r in rows] == [s.key for s in samples] + ["ghost"]
    assert status["garbage"] == "decode_error"
    assert status["truncated"] == "decode_error"
    assert status["ghost"] == "decode_error"
    assert status["empty"] == status["blank"] == status["none"] == "empty_caption"
    assert status["nodl"] == status["nodl2"] == "no_image"
    for key in ("ok1", "ok2", "gif"):  # a GIF payload under a .png name still decodes with Pillow
        assert status[key] == "scored"
    assert dict(stats.counts) == {
        "success": 3,
        "fail:decode_error": 3,
        "fail:empty_caption": 3,
        "skip:no_image": 2,
    }
    assert stats.total == len(rows) == 11
    # progress counts every pair sent to the model (decode errors too), in the task log's line
    assert re.search(r"^clip \S+: 6/6 pairs \(100\.0%\), .* pairs/s, finished in", "\n".join(caplog.messages), re.M)
    for i, r in enumerate(rows):
        if r["has_embedding"]:
            assert r["similarity"] is not None and r["clip_model"] == "laion-tiny-clip"
            assert abs(np.linalg.norm(img[i].astype(np.float32)) - 1) < 1e-2
        else:
            assert r["similarity"] is None and r["clip_model"] is None
            assert not img[i].any() and not txt[i].any()


def test_language_routing_uses_per_language_models(tmp_path: Path) -> None:
    captions = [EN, DE, FR, NOLANG, EN + " at sunset"]
    images = [synthetic_image(20 + i) for i in range(len(captions))]
    samples = [FixtureSample(f"k{i}", c, encode_image(im)) for i, (c, im) in enumerate(zip(captions, images))]
    parquet, tar = write_shard(tmp_path / "lang", samples)
    stats, rows, img, txt = run(tmp_path, parquet, tar, tiny_config())
    assert [r["language_group"] for r in rows] == ["en", "multi", "multi", "nolang", "en"]
    assert [r["language"] for r in rows][:3] == ["en", "de", "fr"]
    expected_models = ["laion-tiny-clip", "laion-tiny-clip-multi", "laion-tiny-clip-multi", "laion-tiny-clip", "laion-tiny-clip"]
    assert [r["clip_model"] for r in rows] == expected_models
    assert set(stats.extra["models"]) == {"laion-tiny-clip", "laion-tiny-clip-multi"}
    decoded = [Image.open(io.BytesIO(s.image)) for s in samples]
    for model in set(expected_models):
        idx = [i for i, m in enumerate(expected_models) if m == model]
        ref_img, ref_txt = reference_encode(model, [decoded[i] for i in idx], [captions[i] for i in idx])
        assert cosine_rows(img[idx], ref_img).min() >= 0.999
        assert cosine_rows(txt[idx], ref_txt).min() >= 0.999
        for i in idx:
            assert rows[i]["clip_status"] == "scored"
    # The two tiny models really differ, so routing is observable.
    other_img, _ = reference_encode("laion-tiny-clip", [decoded[1]], [DE])
    assert cosine_rows(img[[1]], other_img)[0] < 0.99

    _, rows_off, _, _ = run(tmp_path, parquet, tar, tiny_config(use_multilingual=False), "off")
    assert {r["clip_model"] for r in rows_off} == {"laion-tiny-clip"}


def test_embeddings_are_memory_mappable_and_aligned(skimage_shard, tmp_path: Path) -> None:
    samples, parquet, tar = skimage_shard
    stats, rows, img, txt = run(tmp_path, parquet, tar, tiny_config(batch_size=3))
    assert isinstance(img, np.memmap) and isinstance(txt, np.memmap)
    assert img.dtype == np.float16 and txt.dtype == np.float16
    assert img.shape == txt.shape == (len(rows), 64)
    assert [r["key"] for r in rows] == [s.key for s in samples]
    assert [r["uid"] for r in rows] == [f"uid-{s.key}" for s in samples]
    norms = np.linalg.norm(np.asarray(img, dtype=np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    sims = cosine_rows(img, txt)
    np.testing.assert_allclose(sims, [r["similarity"] for r in rows], atol=3e-3)
    # Batch size and worker count do not change the result.
    _, rows2, img2, _ = run(tmp_path, parquet, tar, tiny_config(batch_size=8, num_workers=2), "b8")
    np.testing.assert_allclose(np.asarray(img2, np.float32), np.asarray(img, np.float32), atol=2e-3)
    assert stats.bytes_written > img.nbytes + txt.nbytes
    assert stats.checksum and len(stats.checksum) == 64


def test_shard_without_images_still_writes_aligned_outputs(tmp_path: Path) -> None:
    samples = [FixtureSample("a", EN, None), FixtureSample("b", "", None)]
    parquet, tar = write_shard(tmp_path / "none", samples)
    stats, rows, img, _ = run(tmp_path, parquet, tar, tiny_config())
    assert [r["clip_status"] for r in rows] == ["no_image", "no_image"]
    assert img.shape == (2, 64) and not np.asarray(img).any()
    assert dict(stats.counts) == {"skip:no_image": 2}


def test_missing_columns_and_bad_tar_name_the_file(tmp_path: Path) -> None:
    import pyarrow as pa

    from laion_tasks.stage import StageError

    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["b"]}), parquet)
    with pytest.raises(StageError, match="x.parquet.*status"):
        run(tmp_path, parquet, tmp_path / "missing.tar", tiny_config())
    good_parquet, _ = write_shard(tmp_path / "s", [FixtureSample("a", EN, encode_image(synthetic_image(1)))])
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(StageError, match="bad.tar"):
        run(tmp_path, good_parquet, bad_tar, tiny_config())
    assert not (tmp_path / "out.parquet").exists()


def test_s3_uris(s3_root: str, tmp_path: Path) -> None:
    from laion_tasks import storage

    samples = [FixtureSample(f"k{i}", EN, encode_image(synthetic_image(30 + i))) for i in range(3)]
    parquet, tar = write_shard(tmp_path / "s3", samples)
    storage.write_bytes(f"{s3_root}/images/000000.parquet", parquet.read_bytes())
    storage.write_bytes(f"{s3_root}/images/000000.tar", tar.read_bytes())
    out = f"{s3_root}/clip/000000.parquet"
    stats = clip_score_shard(
        f"{s3_root}/images/000000.parquet", f"{s3_root}/images/000000.tar", out,
        f"{s3_root}/clip/000000.img.npy", f"{s3_root}/clip/000000.txt.npy", tiny_config(),
    )
    assert stats.total == 3 and storage.exists(out)
    with storage.local_copy(f"{s3_root}/clip/000000.img.npy") as local:
        assert np.load(local, mmap_mode="r").shape == (3, 64)


def test_precision_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cs.resolve_precision("auto", cpu) is None
    assert cs.resolve_precision("fp32", cuda) is None
    assert cs.resolve_precision("fp16", cuda) is torch.float16
    assert cs.resolve_precision("bf16", cpu) is torch.bfloat16


def test_bf16_autocast_on_cpu_stays_close(skimage_shard, tmp_path: Path) -> None:
    """The AMP code path (run with bf16 on the CPU here; bf16/fp16 on CUDA) stays close to fp32."""
    _, parquet, tar = skimage_shard
    _, rows32, img32, _ = run(tmp_path, parquet, tar, tiny_config(use_multilingual=False), "fp32")
    _, rows16, img16, _ = run(
        tmp_path, parquet, tar, tiny_config(use_multilingual=False, precision="bf16", channels_last=True), "bf16"
    )
    assert cosine_rows(img16, img32).min() >= 0.98
    for a, b in zip(rows16, rows32):
        assert abs(a["similarity"] - b["similarity"]) < 0.05


def test_webdataset_key_split() -> None:  # laion_tasks.wds: the one key rule
    assert wds.split_member("000001.jpg") == ("000001", "jpg")
    assert wds.split_member("dir/000001.seg.JPG") == ("dir/000001", "seg.jpg")
    assert json.loads(json.dumps(cs.OUTCOME))["no_image"] == "skip:no_image"
