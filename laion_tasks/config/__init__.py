"""One typed configuration object for every stage.

Loaded from a YAML file plus ``LAION_*`` environment overrides. Nested keys use a
double underscore: ``LAION_DOWNLOAD__SHARD_SIZE=5000`` sets ``download.shard_size``.
Each stage declares the fields that change its results (``StageSpec.result_fields`` in
its module); its lineage record stores :meth:`Settings.knobs_digest` of those fields, so
changing a knob re-runs exactly the stages it affects, and execution-only knobs
(processes, batch sizes, pools, pod resources) re-run nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError


ENV_PREFIX = "LAION_"
CONFIG_ENV = "LAION_CONFIG"


class ConfigError(ValueError):
    """A configuration that cannot be loaded: ``what`` went wrong, ``where`` (a file, an env var).

    One sentence a person can act on; the CLI prints it as ``error: <what>, in <where>``.
    """

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what}, in {where}")
        self.what = what
        self.where = where

from laion_tasks.config.shared import (  # noqa: F401 - every section, from the module of its kind
    HashListsConfig,
    LangIdConfig,
    LineageConfig,
    OrchestrationConfig,
    PodConfig,
    PodsConfig,
    Section,
    StorageConfig,
    memory_bytes,
)
from laion_tasks.config.stages import (  # noqa: F401
    ClipConfig,
    ClipModelConfig,
    CurateConfig,
    DedupConfig,
    DownloadConfig,
    EvalConfig,
    ExtractConfig,
    IndexConfig,
    ServeConfig,
    SubsetConfig,
    TagConfig,
    TrainConfig,
)


class Settings(Section):
    storage: StorageConfig = StorageConfig()
    lineage: LineageConfig = LineageConfig()
    extract: ExtractConfig = ExtractConfig()
    download: DownloadConfig = DownloadConfig()
    clip: ClipConfig = ClipConfig()
    langid: LangIdConfig = LangIdConfig()
    hashlists: HashListsConfig = HashListsConfig()
    tag: TagConfig = TagConfig()
    dedup: DedupConfig = DedupConfig()
    curate: CurateConfig = CurateConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()
    pods: PodsConfig = PodsConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    def digest(self, *sections: str) -> str:
        """A stable 16-hex digest of the named sections (all when none are named).

        Storage and lineage location are left out on purpose: moving data does not
        change what a stage computes.
        """
        data = self.model_dump(mode="json")
        names = sections or tuple(k for k in data if k not in ("storage", "lineage"))
        payload = {name: data[name] for name in sorted(names)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def knobs(self, fields: "tuple[str, ...] | list[str]") -> dict[str, Any]:
        """The values of dotted config paths; a segment may be a glob (``clip.*.model``).

        A path that names a section or a mapping yields the whole value. A path or glob
        that matches nothing is an error, so a renamed knob cannot silently drop out of
        a stage's digest.
        """
        data = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for path in fields:
            found = _match_path(data, path.split("."), [])
            if not found:
                raise KeyError(f"config path {path!r} matches no setting")
            out.update(found)
        return dict(sorted(out.items()))

    def knobs_digest(self, fields: "tuple[str, ...] | list[str]") -> str:
        """A stable 16-hex digest of :meth:`knobs` (a stage's lineage config digest)."""
        blob = json.dumps(self.knobs(fields), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _match_path(data: Any, parts: list[str], prefix: list[str]) -> dict[str, Any]:
    if not parts:
        return {".".join(prefix): data}
    if not isinstance(data, dict):
        return {}
    head, rest = parts[0], parts[1:]
    keys = [k for k in data if fnmatch.fnmatchcase(k, head)] if any(c in head for c in "*?[") else [head] if head in data else []
    out: dict[str, Any] = {}
    for key in keys:
        out.update(_match_path(data[key], rest, [*prefix, key]))
    return out


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``LAION_A__B=value`` -> ``{"a": {"b": value}}``; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path or path[0] not in Settings.model_fields:
            continue
        _set_nested(out, path, yaml.safe_load(raw) if raw != "" else None)
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings: defaults < YAML file < LAION_* env < explicit overrides.

    Raises :class:`ConfigError` naming the file or environment variable at fault: a missing or
    unreadable file, a YAML syntax error (with its line), an unknown key (with the closest
    known one) or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    from_env = not path and bool(environ.get(CONFIG_ENV))
    path = path or environ.get(CONFIG_ENV)
    file_data: dict[str, Any] = {}
    if path:
        file_data = _read_config_file(Path(path), CONFIG_ENV if from_env else str(path))
    env_data = env_overrides(environ)
    data = deep_merge(file_data, env_data)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        layers: list[tuple[Mapping[str, Any], str | None]] = [(overrides or {}, "overrides"), (env_data, None)]
        raise ConfigError(*explain_validation_error(exc, [*layers, (file_data, str(path))], environ)) from None


def _read_config_file(path: Path, named_by: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; ``named_by`` is who named the file (LAION_CONFIG, or the path itself)."""
    subject = "config file" if named_by == str(path) else f"config file {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{subject} does not exist", named_by) from None
    except IsADirectoryError:
        raise ConfigError(f"{subject} is a directory", named_by) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{subject} cannot be read: {exc}", named_by) from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"YAML syntax error{at}: {problem}", str(path)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"the top level must be a mapping of sections, not a {type(loaded).__name__}", str(path))
    return loaded


MOVED_KEYS: dict[str, str] = {
    **{f"tag.langid_{k}": f"langid.{k}" for k in (
        "method", "model_path", "accept_confidence", "lingua_accuracy", "lingua_max_chars", "lingua_languages",
        "refine_confusable")},
    "tag.language_threshold": "langid.threshold",
    "tag.url_hashlist": "hashlists.url",
    "tag.image_hashlist": "hashlists.image",
    "tag.pdq_hashlist": "hashlists.pdq",
    "tag.pdq_max_distance": "hashlists.pdq_max_distance",
    **{f"{stage}.k8s_{k}": f"pods.{stage}.{k}" for stage in ("clip", "train") for k in (
        "image", "namespace", "node_selector", "tolerations", "cpu", "memory", "gpus", "shm_size", "env_secret",
        "deferrable")},
    "clip.gpu_pool": "pods.clip.pool",
}
"""Keys that moved to the section of what they are (an old config fails naming the new key)."""


def explain_validation_error(
    exc: ValidationError, layers: "list[tuple[Mapping[str, Any], str | None]]", environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(what, where) of the first error of a settings validation, in words.

    ``layers`` are what was merged into the settings, highest priority first, each with its
    name (None: the ``LAION_*`` variables of ``environ``, named by the one that set the key);
    the first layer that sets the key is where the fix goes.
    """
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden" and key in MOVED_KEYS:
        what = f"{key} moved to {MOVED_KEYS[key]}"
    elif first["type"] == "extra_forbidden":
        known = _keys_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        if close:
            what = f"unknown key {key} (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
        else:
            what = f"unknown key {key} (known here: {', '.join(known)})" if known else f"unknown key {key}"
    elif first["type"] == "missing":
        what = f"{key} is required"
    else:
        what = f"{key}: {first['msg']} (got {first.get('input')!r})"
    if len(errors) > 1:
        what += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    where = loc[:-1] if first["type"] == "missing" else loc  # a missing key: where its parent was written
    return what, _layer_of(where, layers, environ or {})


def _layer_of(loc: list[str], layers: "list[tuple[Mapping[str, Any], str | None]]", environ: Mapping[str, str]) -> str:
    """The name of the first layer that sets ``loc``; in the environment, the variable that does
    (``LAION_CLIP__ENGLISH__MODEL``, or ``LAION_CLIP`` holding the whole section as JSON)."""
    for data, name in layers:
        node: Any = data
        for part in loc:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if name is not None:
                return name
            paths = {v: [p.lower() for p in v[len(ENV_PREFIX) :].split("__") if p] for v in environ if v.startswith(ENV_PREFIX)}
            setting = sorted(v for v, path in paths.items() if path and path[: len(loc)] == loc[: len(path)])
            return setting[0] if setting else "the environment"
    return "the defaults"


def _keys_at(loc: list[str]) -> list[str]:
    """The keys the settings accept under ``loc`` (a mapping level, such as a subset's name, is stepped over)."""
    model: Any = Settings
    parts = list(loc)
    while parts:
        field = model.model_fields.get(parts.pop(0)) if _is_model(model) else None
        if field is None:
            return []
        model = _unwrap(field.annotation)
        if typing.get_origin(model) is dict:
            if not parts:
                return []
            parts.pop(0)
            model = _unwrap(typing.get_args(model)[1])
    return list(model.model_fields) if _is_model(model) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
