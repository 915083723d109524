"""Download stage split across worker processes: same guarantees as one process.

The rows of a shard go round-robin to ``processes`` workers, each with its own event loop and
decode threads; these tests pin what must not change when they do (order, hash lists,
robots.txt, every row with a status) and what happens when a worker dies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks.hashlists import HashLists
from laion_tasks.stages.download import per_process_config
from tests.download_fixtures import FixtureServer, make_jpeg, redirect
from tests.test_download import read_tar, run_shard, test_config

pytestmark = pytest.mark.timeout(180)


class CrashOnImage:
    """A picklable blocklist whose image check kills its worker process on one image (a stand-in
    for a native crash in a decoder: the worker dies with the bytes in hand)."""

    def __init__(self, poison_md5: str) -> None:
        self.poison_md5 = poison_md5

    def url_blocked(self, url: str) -> bool:
        return False

    def image_blocked(self, data: bytes, sha256: bytes | None = None) -> bool:
        if hashlib.md5(data).hexdigest() == self.poison_md5:
            os._exit(3)
        return False


def test_limits_are_divided_across_workers() -> None:
    config = test_config(max_concurrency=128, max_per_host=16)
    assert per_process_config(config, 1) is config
    split = per_process_config(config, 3)
    assert (split.max_concurrency, split.max_per_host) == (43, 6)  # rounded up
    assert per_process_config(test_config(max_per_host=1), 4).max_per_host == 1


def test_two_workers_keep_order_hash_lists_and_robots(tmp_path: Path) -> None:
    listed_image = make_jpeg(color=(1, 2, 3))
    with FixtureServer() as srv:
        srv.static("/robots.txt", b"User-agent: *\nDisallow: /private/\n", headers={"Content-Type": "text/plain"})
        srv.static("/listed.jpg", make_jpeg())
        srv.static("/listed-image.jpg", listed_image)
        srv.static("/private/a.jpg", make_jpeg())
        srv.static("/404", b"gone", status=404)
        srv.routes["/redirect-to-listed"] = redirect("/listed.jpg")
        good = [srv.static(f"/ok/{i}.jpg", make_jpeg(color=(i * 9 % 255, 40, 90))) for i in range(24)]
        listed_url = srv.url("/listed.jpg")
        lists = HashLists(
            url={"md5": {hashlib.md5(listed_url.encode()).digest()}},
            image={"sha256": {hashlib.sha256(listed_image).digest()}},
        )
        special = {
            "/listed.jpg": "blocked_hashlist",
            "/redirect-to-listed": "blocked_hashlist",
            "/listed-image.jpg": "blocked_hashlist",
            "/private/a.jpg": "opted_out_robots_txt",
            "/404": "http_404",
        }
        paths = good[:6] + list(special) + good[6:]
        expected = ["success"] * 6 + list(special.values()) + ["success"] * 18
        _, tar_uri, parquet_uri, stats = run_shard(
            tmp_path, [srv.url(p) for p in paths], test_config(processes=2, max_concurrency=8), lists
        )
        assert srv.seen("/listed.jpg") == 0, "a hash-listed URL was requested"
        assert srv.seen("/private/a.jpg") == 0, "a robots.txt-disallowed URL was requested"
        assert 1 <= srv.seen("/robots.txt") <= 2, "robots.txt is cached per origin in each worker"
    rows = pq.read_table(parquet_uri).to_pylist()
    assert [r["status"] for r in rows] == expected  # input order, whatever worker did the row
    assert [r["url"] for r in rows] == [srv.url(p) for p in paths]
    assert stats.counts == {"success": 24, "fail:blocked_hashlist": 3, "fail:opted_out_robots_txt": 1, "fail:http_404": 1}
    assert lists.matches == {"url": 2, "image": 1}, "the workers' hash-list matches are counted in the parent"
    samples = read_tar(tar_uri)
    assert set(samples) == {r["key"] for r in rows if r["status"] == "success"}
    assert listed_image not in Path(tar_uri).read_bytes()
    assert stats.extra["bytes_downloaded"] > 0


def test_a_dying_worker_costs_only_the_image_it_held(tmp_path: Path) -> None:
    poison = make_jpeg(color=(7, 7, 7))
    with FixtureServer() as srv:
        good = [srv.static(f"/ok/{i}.jpg", make_jpeg(color=(i * 11 % 255, 60, 20))) for i in range(9)]
        srv.static("/poison.jpg", poison)
        paths = good[:3] + ["/poison.jpg"] + good[3:]
        # one request at a time per worker, so the only row in hand at the crash is the poison
        config = test_config(processes=2, max_concurrency=2, decode_threads=1)
        _, tar_uri, parquet_uri, stats = run_shard(
            tmp_path, [srv.url(p) for p in paths], config, CrashOnImage(hashlib.md5(poison).hexdigest())
        )
    rows = pq.read_table(parquet_uri).to_pylist()
    statuses = [r["status"] for r in rows]
    assert statuses == ["success"] * 3 + ["decode_error"] + ["success"] * 6
    assert "worker process died" in rows[3]["error_message"]
    assert stats.counts == {"success": 9, "fail:decode_error": 1}
    assert set(read_tar(tar_uri)) == {r["key"] for r in rows if r["status"] == "success"}
