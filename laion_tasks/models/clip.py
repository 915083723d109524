"""Loading open_clip models: pretrained tags, local checkpoints, or tiny random test models.

Real weights come from open_clip's own download (``model`` + ``pretrained`` tag) on
machines with internet, or from a local checkpoint file/directory. Offline machines
get a clear error naming the knobs to set. Tests and the offline demo use
``laion-tiny-clip`` (shipped in ``laion_tasks/model_configs``) initialised from a fixed
seed, so scores repeat across runs and machines.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_MODELS = tuple(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


class ModelUnavailableError(RuntimeError):
    """Weights cannot be obtained here; the message says which setting to change."""


@dataclass
class LoadedClip:
    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str | None
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") and self.model.text_projection is not None else int(self.model.visual.output_dim)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def register_local_configs() -> None:
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_checkpoint(checkpoint: str) -> str:
    path = Path(checkpoint)
    if path.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "epoch_latest.pt"):
            if (path / name).exists():
                return str(path / name)
        candidates = sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if not candidates:
            raise ModelUnavailableError(f"checkpoint directory {path} holds no .pt/.safetensors/.bin file")
        return str(candidates[-1])
    if not path.exists():
        raise ModelUnavailableError(f"checkpoint {path} does not exist")
    return str(path)


def load_clip(
    model: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    seed: int = 0,
) -> LoadedClip:
    """Build an open_clip model with its eval transform and tokenizer.

    * ``checkpoint``: a local file or directory (open_clip or ``laion train`` output).
    * ``pretrained``: an open_clip pretrained tag, downloaded by open_clip (needs internet
      or a warm HF cache).
    * neither: random weights from ``seed``; only sensible for the tiny test models.
    """
    import open_clip

    register_local_configs()
    dev = resolve_device(device)
    if model not in open_clip.list_models():
        raise ModelUnavailableError(
            f"unknown open_clip model {model!r}; known: tiny {list(TINY_MODELS)} and open_clip.list_models()"
        )
    weights = _resolve_checkpoint(checkpoint) if checkpoint else pretrained
    # Refuse before building the model: a ViT-L takes seconds to initialise for nothing.
    if weights is None and model not in TINY_MODELS and not os.environ.get("LAION_ALLOW_RANDOM_WEIGHTS"):
        raise ModelUnavailableError(
            f"open_clip {model!r} has no weights: set a pretrained tag or a checkpoint "
            "(random initialisation is only allowed for the tiny test models, or with LAION_ALLOW_RANDOM_WEIGHTS=1 "
            "for benchmarks)"
        )
    torch.manual_seed(seed)
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=dev)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        if weights and not checkpoint:
            raise ModelUnavailableError(
                f"could not load open_clip {model!r} with pretrained={weights!r}: {type(exc).__name__}: {exc}. "
                "This machine may be offline. Set clip.english.checkpoint / clip.multilingual.checkpoint "
                "(LAION_CLIP__ENGLISH__CHECKPOINT / LAION_CLIP__MULTILINGUAL__CHECKPOINT) to a local checkpoint "
                "file or directory, pre-fill the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1 skips the retries), "
                "or use the tiny test model (model=laion-tiny-clip, pretrained=null)."
            ) from exc
        raise ModelUnavailableError(f"could not load open_clip {model!r} from {weights}: {exc}") from exc
    clip_model.eval()
    tokenizer = open_clip.get_tokenizer(model)
    return LoadedClip(clip_model, preprocess, tokenizer, model, weights, dev)


@functools.lru_cache(maxsize=4)
def cached_clip(
    model: str, pretrained: str | None, checkpoint: str | None, device: str = "auto", seed: int = 0
) -> LoadedClip:
    """One model per process (the setup()/process() split)."""
    return load_clip(model, pretrained, checkpoint, device, seed)


@torch.no_grad()
def encode_texts(clip: LoadedClip, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised fp32 text embeddings on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[start : start + batch_size]).to(clip.device)
        feats = clip.model.encode_text(tokens).float()
        out.append(torch.nn.functional.normalize(feats, dim=-1).cpu())
    if not out:
        return torch.zeros((0, clip.embed_dim))
    return torch.cat(out)


@torch.no_grad()
def encode_images(clip: LoadedClip, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 image embeddings on the CPU from preprocessed tensors."""
    feats = clip.model.encode_image(images.to(clip.device)).float()
    return torch.nn.functional.normalize(feats, dim=-1).cpu()
