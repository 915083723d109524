"""Loaders of LAION's NSFW, watermark and aesthetic heads, with random weights of the real shapes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from laion_tasks.config import ClipConfig, TagConfig
from laion_tasks.models import heads
from laion_tasks.stages.tag import tag_shard
from tests.tag_fixtures import TINY_CLIP, make_image, make_shard


def save(module: torch.nn.Module, path) -> str:
    torch.save(module.state_dict(), path)
    return str(path)


def test_nsfw_l14_head_matches_upstream_layout(tmp_path):
    torch.manual_seed(0)
    ref = heads.NsfwHeadL14()
    ref.norm.mean.normal_()
    ref.norm.variance.uniform_(0.5, 2.0)
    assert sorted(ref.state_dict()) == sorted(
        ["norm.mean", "norm.variance"] + [f"linear_{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")]
    )
    loaded = heads.load_nsfw_head(save(ref, tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth"))
    assert isinstance(loaded, heads.NsfwHeadL14)
    x = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    expected = torch.sigmoid(
        ref.linear_4(torch.relu(ref.linear_3(torch.relu(ref.linear_2(torch.relu(
            ref.linear_1((x - ref.norm.mean) / (ref.norm.variance.sqrt() + 1e-10))))))))
    ).squeeze(-1)
    out = heads.score_embeddings(loaded, x.numpy())
    assert out == pytest.approx(expected.detach().numpy(), abs=1e-6)
    assert ((out >= 0) & (out <= 1)).all()


def test_nsfw_b32_head_is_detected_from_keys(tmp_path):
    loaded = heads.load_nsfw_head(save(heads.NsfwHeadB32(), tmp_path / "b32.pth"))
    assert isinstance(loaded, heads.NsfwHeadB32)
    assert heads.score_embeddings(loaded, np.zeros((3, 512), np.float32)).shape == (3,)
    with pytest.raises(heads.WeightsError, match="head expects 512-d"):
        heads.score_embeddings(loaded, np.zeros((3, 768), np.float32))


def test_wrong_weights_name_the_file(tmp_path):
    bad = save(torch.nn.Linear(3, 3), tmp_path / "bad.pth")
    with pytest.raises(heads.WeightsError, match="bad.pth"):
        heads.load_nsfw_head(bad)
    with pytest.raises(heads.WeightsError, match="bad.pth"):
        heads.load_aesthetic_head(bad)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(heads.WeightsError, match="junk.pth"):
        heads.load_watermark_model(str(tmp_path / "junk.pth"))


def test_aesthetic_mlp_shapes_and_keys(tmp_path):
    model = heads.AestheticMLP(768)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.2.weight": (128, 1024), "layers.4.weight": (64, 128),
                      "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}
    loaded = heads.load_aesthetic_head(save(model, tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    x = np.random.default_rng(0).normal(size=(4, 768)).astype(np.float32)
    assert heads.score_embeddings(loaded, x) == pytest.approx(model.eval()(torch.from_numpy(x)).detach().numpy(), abs=1e-5)


def test_watermark_detector_architecture_loads_and_scores(tmp_path):
    torch.manual_seed(0)
    model = heads.build_watermark_model()
    assert model.classifier[0].in_features == 1536 and model.classifier[-1].out_features == 2
    loaded = heads.load_watermark_model(save(model, tmp_path / "watermark_model_v1.pt"))
    probs = heads.watermark_probabilities(loaded, [make_image(1, 300), make_image(2, 120)])
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()


def test_tag_shard_with_all_supplied_weights(tmp_path):
    """768-d (ViT-L/14-sized) embeddings: NSFW head, aesthetic MLP and watermark detector, no zero-shot."""
    torch.manual_seed(1)
    nsfw = save(heads.NsfwHeadL14(), tmp_path / "nsfw.pth")
    aesthetic = save(heads.AestheticMLP(), tmp_path / "aesthetic.pth")
    watermark = save(heads.build_watermark_model(), tmp_path / "watermark.pt")
    shard = make_shard(tmp_path / "shard", n=5, dim=768, failed=(2,))
    config = TagConfig(nsfw_weights=nsfw, aesthetic_weights=aesthetic, watermark_weights=watermark, image_batch_size=2)
    stats = tag_shard(shard.images_parquet, shard.tar, shard.clip_parquet, shard.img_emb, shard.out, config,
                      ClipConfig.model_validate(TINY_CLIP))
    rows = pq.read_table(shard.out).to_pylist()
    tagged = [r for r in rows if r["tag_status"] == "tagged"]
    assert len(tagged) == 4 and stats.extra["aesthetic_available"] is True
    assert all(r["nsfw_method"] == "laion_detector" and r["watermark_method"] == "laion_detector" for r in tagged)
    assert all(r["aesthetic_score"] is not None and 0 <= r["pwatermark"] <= 1 for r in tagged)
    expected = heads.score_embeddings(heads.load_nsfw_head(nsfw), shard.embeddings[[0, 1, 3, 4]].astype(np.float16))
    assert [r["punsafe"] for r in tagged] == pytest.approx(expected, abs=1e-3)
    assert rows[2]["punsafe"] is None and rows[2]["aesthetic_score"] is None


@pytest.mark.skipif(not heads.nudenet_available(), reason="nudenet is not installed")
def test_nudenet_second_opinion(tmp_path):
    scores = heads.nudenet_unsafe([make_image(1, 320), make_image(2, 200)])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    shard = make_shard(tmp_path, n=3, failed=(1,))
    tag_shard(shard.images_parquet, shard.tar, shard.clip_parquet, shard.img_emb, shard.out, TagConfig(nudenet=True),
              ClipConfig.model_validate(TINY_CLIP))
    rows = pq.read_table(shard.out).to_pylist()
    assert rows[0]["nudenet_unsafe"] is not None and rows[1]["nudenet_unsafe"] is None


@pytest.mark.skipif(not heads.nudenet_available(), reason="nudenet is not installed")
def test_punsafe_from_nudenet(tmp_path):
    """tag.nsfw_method=nudenet: punsafe is NudeNet's score (the demo's world CLIP never read NSFW words)."""
    shard = make_shard(tmp_path, n=3, failed=(1,))
    stats = tag_shard(shard.images_parquet, shard.tar, shard.clip_parquet, shard.img_emb, shard.out,
                      TagConfig(nsfw_method="nudenet"), ClipConfig.model_validate(TINY_CLIP))
    rows = pq.read_table(shard.out).to_pylist()
    tagged = [r for r in rows if r["tag_status"] == "tagged"]
    assert len(tagged) == 2 and stats.extra["nsfw_method"] == "nudenet"
    assert all(r["nsfw_method"] == "nudenet" and r["punsafe"] == r["nudenet_unsafe"] for r in tagged)
    assert rows[1]["punsafe"] is None
