"""Deterministic regrouping of candidate Parquets into download shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks.stages.regroup import make_download_shards


def write_candidates(path: Path, start: int, n: int) -> str:
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:032x}" for i in range(start, start + n)],
                "url": [f"https://example.org/{i}.jpg" for i in range(start, start + n)],
                "alt": [f"alt {i}" for i in range(start, start + n)],
                "page_url": ["https://example.org/"] * n,
                "wat_file": [path.name] * n,
                "record_date": ["2024-01-01"] * n,
            }
        ),
        path,
        row_group_size=7,
    )
    return str(path)


def test_regroup_is_deterministic_and_complete(tmp_path: Path) -> None:
    cands = tmp_path / "candidates"
    cands.mkdir()
    # Written out of name order: regrouping sorts the URIs.
    uris = [write_candidates(cands / "b.parquet", 100, 23), write_candidates(cands / "a.parquet", 0, 40)]
    shards = make_download_shards(uris, str(tmp_path / "shards"), shard_size=25)
    assert [Path(s).name for s in shards] == ["000000.parquet", "000001.parquet", "000002.parquet"]
    tables = [pq.read_table(s) for s in shards]
    assert [t.num_rows for t in tables] == [25, 25, 13]
    rows = [r for t in tables for r in t.to_pylist()]
    assert [r["uid"] for r in rows] == [f"{i:032x}" for i in list(range(40)) + list(range(100, 123))]
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys) == 63
    assert keys[0] == "00000000000" and keys[25] == "00000100000" and keys[-1] == "00000200012"
    assert tables[0].column_names[0] == "key"

    before = [Path(s).read_bytes() for s in shards]
    again = make_download_shards(list(reversed(uris)), str(tmp_path / "shards"), shard_size=25)
    assert again == shards
    assert [Path(s).read_bytes() for s in again] == before, "a re-run must write byte-identical shards"


def test_regroup_on_s3(s3_root: str, tmp_path: Path) -> None:
    from laion_tasks import storage

    local = write_candidates(tmp_path / "c.parquet", 0, 5)
    uri = storage.join(s3_root, "candidates", "c.parquet")
    storage.write_bytes(uri, Path(local).read_bytes())
    shards = make_download_shards([uri], storage.join(s3_root, "shards"), shard_size=2)
    assert len(shards) == 3 and all(s.startswith("s3://") for s in shards)
    assert storage.list_uris(storage.join(s3_root, "shards"), ".parquet") == shards
