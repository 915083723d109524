"""DataComp's subset rules (laion_tasks/stages/subset_rules.py) through the real curate stage.

* CLIP-score top N%: the threshold equals DuckDB's exact quantile of every scored sample, computed here
  on its own connection; the kept rows are exactly those at or above it; another scorer's clip table
  can be the score.
* Image clusters: the kept rows are exactly those whose pool cluster (dedup's, or the rule's own) is
  the nearest cluster of a target, the targets' clusters computed here by brute force.
* Text classes: the language filter first, then whole-word class names, any case.
* Every rule narrows a subset before its within-subset dedup: a group keeps one member whenever one
  member passes the rules.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_fixtures import expected_base_outcome, make_snapshot
from PIL import Image

from laion_tasks import layout, storage
from laion_tasks.card import write_dataset_card
from laion_tasks.config import ClipConfig, CurateConfig, DedupConfig, SubsetConfig
from laion_tasks.snapshot_db import open_snapshot
from laion_tasks.stage import StageError
from laion_tasks.stages.curate import curate_snapshot, read_manifest
from laion_tasks.stages.dedup import ShardInput, dedup_all, work_dir_for
from laion_tasks.stages.subset_rules import RULE_OUTCOMES, class_pattern, load_class_names, own_pool

SNAP = "CC-RULES-2025-01"
DIM = 32
BLOBS = 8


def _written(root: str, name: str) -> dict[str, dict]:
    """key -> LAION row of a written subset."""
    manifest = read_manifest(root, SNAP, name)
    assert manifest is not None and manifest["status"] == "ok", manifest
    out: dict[str, dict] = {}
    for part in manifest["parquet"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(layout.subset_dir(root, SNAP, name), part["name"]))))
        out.update({r["key"]: r for r in table.to_pylist()})
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write_embeddings(root: str, rows: list[dict], seed: int = 3) -> np.ndarray:
    """Image embeddings for every scored row (zeros elsewhere, as the clip stage stores them): one of
    BLOBS well-separated directions plus noise. Returns the blob centres."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(BLOBS, DIM)))
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    for shard, mine in by_shard.items():
        emb = np.zeros((len(mine), DIM), dtype=np.float16)
        for i, r in enumerate(mine):
            r["blob"] = None
            if r["has_embedding"]:
                r["blob"] = int(rng.integers(BLOBS))
                emb[i] = _unit(centres[r["blob"]] + 0.15 * rng.normal(size=DIM) / np.sqrt(DIM))
        buf = io.BytesIO()
        np.save(buf, emb)
        storage.write_bytes(layout.clip_image_emb_uri(root, SNAP, shard), buf.getvalue())
    return centres


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """A snapshot with embeddings and a real dedup run (near-dups on: centroids and runs with primaries)."""
    root = str(tmp_path_factory.mktemp("rules-root"))
    rows = make_snapshot(root, SNAP, shards=3, per_shard=80, seed=11, with_dedup=False)
    centres = _write_embeddings(root, rows)
    shards = sorted({r["shard"] for r in rows})
    inputs = [ShardInput(s, layout.images_parquet_uri(root, SNAP, s), layout.clip_parquet_uri(root, SNAP, s),
                         layout.clip_image_emb_uri(root, SNAP, s), layout.tags_parquet_uri(root, SNAP, s)) for s in shards]
    n_emb = sum(1 for r in rows if r["has_embedding"])
    dedup = DedupConfig(cluster_size=max(1, n_emb // 12), near_dup_threshold=0.9999, buckets=2, kmeans_sample_per_cluster=64)
    dedup_all(inputs, work_dir_for(root, SNAP), layout.dedup_dir(root, SNAP), dedup, ClipConfig())
    return root, rows, centres, dedup


def _eligible(rows: list[dict], predicate=lambda r: True) -> list[dict]:
    """Rows that enter subsets with ``require_clip_kept=False`` (DataComp's rules replace LAION's threshold) and match."""
    return [r for r in rows if expected_base_outcome(r, require_clip_kept=False) == "eligible" and predicate(r)]


def _check_kept_within(root: str, name: str, stats, allowed: list[dict], matched: list[dict]) -> None:
    """The subset holds one member of every uid group among ``allowed`` (the rows passing every rule) and nothing else."""
    written = _written(root, name)
    allowed_keys = {r["key"] for r in allowed}
    assert set(written) <= allowed_keys, sorted(set(written) - allowed_keys)[:5]
    groups = {r["uid"] for r in allowed}
    assert len(written) == len(groups)  # one member per group that has a member passing the rules
    assert stats.counts["kept"] == len(written)
    assert stats.counts.get("drop:duplicate", 0) == len(allowed) - len(groups)
    assert sum(stats.counts.get(k, 0) for k in RULE_OUTCOMES) == len(matched) - len(allowed)


# -- CLIP score ----------------------------------------------------------------------------------


def _duckdb_quantile(paths: list[str], q: float) -> tuple[float, int]:
    con = duckdb.connect()
    files = "[" + ", ".join(f"'{p}'" for p in paths) + "]"
    t, n = con.execute(f"SELECT quantile_disc(similarity, {q}), count(similarity) FROM read_parquet({files})").fetchall()[0]
    con.close()
    return float(t), int(n)


def test_clip_score_threshold_is_duckdbs_exact_quantile_and_cuts_there(pool) -> None:
    root, rows, _centres, _ = pool
    config = CurateConfig(require_clip_kept=False, subsets={
        "top30": SubsetConfig(where="true", clip_score_top_pct=30),
        "en-top50": SubsetConfig(where="language = 'en'", clip_score_top_pct=50),
    })
    results = curate_snapshot(root, SNAP, config, clip=ClipConfig())
    clip_files = [str(storage.local_path(layout.clip_parquet_uri(root, SNAP, s))) for s in sorted({r["shard"] for r in rows})]
    for name, pct, predicate in (("top30", 30, lambda r: True), ("en-top50", 50, lambda r: r["language"] == "en")):
        expected, population = _duckdb_quantile(clip_files, 1 - pct / 100)
        scores = sorted(r["similarity"] for r in rows if r["similarity"] is not None)
        assert population == len(scores)
        assert expected == scores[int(np.floor((len(scores) - 1) * (1 - pct / 100)))]  # quantile_disc's definition
        record = read_manifest(root, SNAP, name)["rules"]["clip_score"]
        assert record["threshold"] == expected and record["population"] == population
        assert record["models"] == ["laion-tiny-clip"] and record["score"] == "similarity"
        matched = _eligible(rows, predicate)
        allowed = [r for r in matched if r["similarity"] >= expected]
        assert 0 < len(allowed) < len(matched)
        assert results[name].counts["drop:clip_score"] == len(matched) - len(allowed)
        _check_kept_within(root, name, results[name], allowed, matched)
    # the card records the threshold and the model
    uri = write_dataset_card(root, SNAP, None, results, config=config, clip=ClipConfig())
    card = storage.read_text(storage.join(layout.subset_dir(root, SNAP, "top30"), "README.md"))
    threshold = read_manifest(root, SNAP, "top30")["rules"]["clip_score"]["threshold"]
    assert f"score >= **{threshold:.6g}**" in card and "laion-tiny-clip" in card
    assert f"{threshold:.6g}" in storage.read_text(uri)


def test_clip_score_from_another_scorers_clip_table(pool, tmp_path: Path) -> None:
    """clip_score_model names a clip table written by another model: its scores rank, its model is recorded."""
    root, rows, _centres, _ = pool
    other = tmp_path / "l14" / "clip"
    other.mkdir(parents=True)
    rng = np.random.default_rng(5)
    score_of: dict[tuple[str, str], float] = {}
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        sims = [None if r["similarity"] is None else float(np.float32(rng.uniform(0, 1))) for r in mine]
        score_of.update({(shard, r["key"]): s for r, s in zip(mine, sims) if s is not None})
        pq.write_table(pa.table({"key": [r["key"] for r in mine], "similarity": pa.array(sims, pa.float32()),
                                 "clip_model": ["ViT-L-14-test"] * len(mine)}), other / f"{shard}.parquet")
    config = CurateConfig(require_clip_kept=False, subsets={"l14": SubsetConfig(where="true", clip_score_top_pct=40, clip_score_model=str(other))})
    stats = curate_snapshot(root, SNAP, config, clip=ClipConfig())["l14"]
    expected, _ = _duckdb_quantile([str(p) for p in sorted(other.glob("*.parquet"))], 0.6)
    record = read_manifest(root, SNAP, "l14")["rules"]["clip_score"]
    assert record["threshold"] == expected and record["models"] == ["ViT-L-14-test"]
    matched = _eligible(rows)
    allowed = [r for r in matched if score_of[(r["shard"], r["key"])] >= expected]
    assert 0 < len(allowed) < len(matched)
    _check_kept_within(root, "l14", stats, allowed, matched)
    with pytest.raises(StageError, match="no <shard>.parquet"):
        bad = CurateConfig(require_clip_kept=False, subsets={"x": SubsetConfig(where="true", clip_score_top_pct=40, clip_score_model=str(tmp_path))})
        curate_snapshot(root, SNAP, bad, clip=ClipConfig())


# -- image clusters ---------------------------------------------------------------------------------


def _dedup_clusters(root: str, rows: list[dict]) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """key -> the cluster dedup gave its vector (runs' primary + rank, rank -> key from dedup's verdicts);
    and dedup's centroids (leaves, mean)."""
    work = Path(storage.local_path(work_dir_for(root, SNAP)))
    rank_to_cluster: dict[int, int] = {}
    for primary in sorted((work / "runs").glob("*.primary.npy")):
        ranks = np.load(str(primary).replace(".primary.npy", ".rank.npy"))
        rank_to_cluster.update(zip(ranks.tolist(), np.load(primary).tolist()))
    verdicts = pq.read_table(storage.local_path(layout.dedup_dir(root, SNAP))).to_pylist()
    cluster_of = {v["key"]: rank_to_cluster[v["rank"]] for v in verdicts if v["rank"] in rank_to_cluster}
    with np.load(work / "centroids.npz") as z:
        return cluster_of, z["leaves"].astype(np.float32), z["mean"].astype(np.float32)


def _brute_force_nearest(targets: np.ndarray, leaves: np.ndarray, mean: np.ndarray) -> set[int]:
    return set(np.argmax(_unit(targets - mean) @ leaves.T, axis=1).tolist())


def test_image_rule_reusing_dedups_clusters_keeps_exactly_the_hit_clusters(pool, tmp_path: Path) -> None:
    root, rows, centres, dedup = pool
    targets = tmp_path / "targets.npy"
    np.save(targets, (centres[:2] + 0.01).astype(np.float32))
    config = CurateConfig(require_clip_kept=False, subsets={"img": SubsetConfig(where="true", image_targets=str(targets),
                                                       image_cluster_size=dedup.cluster_size)})
    stats = curate_snapshot(root, SNAP, config, clip=ClipConfig())["img"]
    record = read_manifest(root, SNAP, "img")["rules"]["image_clusters"]
    assert record["centroids"] == "dedup's, reused"
    cluster_of, leaves, mean = _dedup_clusters(root, rows)
    hits = _brute_force_nearest(np.load(targets), leaves, mean)
    assert record["clusters_hit"] == len(hits) and record["clusters"] == len(leaves) > len(hits)
    matched = _eligible(rows)
    allowed = [r for r in matched if cluster_of.get(r["key"]) in hits]
    assert 0 < len(allowed) < len(matched)
    assert stats.counts["drop:image_cluster"] == len(matched) - len(allowed)
    _check_kept_within(root, "img", stats, allowed, matched)


def test_image_rule_clusters_the_pool_itself_when_dedups_sizes_do_not_fit(pool, tmp_path: Path) -> None:
    """Clusters of another size than dedup's: the rule trains its own centroids and assigns every pool vector."""
    root, rows, centres, dedup = pool
    targets = tmp_path / "targets.npy"
    np.save(targets, (centres[3:5] - 0.01).astype(np.float32))
    size = dedup.cluster_size * 3  # outside dedup's size x/÷ 2
    config = CurateConfig(require_clip_kept=False, subsets={"img": SubsetConfig(where="language = 'en'", image_targets=str(targets),
                                                       image_cluster_size=size)})
    stats = curate_snapshot(root, SNAP, config, clip=ClipConfig())["img"]
    record = read_manifest(root, SNAP, "img")["rules"]["image_clusters"]
    assert record["centroids"].startswith("trained by the rule")
    with open_snapshot(root, SNAP, config, ClipConfig()) as db:  # the same seeded training, to read its clusters
        own = own_pool(db, size, config)
    assert record["clusters"] == own.clusters
    hits = _brute_force_nearest(np.load(targets), own.centroids.leaves, own.centroids.mean)
    cluster_of = {}
    for (shard, clip_uri, _), assigned in zip(own.shards, own.assigned):
        keys = pq.read_table(storage.local_path(clip_uri), columns=["key"]).column(0).to_pylist()
        cluster_of.update({(shard, k): int(c) for k, c in zip(keys, assigned) if c >= 0})
    # the tree's assignment is the exact nearest leaf for these well-separated blobs
    for r in rows:
        if r["has_embedding"]:
            assert (r["shard"], r["key"]) in cluster_of
    matched = _eligible(rows, lambda r: r["language"] == "en")
    allowed = [r for r in matched if cluster_of.get((r["shard"], r["key"])) in hits]
    assert 0 < len(allowed) < len(matched)
    _check_kept_within(root, "img", stats, allowed, matched)


def test_image_rule_embeds_an_image_folder_with_the_english_model(pool, tmp_path: Path) -> None:
    """An ImageFolder target set is embedded with clip.english; its dimension must match the pool's."""
    root, _rows, _centres, dedup = pool
    folder = tmp_path / "targets" / "red_thing"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "0.jpg")
    config = CurateConfig(require_clip_kept=False, subsets={"img": SubsetConfig(where="true", image_targets=str(tmp_path / "targets"),
                                                       image_cluster_size=dedup.cluster_size)})
    clip = ClipConfig.model_validate({"english": {"model": "laion-tiny-clip", "pretrained": None}, "device": "cpu"})
    with pytest.raises(StageError, match=r"subset img: target embeddings have \d+ dimensions, the pool's 32"):
        curate_snapshot(root, SNAP, config, clip=clip)


# -- text classes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,names,hit", [
    ("a photo of a red bicycle", ["red bicycle"], True),
    ("A RED   Bicycle!", ["red bicycle"], True),
    ("redbicycle", ["red bicycle"], False),
    ("a category of things", ["cat"], False),
    ("cat", ["cat"], True),
    ("(cat)", ["cat"], True),
    ("Un chat, noir", ["chat"], True),
    ("un chaton", ["chat"], False),
    ("Größe", ["größe"], True),
    ("c.a.t", ["c.a.t"], True),
    ("cxaxt", ["c.a.t"], False),
])
def test_class_names_match_whole_words_in_any_case(text: str, names: list[str], hit: bool) -> None:
    con = duckdb.connect()
    assert con.execute("SELECT regexp_matches(?, ?)", [text, class_pattern(names)]).fetchall()[0][0] is hit


def test_class_names_from_files(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("red circle\n\n  blue   square \nred circle\n")
    assert load_class_names(str(tmp_path / "c.txt")) == ["red circle", "blue square"]
    assert "goldfish" in load_class_names("builtin:en_classnames.json#imagenet1k")
    with pytest.raises(StageError, match="no class name"):
        load_class_names(["  "])


def test_text_rule_filters_language_first_then_class_names(pool) -> None:
    root, rows, _centres, _ = pool
    config = CurateConfig(require_clip_kept=False, subsets={
        "text": SubsetConfig(where="true", text_classes=["Red Bicycle", "cat"]),
        "text-fr": SubsetConfig(where="true", text_classes=["maison"], text_languages=["fr", "de"]),
    })
    results = curate_snapshot(root, SNAP, config, clip=ClipConfig())
    for name, languages, words in (("text", {"en"}, ("red bicycle", "cat")), ("text-fr", {"fr", "de"}, ("maison",))):
        matched = _eligible(rows)
        in_language = [r for r in matched if r["language"] in languages]
        allowed = [r for r in in_language if any(f" {w} " in f" {r['caption'].lower()} " for w in words)]
        assert 0 < len(allowed) < len(in_language) < len(matched)
        counts = results[name].counts
        assert counts["drop:text_language"] == len(matched) - len(in_language)
        assert counts["drop:text_class"] == len(in_language) - len(allowed)
        _check_kept_within(root, name, results[name], allowed, matched)
    record = read_manifest(root, SNAP, "text")["rules"]["text"]
    assert record["languages"] == ["en"] and record["classes"] == 2


# -- combined, and before the within-subset dedup --------------------------------------------------------


def test_rules_combine_and_narrow_before_the_within_subset_dedup(pool, tmp_path: Path) -> None:
    """image ∩ CLIP score ∩ text: each sample's drop reason is the first rule it fails, every outcome sums to
    the snapshot, and a url+alt group whose snapshot-wide representative fails a rule keeps another member."""
    root, rows, centres, dedup = pool
    targets = tmp_path / "targets.npy"
    np.save(targets, centres[:5].astype(np.float32))
    config = CurateConfig(require_clip_kept=False, subsets={"all": SubsetConfig(
        where="true", clip_score_top_pct=60, image_targets=str(targets), image_cluster_size=dedup.cluster_size,
        text_classes=["cat", "maison"], text_languages=["en", "fr", "de", "ja"])})
    stats = curate_snapshot(root, SNAP, config, clip=ClipConfig())["all"]
    assert sum(stats.counts.values()) == len(rows)
    rules = read_manifest(root, SNAP, "all")["rules"]
    threshold = rules["clip_score"]["threshold"]
    cluster_of, leaves, mean = _dedup_clusters(root, rows)
    hits = _brute_force_nearest(np.load(targets), leaves, mean)
    matched = _eligible(rows)
    expected: Counter = Counter()
    allowed = []
    for r in matched:
        words = any(f" {w} " in f" {r['caption'].lower()} " for w in ("cat", "maison"))
        reason = ("drop:text_language" if r["language"] not in ("en", "fr", "de", "ja") else
                  "drop:text_class" if not words else
                  "drop:clip_score" if r["similarity"] < threshold else
                  "drop:image_cluster" if cluster_of.get(r["key"]) not in hits else None)
        if reason:
            expected[reason] += 1
        else:
            allowed.append(r)
    assert all(expected[k] for k in ("drop:text_language", "drop:text_class", "drop:clip_score", "drop:image_cluster"))
    assert {k: stats.counts.get(k, 0) for k in expected} == dict(expected)
    _check_kept_within(root, "all", stats, allowed, matched)
    # the case at stake: a group whose first (snapshot-wide representative) member fails a rule, another passes
    by_uid: dict[str, list[dict]] = defaultdict(list)
    for r in matched:
        by_uid[r["uid"]].append(r)
    allowed_keys = {r["key"] for r in allowed}
    assert any(g[0]["key"] not in allowed_keys and any(m["key"] in allowed_keys for m in g[1:]) for g in by_uid.values())
