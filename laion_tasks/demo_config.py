"""The demo's configuration: the fixture crawl's settings, and the world model's scores and thresholds.

Kept apart from :mod:`laion_tasks.demo` (which runs the deployment) because the tests build the same
config without running the demo: with the world model where meaning is checked, with the random tiny
models where it is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from laion_tasks.fixtures.world_model import WorldModel

DEMO_CRAWL = "CC-MAIN-2000-01"


def demo_subsets(similarity: float = 0.0) -> dict[str, Any]:
    """LAION's default subsets with their fixed CLIP similarity bound (LAION-400M's 0.3, for ViT-B/32)
    replaced by ``similarity``: the world model's calibrated English threshold, or 0.0 for random models."""
    import re

    from laion_tasks.config import CurateConfig

    out: dict[str, Any] = {}
    for name, subset in CurateConfig().subsets.items():
        data = subset.model_dump()
        data["where"] = re.sub(r"similarity >= 0\.\d+", f"similarity >= {similarity}", data["where"])
        if data["where"] != subset.where:
            data["description"] = re.sub(r"CLIP ViT-B/32 >= 0\.\d+", f"CLIP >= {similarity} (demo world model)", data["description"])
        out[name] = data
    out["laion2B-en"]["write_images"] = True  # a trainable WebDataset subset for `laion train`
    return out


def world_config(world: WorldModel) -> dict[str, Any]:
    """Score with the world model, as with real weights, at the thresholds its calibration measured.

    The calibration (``world.json`` beside the checkpoint) scored held-out world pictures the way the
    pipeline does: per language route, captions of the picture against captions that name another
    colour or shape (the CLIP thresholds), and each picture against a resized, re-encoded copy and
    against a distinct picture of the same colour and shape (the near-duplicate threshold, below
    every copy it could and above every distinct picture). :func:`config_header` states the figures.
    """
    checkpoint = {"model": world.model, "pretrained": None, "checkpoint": str(world.checkpoint)}
    near_dup = world.threshold("near_dup")
    english = world.threshold("clip_english")
    return {
        "clip": {
            "english": {**checkpoint, "threshold": english},
            "multilingual": {**checkpoint, "threshold": world.threshold("clip_multilingual")},
        },
        "dedup": {"near_dup_threshold": near_dup},
        # search results merge near-duplicates at the same cosine as dedup: distinct pictures of one
        # description are kept apart, re-uploads are not shown twice
        "serve": {"dedup_threshold": near_dup},
        # the world model's text tower never read an NSFW word: punsafe comes from NudeNet's detector
        "tag": {"nsfw_method": "nudenet"},
        "curate": {"subsets": demo_subsets(english)},
    }


def config_header(world: WorldModel | None) -> str:
    """The YAML comment that says where the demo's thresholds come from, with the measured figures."""
    if world is None:
        return ("# Random tiny CLIP models (no meaning): CLIP thresholds 0.0 and a near-duplicate threshold of 0.999,\n"
                "# because random embeddings are near-parallel. The demo and the e2e tests use the world model.\n")
    lines = [f"# Scores with the demo world model {world.directory} (laion_tasks/fixtures/world_model.py),",
             "# thresholds from its calibration on held-out world pictures:"]
    for name, what in (("clip_english", "clip.english.threshold"), ("clip_multilingual", "clip.multilingual.threshold")):
        c = world.calibration[name]
        lines.append(f"#   {what} {c['threshold']}: keeps {c['positives_kept']:.0%} of {c['positives']} matched pairs and "
                     f"{c['negatives_kept']:.0%} of {c['negatives']} pairs whose caption names another colour or shape")
    c = world.calibration["near_dup"]
    lines.append(f"#   dedup.near_dup_threshold and serve.dedup_threshold {c['threshold']}: "
                 f"{c['positives_kept']:.0%} of {c['positives']} resized + re-encoded copies are at or above it "
                 f"(lowest {c['positives_min']}), {c['negatives_kept']:.0%} of {c['negatives']} distinct pictures of the "
                 f"same colour and shape (highest {c['negatives_max']})")
    return "\n".join(lines) + "\n"


def demo_config(
    work: Path, base_url: str, storage_root: str, lineage_url: str, extra: dict[str, Any] | None = None,
    world: WorldModel | None = None,
) -> dict[str, Any]:
    """The demo's config: the world model's when given, else the random tiny models (tests that need no meaning)."""
    tiny = {"model": "laion-tiny-clip", "pretrained": None, "threshold": 0.0}
    config: dict[str, Any] = {
        "storage": {"root": storage_root},
        "lineage": {"url": lineage_url},
        "extract": {"cc_base_url": base_url},
        "download": {
            "shard_size": 40,
            "allow_private_networks": True,  # the fixture images are served on loopback
            "max_concurrency": 16,
            "max_per_host": 16,
            "request_deadline_s": 10,
            "retries": 1,
            "backoff_base_s": 0.05,
            "min_image_size": 64,
            "processes": 1,
        },
        "clip": {
            # Random tiny models give near-zero similarities, so the demo threshold is 0.0;
            # production keeps LAION's 0.28 / 0.26 with real weights.
            "english": tiny,
            "multilingual": {**tiny, "model": "laion-tiny-clip-multi"},
            "batch_size": 32,
            "num_workers": 0,
            "device": "cpu",
        },
        # The tiny random models make CLIP similarities near 0 and all image embeddings
        # near-parallel (median pairwise cosine ~0.96), so the demo uses similarity >= 0.0
        # in its subsets and a near-duplicate threshold of 0.999. LAION's thresholds are
        # the defaults everywhere else (docs/CONFIG.md).
        "dedup": {"near_dup_threshold": 0.999, "buckets": 8},
        "curate": {"subsets": demo_subsets()},
        "train": {"subset": "laion2B-en", "epochs": 2, "batch_size": 16, "device": "cpu", "workers": 0},
        "eval": {"dataset": str(work / "crawl" / "eval"), "device": "cpu", "batch_size": 32},
        "index": {"subsets": ["laion2B-en"]},
        "orchestration": {
            "snapshots": [DEMO_CRAWL],
            "max_mapped_tasks": 4,
            "task_retries": 0,
            "collinfo_url": f"{base_url}collinfo.json",
        },
    }
    from laion_tasks.config import deep_merge

    if world is not None:
        config = deep_merge(config, world_config(world))
    if extra:
        config = deep_merge(config, extra)
    return config


def comparison_config(work: Path) -> dict[str, Any]:
    """Issue 22: DataComp's rules as subsets beside LAION's, trained alike and compared zero-shot in the card.

    The image rule's targets and the text rule's classes are the fixture world's eval classes (a toy world:
    the figures say whether the machinery works, not which filter wins at scale)."""
    from laion_tasks.fixtures.crawl import EVAL_CLASSES
    from laion_tasks.stages.subset_rules import datacomp_subsets

    subsets = datacomp_subsets(str(work / "crawl" / "eval"), list(EVAL_CLASSES), cluster_size=4)
    return {"curate": {"subsets": subsets},
            # the text rule keeps a handful of the toy crawl's samples: a batch must fit in the smallest subset
            "train": {"compare_subsets": list(subsets), "samples_seen": 64, "batch_size": 2}}
