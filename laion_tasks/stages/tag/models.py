"""The tag stage's models, loaded once per process: safety, watermark and aesthetic heads, zero-shot prompts."""

from __future__ import annotations

import functools
import logging
import re
from typing import Any


from laion_tasks.config import ClipConfig

log = logging.getLogger(__name__)


def keyword_pattern(keywords: list[str]) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive alternation of the keyword list ("sex" does not hit "Essex")."""
    words = [re.escape(k.strip()) for k in keywords if k.strip()]
    return re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE) if words else None





@functools.lru_cache(maxsize=2)
def _nsfw_head(path: str) -> Any:
    from laion_tasks.models.heads import load_nsfw_head

    return load_nsfw_head(path)


@functools.lru_cache(maxsize=2)
def _aesthetic_head(path: str) -> Any:
    from laion_tasks.models.heads import load_aesthetic_head

    return load_aesthetic_head(path)


@functools.lru_cache(maxsize=2)
def _watermark_model(path: str, device: str) -> Any:
    from laion_tasks.models.heads import load_watermark_model

    return load_watermark_model(path, device)


@functools.lru_cache(maxsize=4)
def _zero_shot(model: str, pretrained: str | None, checkpoint: str | None, device: str, seed: int,
               positive: tuple[str, ...], negative: tuple[str, ...]) -> Any:
    from laion_tasks.models.clip import cached_clip
    from laion_tasks.models.heads import ZeroShotScorer

    clip = cached_clip(model, pretrained, checkpoint, device, seed)
    return ZeroShotScorer.from_prompts(clip, positive, negative)


def _zero_shot_for(clip_config: ClipConfig, positive: list[str], negative: list[str]) -> Any:
    m = clip_config.english
    return _zero_shot(m.model, m.pretrained, m.checkpoint, clip_config.device, clip_config.seed,
                      tuple(positive), tuple(negative))


def _device(clip_config: ClipConfig) -> str:
    from laion_tasks.models.clip import resolve_device

    return str(resolve_device(clip_config.device))


