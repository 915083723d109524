"""Model loading: offline errors, local checkpoints, seeded tiny models. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from laion_tasks.models.clip import TINY_MODELS, ModelUnavailableError, load_clip


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_models_are_shipped() -> None:
    assert {"laion-tiny-clip", "laion-tiny-clip-multi"} <= set(TINY_MODELS)


def test_seeded_tiny_model_repeats_and_seed_matters() -> None:
    a = load_clip("laion-tiny-clip", device="cpu", seed=0)
    b = load_clip("laion-tiny-clip", device="cpu", seed=0)
    c = load_clip("laion-tiny-clip", device="cpu", seed=1)
    assert same_weights(state(a.model), state(b.model))
    assert not same_weights(state(a.model), state(c.model))
    assert a.embed_dim == 64 and a.image_size == 224
    tokens = a.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert torch.equal(a.model.encode_text(tokens), b.model.encode_text(tokens))


@pytest.mark.parametrize("filename", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_checkpoint_directory_round_trip(tmp_path: Path, filename: str) -> None:
    saved = load_clip("laion-tiny-clip-multi", device="cpu", seed=7)
    weights = state(saved.model)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt_dir / filename))
    else:
        torch.save(weights, ckpt_dir / filename)
    # A different seed would give different random weights: the checkpoint must win.
    loaded = load_clip("laion-tiny-clip-multi", checkpoint=str(ckpt_dir), device="cpu", seed=123)
    assert same_weights(weights, state(loaded.model))
    assert loaded.pretrained == str(ckpt_dir / filename)
    # A file path works as well as its directory.
    again = load_clip("laion-tiny-clip-multi", checkpoint=str(ckpt_dir / filename), device="cpu", seed=5)
    assert same_weights(weights, state(again.model))


def test_missing_or_empty_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_clip("laion-tiny-clip", checkpoint=str(tmp_path / "nope.pt"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="holds no"):
        load_clip("laion-tiny-clip", checkpoint=str(tmp_path / "empty"), device="cpu")


def test_unknown_model_and_random_weights_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelUnavailableError, match="unknown open_clip model"):
        load_clip("no-such-model", device="cpu")
    monkeypatch.delenv("LAION_ALLOW_RANDOM_WEIGHTS", raising=False)
    with pytest.raises(ModelUnavailableError, match="has no weights.*LAION_ALLOW_RANDOM_WEIGHTS"):
        load_clip("ViT-B-32", pretrained=None, device="cpu")


def test_offline_pretrained_tag_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights can be fetched here: the error names the checkpoint settings and the tiny model."""
    import huggingface_hub.constants

    # Fail at once instead of retrying DNS for a minute; the error path is the same as offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as info:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    message = str(info.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message
    assert "LAION_CLIP__ENGLISH__CHECKPOINT" in message and "LAION_CLIP__MULTILINGUAL__CHECKPOINT" in message
    assert "laion-tiny-clip" in message
