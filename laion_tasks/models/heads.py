"""Scoring heads for the tag stage: LAION's NSFW, watermark and aesthetic models, and zero-shot fallbacks.

Weights are operator-supplied files (never downloaded here):

* NSFW (LAION-AI/CLIP-based-NSFW-Detector): the PyTorch port of the AutoKeras MLP that
  the upstream repo ships as ``models/clip_ViT-L-14_openai_binary_nsfw_head.pth`` (and
  ``..._ViT-B-32_...``). A plain ``state_dict`` with keys ``norm.mean``, ``norm.variance``,
  ``linear_1..4.weight/bias`` (L/14: 768->64->512->256->1) or ``linear_1..3`` (B/32:
  512->32->32->1). Input: L2-normalised CLIP image embeddings of the matching model.
  Output: probability of NSFW.
* Watermark (LAION-5B watermark detector): timm ``efficientnet_b3a`` with the classifier
  replaced by 1536->625->ReLU->Dropout(0.3)->256->ReLU->2, a ``state_dict`` as saved by
  ``torch.save(model.state_dict())`` (``watermark_model_v1.pt``); 256x256 input,
  ImageNet normalisation; softmax column 0 is the watermark probability.
* Aesthetics (christophschuhmann/improved-aesthetic-predictor): MLP 768->1024->128->64->16->1
  with dropouts, a ``state_dict`` with keys ``layers.{0,2,4,6,7}.weight/bias``
  (``sac+logos+ava1-l14-linearMSE.pth``), on L2-normalised CLIP ViT-L/14 image embeddings.

Without weights: punsafe and pwatermark fall back to CLIP zero-shot scoring with the
configured prompt sets; the aesthetic score stays null (there is no honest fallback).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file does not match the expected architecture; the message names the file."""


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from laion_tasks import storage

    with storage.local_copy(path) as local:
        try:
            state = torch.load(str(local), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{path}: cannot be read as a torch state_dict: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict (mapping of tensors), got {type(state).__name__}")
    return state


# ---------------------------------------------------------------- NSFW (CLIP-based)


class KerasNormalization(nn.Module):
    """Keras ``Normalization`` layer: (x - mean) / sqrt(variance), with upstream's epsilon."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.variance.sqrt() + 1e-10)


class NsfwHeadL14(nn.Module):
    """LAION CLIP-based NSFW detector for ViT-L/14 embeddings (AutoKeras MLP, ported)."""

    input_dim = 768

    def __init__(self) -> None:
        super().__init__()
        self.norm = KerasNormalization(768)
        self.linear_1 = nn.Linear(768, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear_1(self.norm(x)))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


class NsfwHeadB32(nn.Module):
    """LAION CLIP-based NSFW detector for ViT-B/32 embeddings (AutoKeras MLP, ported)."""

    input_dim = 512

    def __init__(self) -> None:
        super().__init__()
        self.norm = KerasNormalization(512)
        self.linear_1 = nn.Linear(512, 32)
        self.linear_2 = nn.Linear(32, 32)
        self.linear_3 = nn.Linear(32, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear_1(self.norm(x)))
        x = self.dropout(torch.relu(self.linear_2(x)))
        return torch.sigmoid(self.linear_3(x)).squeeze(-1)


def load_nsfw_head(path: str) -> nn.Module:
    """Pick the L/14 or B/32 head from the state dict's keys and load it strictly."""
    state = _load_state_dict(path)
    model: nn.Module = NsfwHeadL14() if "linear_4.weight" in state else NsfwHeadB32()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: not a LAION CLIP-based NSFW head state_dict: {exc}") from exc
    return model.eval()


# ---------------------------------------------------------------- aesthetics


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor: 768->1024->128->64->16->1 (no activations, as upstream)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_aesthetic_head(path: str) -> AestheticMLP:
    state = _load_state_dict(path)
    weight = state.get("layers.0.weight")
    if weight is None:
        raise WeightsError(f"{path}: no 'layers.0.weight': not an improved-aesthetic-predictor state_dict")
    model = AestheticMLP(int(weight.shape[1]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: not an improved-aesthetic-predictor state_dict: {exc}") from exc
    return model.eval()


# ---------------------------------------------------------------- watermark


WATERMARK_IMAGE_SIZE = 256


def build_watermark_model() -> nn.Module:
    """LAION-5B watermark detector architecture (random init; load weights on top)."""
    import timm

    # LAION trained "efficientnet_b3a"; timm now names that architecture efficientnet_b3 (same weights layout).
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    return model


def load_watermark_model(path: str, device: str | torch.device = "cpu") -> nn.Module:
    state = _load_state_dict(path)
    model = build_watermark_model()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: not a LAION watermark detector (efficientnet_b3a) state_dict: {exc}") from exc
    return model.eval().to(device)


def watermark_transform() -> Any:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize((WATERMARK_IMAGE_SIZE, WATERMARK_IMAGE_SIZE)),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


@torch.no_grad()
def watermark_probabilities(model: nn.Module, images: Sequence[Any], device: str | torch.device = "cpu") -> np.ndarray:
    """P(watermark) for PIL images (softmax column 0, as in LAION's inference script)."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    transform = watermark_transform()
    batch = torch.stack([transform(im.convert("RGB")) for im in images]).to(device)
    return torch.softmax(model(batch).float(), dim=1)[:, 0].cpu().numpy()


# ---------------------------------------------------------------- zero-shot fallback


@dataclass
class ZeroShotScorer:
    """CLIP zero-shot binary classifier: positive vs negative prompt prototypes.

    Each prompt set is averaged into one normalised text prototype (CLIP's prompt
    ensembling); the score is softmax(100 * cos) of the positive class, as in CLIP's
    zero-shot classification.
    """

    prototypes: torch.Tensor
    """(2, dim): row 0 positive, row 1 negative."""

    @classmethod
    def from_prompts(cls, clip: Any, positive: Sequence[str], negative: Sequence[str]) -> "ZeroShotScorer":
        from laion_tasks.models.clip import encode_texts

        if not positive or not negative:
            raise ValueError("zero-shot scoring needs at least one positive and one negative prompt")
        protos = []
        for prompts in (positive, negative):
            emb = encode_texts(clip, list(prompts)).mean(0)
            protos.append(emb / emb.norm().clamp_min(1e-12))
        return cls(torch.stack(protos))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """P(positive) for (N, dim) L2-normalised image embeddings."""
        if embeddings.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        if embeddings.shape[1] != self.prototypes.shape[1]:
            raise WeightsError(
                f"image embeddings have dim {embeddings.shape[1]} but the CLIP text encoder gives {self.prototypes.shape[1]}"
            )
        emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        logits = 100.0 * emb @ self.prototypes.T
        return torch.softmax(logits, dim=1)[:, 0].numpy()


@torch.no_grad()
def score_embeddings(model: nn.Module, embeddings: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Run an embedding head over (N, dim) embeddings in batches; float32 scores."""
    expected = getattr(model, "input_dim", None)
    if expected is not None and embeddings.shape[0] and embeddings.shape[1] != expected:
        raise WeightsError(f"head expects {expected}-d CLIP embeddings, got {embeddings.shape[1]}-d")
    out = [
        model(torch.from_numpy(np.asarray(embeddings[i : i + batch_size], dtype=np.float32))).float().numpy()
        for i in range(0, embeddings.shape[0], batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---------------------------------------------------------------- NudeNet


NUDENET_UNSAFE_CLASSES = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)


def nudenet_available() -> bool:
    try:
        import nudenet  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _nudenet_detector() -> Any:
    from nudenet import NudeDetector

    return NudeDetector()  # the 320n ONNX model ships inside the wheel; runs offline on CPU


def nudenet_unsafe(images: Sequence[Any], batch_size: int = 8) -> np.ndarray:
    """Highest NudeNet detection score among exposed-body classes per PIL image (0.0 if none)."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    detector = _nudenet_detector()
    # NudeNet expects BGR arrays (OpenCV order).
    arrays = [np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1]) for im in images]
    results = detector.detect_batch(arrays, batch_size=batch_size)
    return np.array(
        [max((d["score"] for d in dets if d["class"] in NUDENET_UNSAFE_CLASSES), default=0.0) for dets in results],
        dtype=np.float32,
    )
