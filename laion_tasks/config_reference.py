"""Render every configuration knob as Markdown (docs/CONFIG.md), from the typed config itself."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel

from laion_tasks.config import Settings, SubsetConfig


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _rows(model: type[BaseModel], instance: BaseModel, prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel) and name not in ("subsets",):
            rows.extend(_rows(type(value), value, key + "."))
            continue
        env = "LAION_" + key.upper().replace(".", "__")
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{key}` | `{_default(value)}` | `{env}` | {desc} |")
    return rows


def render() -> str:
    settings = Settings()
    out = [
        "# Configuration reference",
        "",
        "Generated from `laion_tasks/config.py` by `python -m laion_tasks.config_reference > docs/CONFIG.md`.",
        "Precedence: defaults < YAML file (`--config` or `$LAION_CONFIG`) < `LAION_*` environment variables.",
        "",
    ]
    for section, field in Settings.model_fields.items():
        value = getattr(settings, section)
        out += [f"## `{section}`", "", "| key | default | environment | meaning |", "|---|---|---|---|"]
        out += _rows(type(value), value, f"{section}.")
        out.append("")
    out += ["## Default subsets (`curate.subsets`)", "", "| subset | predicate | description |", "|---|---|---|"]
    for name, subset in settings.curate.subsets.items():
        out.append(f"| `{name}` | `{subset.where}` | {subset.description} |")
    out += ["", "## Keys of one subset (`curate.subsets.<name>`)", "", "| key | default | meaning |", "|---|---|---|"]
    for name, field in SubsetConfig.model_fields.items():
        default = "required" if field.is_required() else f"`{_default(field.default)}`"
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        out.append(f"| `{name}` | {default} | {desc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
