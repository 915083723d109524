"""The demo world and the fixture crawl's planted truth (fast: no training, no pipeline).

The world model itself is trained and checked end to end by tests/test_e2e.py and
tests/test_deployment.py (tests/world_checks.py)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from laion_tasks.fixtures import world, world_model
from laion_tasks.fixtures.crawl import (
    SEARCH_DESCRIPTION,
    SEARCH_PICTURES,
    Truth,
    build_fixture_crawl,
)
from laion_tasks.fixtures.world import LANGUAGES, SHAPES, crawl_caption, noun_phrase
from laion_tasks.fixtures.world_calibration import gate_misses, separating_threshold
from laion_tasks.fixtures.world_model import WorldSpec, ensure_world_model

SHAPE_WORDS = {
    "de": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "stripes": "Streifen"},
    "fr": {"circle": "cercle", "square": "carré", "triangle": "triangle", "stripes": "rayures"},
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "stripes": "rayas"},
    "en": {"circle": "circle", "square": "square", "triangle": "triangle", "stripes": "stripes"},
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_caption_names_the_shape_it_shows(lang: str) -> None:
    """The old fixture said "Kreis" in every German caption, "carré" in every French one, whatever the shape."""
    for shape in SHAPES:
        for style in range(3):
            caption = crawl_caption(lang, "red", shape, "pink", style)
            named = {s for s, word in SHAPE_WORDS[lang].items() if word in caption.split() or f"{word}," in caption}
            assert named == {shape}, (lang, shape, caption)


def test_grammar_of_the_descriptions() -> None:
    assert noun_phrase("en", "orange", "circle") == "an orange circle"
    assert noun_phrase("en", "red", "stripes", "small") == "thin red stripes"
    assert noun_phrase("de", "red", "circle", "small") == "ein kleiner roter Kreis"
    assert noun_phrase("de", "green", "square") == "ein grünes Quadrat"
    assert noun_phrase("de", "white", "stripes") == "weiße Streifen"
    assert noun_phrase("fr", "green", "stripes") == "des rayures vertes"
    assert noun_phrase("fr", "white", "square", "large") == "un grand carré blanc"
    assert noun_phrase("es", "yellow", "stripes") == "unas rayas amarillas"
    assert noun_phrase("es", "black", "triangle", "small") == "un triángulo negro pequeño"


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("world-crawl") / "crawl"
    return build_fixture_crawl(out, "http://127.0.0.1:9/", n_wat=2, pages_per_wat=6)


def test_truth_sidecar_lies_outside_the_served_directory(crawl) -> None:  # type: ignore[no-untyped-def]
    assert crawl.truth_path.exists() and crawl.root not in crawl.truth_path.parents
    truth = Truth.read(crawl.truth_path)
    assert len(truth.links) == crawl.image_links
    for link in truth.links:
        name = link.url.split("?")[0].rsplit("/", 1)[1]
        assert (crawl.root / "img" / name).exists() == (link.image != "missing"), link


def test_the_crawl_plants_every_case(crawl) -> None:  # type: ignore[no-untyped-def]
    truth = Truth.read(crawl.truth_path)
    ok = [lk for lk in truth.links if lk.image == "ok" and not lk.repeated]
    routes = Counter(("en" if lk.caption["lang"] == "en" else "multi", lk.caption["matched"]) for lk in ok if lk.caption)
    for route in ("en", "multi"):
        assert routes[(route, True)] >= 8 and routes[(route, False)] >= 8, routes
    assert {"ok", "truncated", "missing", "html", "tiny", "high_resolution"} <= {lk.image for lk in truth.links}
    assert Counter(lk.copy for lk in ok if lk.copy in ("resized", "reencoded")) == {"resized": 4, "reencoded": 4}
    assert any(lk.repeated for lk in truth.links), "an in-page (url, alt) duplicate"
    assert sum(lk.scene["watermark"] for lk in ok if lk.copy is None) >= 5
    wanted = dict(zip(("color", "shape"), SEARCH_DESCRIPTION))
    searched = {lk.picture for lk in ok if lk.copy is None and {k: lk.scene[k] for k in wanted} == wanted}
    assert len(searched) >= SEARCH_PICTURES


def test_mismatched_captions_name_another_colour_or_shape(crawl) -> None:  # type: ignore[no-untyped-def]
    for link in Truth.read(crawl.truth_path).links:
        if link.caption is None or link.scene is None:
            continue
        same = (link.caption["color"], link.caption["shape"]) == (link.scene["color"], link.scene["shape"])
        assert same == link.caption["matched"], link


def test_distinct_pictures_differ_in_what_the_world_shows(crawl) -> None:  # type: ignore[no-untyped-def]
    """Two picture ids are two distinct pictures: they differ in colour, shape, background or size."""
    seen: dict[tuple[str, ...], int] = {}
    for link in Truth.read(crawl.truth_path).links:
        if link.picture is None or link.scene is None:
            continue
        ident = tuple(link.scene[k] for k in ("color", "shape", "background", "size"))
        assert seen.setdefault(ident, link.picture) == link.picture, (ident, link)


def test_crawl_is_deterministic(tmp_path: Path, crawl) -> None:  # type: ignore[no-untyped-def]
    again = build_fixture_crawl(tmp_path / "crawl", "http://127.0.0.1:9/", n_wat=2, pages_per_wat=6)
    assert again.truth_path.read_bytes() == crawl.truth_path.read_bytes()
    for path in sorted((crawl.root / "img").iterdir()):
        assert (again.root / "img" / path.name).read_bytes() == path.read_bytes(), path.name


def test_separating_thresholds() -> None:
    balanced = separating_threshold([0.55, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.35, 0.58])
    assert balanced["threshold"] == 0.45 and balanced["positives_kept"] == 1.0 and balanced["negatives_kept"] == 0.2
    copies = [0.999] * 19 + [0.95]
    strict = separating_threshold(copies, [0.9, 0.96], rule="no_negatives")
    assert strict["threshold"] > 0.96 and strict["negatives_kept"] == 0.0 and strict["positives_kept"] == 0.95


def test_the_digest_follows_the_training_config() -> None:
    base = WorldSpec()
    assert base.digest() == WorldSpec().digest()
    assert base.digest() != WorldSpec(lr=base.lr * 2).digest()
    assert base.digest() != WorldSpec(pictures=base.pictures + 1).digest()


def test_the_model_is_trained_once_per_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache hit loads the directory; only a miss trains (here a stand-in that writes what training writes)."""
    calls: list[Path] = []

    def fake_train(spec: WorldSpec, directory: Path, echo) -> world_model.WorldModel:  # type: ignore[no-untyped-def]
        calls.append(directory)
        (directory / "model").mkdir(parents=True)
        (directory / "model" / "epoch_latest.pt").write_bytes(b"weights")
        (directory / "world.json").write_text(json.dumps({"model": spec.model, "checkpoint": "model/epoch_latest.pt",
                                                          "calibration": {"near_dup": {"threshold": 0.99}}}))
        loaded = world_model.load_world_model(directory)
        assert loaded is not None
        return loaded

    monkeypatch.setattr(world_model, "_train", fake_train)
    first = ensure_world_model(WorldSpec(), root=tmp_path)
    second = ensure_world_model(WorldSpec(), root=tmp_path)
    assert len(calls) == 1 and first.checkpoint == second.checkpoint and second.threshold("near_dup") == 0.99
    ensure_world_model(WorldSpec(seed=7), root=tmp_path)
    assert len(calls) == 2


def test_watermark_is_visible() -> None:
    """A watermarked picture differs from the same scene without one over a good part of its area."""
    rng = random.Random(3)
    scene = world.random_scene(rng, watermark_p=1.0)
    plain = world.Scene(**{**scene.__dict__, "watermark": False})
    a = np.asarray(scene.render().convert("L"), dtype=np.int16)
    b = np.asarray(plain.render().convert("L"), dtype=np.int16)
    assert (np.abs(a - b) > 30).mean() > 0.05


def test_the_quality_gate_names_each_missed_bar() -> None:
    """A model under the held-out gate is trained again with the next seed (world_model._train)."""
    good = {"watermark": {"auc": 0.99},
            "clip_english": {"positives_kept": 0.97, "negatives_kept": 0.04},
            "clip_multilingual": {"positives_kept": 0.96, "negatives_kept": 0.06}}
    assert gate_misses(good) == []
    bad = {**good, "watermark": {"auc": 0.918}, "clip_multilingual": {"positives_kept": 0.9, "negatives_kept": 0.1}}
    misses = gate_misses(bad)
    assert len(misses) == 3 and "watermark AUC 0.918" in misses[0], misses
    assert all("clip_multilingual" in m for m in misses[1:]), misses
