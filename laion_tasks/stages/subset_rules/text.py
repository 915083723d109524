"""DataComp's text-based rule: the caption names a class from a list, after the language filter."""

from __future__ import annotations

import logging
import re


from laion_tasks import storage
from laion_tasks.stage import StageError


log = logging.getLogger(__name__)


# -- the text rule -------------------------------------------------------------------------


def load_class_names(spec: list[str] | str) -> list[str]:
    """Class names: a list, a ``.json`` list (``builtin:en_classnames.json#imagenet1k`` picks from the
    packaged CLIP_benchmark names), or a text file with one name per line."""
    from laion_tasks.stages.evaluate.datasets import load_classnames

    if isinstance(spec, list):
        names = spec
    elif spec.startswith("builtin:") or spec.split("#", 1)[0].endswith(".json"):
        path, _, key = spec.partition("#")
        names = load_classnames(spec, key or None) if key else load_classnames(path)
    else:
        try:
            names = storage.read_text(spec).splitlines()
        except (OSError, storage.StorageError) as exc:
            raise StageError(f"text_classes file {spec}: cannot be read: {exc}") from exc
    cleaned = list(dict.fromkeys(" ".join(n.split()) for n in names if n and n.strip()))
    if not cleaned:
        raise StageError(f"text_classes {spec if isinstance(spec, str) else 'list'} holds no class name")
    return cleaned


def class_pattern(names: list[str]) -> str:
    """An RE2 pattern true when a text contains one of ``names`` as whole words, any case, any whitespace between."""
    alternatives = sorted({r"\s+".join(re.escape(word) for word in n.split()) for n in names}, key=len, reverse=True)
    return r"(?i)(?:^|[^\pL\pN])(?:" + "|".join(alternatives) + r")(?:[^\pL\pN]|$)"
