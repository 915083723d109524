"""Curate honours the AI-use preferences the download stage recorded: a subset drops the rows whose publisher
refuses one of its ``intended_uses`` (``drop:usage_pref``), and only those."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout
from laion_tasks.config import CurateConfig, SubsetConfig
from laion_tasks.stages.curate import curate_snapshot, read_manifest
from laion_tasks.stages.download.shard import USAGE_PREF_TYPE
from curate_fixtures import expected_base_outcome, make_snapshot
from test_curate import SNAP, read_subset


def preference(i: int) -> dict[str, Any] | None:
    """Row i's ``usage_pref``: train-ai refused, search refused, an RSL license only, or nothing found."""
    base = {"train_ai": None, "ai_input": None, "search": None, "sources": [], "licenses": []}
    return [
        {**base, "train_ai": "n", "sources": ["robots.txt Content-Usage: train-ai=n"]},
        {**base, "train_ai": "y", "search": "n", "sources": ["header Content-Usage: train-ai=y, search=n"]},
        {**base, "licenses": ["https://example.org/license.xml"]},
        None,
        None,
    ][i % 5]


def test_subsets_drop_the_rows_refused_for_their_intended_uses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=60, with_dedup=False)
    for shard in sorted({r["shard"] for r in rows}):
        uri = layout.images_parquet_uri(root, SNAP, shard)
        table = pq.read_table(uri)
        prefs = [preference(int(key[-4:])) for key in table.column("key").to_pylist()]
        pq.write_table(table.append_column("usage_pref", pa.array(prefs, USAGE_PREF_TYPE)), uri)
    subsets = {
        "train": SubsetConfig(where="true"),  # the default: train-ai
        "search": SubsetConfig(where="true", intended_uses=["search"]),
        "both": SubsetConfig(where="true", intended_uses=["train-ai", "search"]),
        "none": SubsetConfig(where="true", intended_uses=[]),
    }
    results = curate_snapshot(root, SNAP, CurateConfig(subsets=subsets))

    eligible = [r for r in rows if expected_base_outcome(r) == "eligible"]
    refused = {
        "train": {r["key"] for r in eligible if int(r["key"][-4:]) % 5 == 0},
        "search": {r["key"] for r in eligible if int(r["key"][-4:]) % 5 == 1},
        "none": set(),
    }
    refused["both"] = refused["train"] | refused["search"]
    assert refused["train"] and refused["search"], "the fixture has eligible rows of both kinds"
    base = Counter(expected_base_outcome(r) for r in rows if expected_base_outcome(r) != "eligible")
    for name, keys in refused.items():
        expected = Counter({**base, "drop:usage_pref": len(keys), "kept": len(eligible) - len(keys)})
        assert results[name].counts == +expected, name
        kept, _names = read_subset(root, name)
        assert {r["key"] for r in kept} == {r["key"] for r in eligible} - keys, name
        assert read_manifest(root, SNAP, name)["intended_uses"] == list(subsets[name].intended_uses)

