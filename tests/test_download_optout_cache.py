"""robots.txt and tdmrep.json are asked once per origin per task: across the task's shards and its
download worker processes, for the TTL; a transient failure is asked again sooner.

Through the real stage (``runner.run_batch`` on a batch of shards, worker subprocesses) against
loopback servers that count every request."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pickle
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks import layout, runner
from laion_tasks.config import DownloadConfig, Settings, StorageConfig
from laion_tasks.net.origin_cache import TRANSIENT_TTL_S, SharedOriginStore
from laion_tasks.stages.download import download_shard
from tests.download_fixtures import FixtureServer, make_jpeg, write_shard

pytestmark = pytest.mark.timeout(240)
ROBOTS, TDMREP = "/robots.txt", "/.well-known/tdmrep.json"


def serve_origin(srv: FixtureServer, images: int) -> list[str]:
    """An origin whose robots.txt disallows /private/ and whose tdmrep.json reserves /r/; its image paths."""
    srv.static(ROBOTS, b"User-agent: *\nDisallow: /private/\n", headers={"Content-Type": "text/plain"})
    srv.static(TDMREP, b'[{"location": "/r/", "tdm-reservation": 1}]', headers={"Content-Type": "application/json"})
    paths = []
    for i in range(images):
        path = ("/private", "/r", "/ok")[i % 3] + f"/{i}.jpg"
        srv.static(path, make_jpeg())
        paths.append(path)
    return paths


EXPECTED = {"/private": "opted_out_robots_txt", "/r/": "opted_out_tdm_reservation", "/ok/": "success"}


def expected_status(url: str) -> str:
    return next(status for prefix, status in EXPECTED.items() if f"{prefix}" in url)


def test_a_task_asks_each_origin_once_across_its_shards_and_workers(tmp_path: Path) -> None:
    shards, workers = 3, 3
    settings = Settings(
        storage=StorageConfig(root=str(tmp_path / "data")),
        download=DownloadConfig(allow_private_networks=True, processes=workers, retries=0, request_deadline_s=10.0,
                                max_concurrency=12),
    )  # fmt: skip
    snapshot = "snap"
    root = settings.storage.root
    with FixtureServer() as a, FixtureServer() as b:  # two ports: two origins
        urls = [a.url(p) for p in serve_origin(a, 12)] + [b.url(p) for p in serve_origin(b, 12)]
        ids = [f"{n:06d}" for n in range(shards)]
        os.makedirs(os.path.dirname(layout.shards_manifest_uri(root, snapshot)), exist_ok=True)
        for n, shard in enumerate(ids):  # every origin appears in every shard, and in every worker's share
            write_shard(Path(layout.shard_input_uri(root, snapshot, shard)), urls[n::shards] + urls[(n + 1) % shards :: shards])
        Path(layout.shards_manifest_uri(root, snapshot)).write_text(
            json.dumps({"shard_size": len(urls), "candidates": {}, "shards": {s: f"sum{s}" for s in ids}})
        )
        ctx = runner.open_context(settings, snapshot, lineage=False)
        try:
            report = runner.run_batch(ctx, "download", {"start": 0, "stop": None}, details=True)
            store = ctx.resource("origin_store", lambda: None)
            assert isinstance(store, SharedOriginStore) and os.path.isdir(store.root)
        finally:
            ctx.close()
        asked = {name: (srv.seen(ROBOTS), srv.seen(TDMREP)) for name, srv in (("a", a), ("b", b))}
        images_fetched = sum(srv.seen(p) for srv in (a, b) for p in srv.routes if p.startswith("/ok/"))
    assert report["done"] == shards
    assert asked == {"a": (1, 1), "b": (1, 1)}, f"{shards} shards x {workers} workers must ask each origin once: {asked}"
    assert not os.path.exists(store.root), "the task's store is removed when the task ends"
    statuses = {}
    for shard in ids:
        for row in pq.read_table(layout.images_parquet_uri(root, snapshot, shard)).to_pylist():
            statuses[row["url"] + "#" + shard] = (row["status"], expected_status(row["url"]))
    assert len(statuses) == 2 * len(urls) and all(got == want for got, want in statuses.values()), statuses
    assert images_fetched == 2 * 8  # each /ok/ image is in two shards; nothing refused was requested


def test_answers_expire_after_the_ttl(tmp_path: Path) -> None:
    """A TTL of 0: every URL asks again, across shards too (the store keeps nothing past its expiry)."""
    cfg = DownloadConfig(allow_private_networks=True, processes=1, retries=0, request_deadline_s=10.0, max_concurrency=1,
                         opt_out_cache_ttl_s=0.0)  # fmt: skip
    store = SharedOriginStore.create(str(tmp_path))
    try:
        with FixtureServer() as srv:
            paths = [p for p in serve_origin(srv, 9) if p.startswith("/ok/")]
            for n in range(2):
                shard = write_shard(tmp_path / f"in{n}.parquet", [srv.url(p) for p in paths])
                download_shard(shard, str(tmp_path / f"{n}.tar"), str(tmp_path / f"{n}.parquet"), cfg, None, store)
            asked = srv.seen(ROBOTS), srv.seen(TDMREP)
    finally:
        store.close()
    assert asked == (2 * len(paths), 2 * len(paths))  # one URL at a time, each finding the last answer expired


def test_a_transient_failure_is_kept_shorter_than_an_answer(tmp_path: Path) -> None:
    """robots.txt 503 / tdmrep.json 503: asked again after TRANSIENT_TTL_S at most; a 200 is kept the full TTL."""
    import aiohttp

    from laion_tasks.net.robots import RobotsCache
    from laion_tasks.net.tdmrep import TdmRepCache

    ttl = 86_400.0

    async def ask(store: SharedOriginStore, origin: str) -> None:
        async with aiohttp.ClientSession() as session:
            robots = RobotsCache(session, lambda url: None, 5.0, ttl, lambda exc: ("connection_error", str(exc)), store)
            tdm = TdmRepCache(session, lambda url: None, 5.0, ttl, store)
            await robots.rules(origin + "/x.jpg")
            await tdm.rules(origin + "/x.jpg")

    def lifetimes(store: SharedOriginStore) -> dict[str, float]:
        out = {}
        for name in os.listdir(store.root):
            if name.endswith(".json.z"):
                entry = json.loads(zlib.decompress(Path(store.root, name).read_bytes()))
                out[name.split("-", 1)[0]] = round(entry["expires_at"] - entry["fetched_at"])
        return out

    with FixtureServer() as failing, FixtureServer() as fine:
        failing.static(ROBOTS, b"busy", status=503)
        failing.static(TDMREP, b"busy", status=503)
        serve_origin(fine, 0)
        seen = {}
        for name, srv in (("failing", failing), ("fine", fine)):
            store = SharedOriginStore.create(str(tmp_path))
            try:
                asyncio.run(ask(store, srv.url("")))
                seen[name] = lifetimes(store)
            finally:
                store.close()
    assert seen["failing"] == {"robots": TRANSIENT_TTL_S, "tdmrep": TRANSIENT_TTL_S}
    assert seen["fine"] == {"robots": ttl, "tdmrep": ttl}


def test_a_stuck_lock_holder_is_not_waited_for_forever(tmp_path: Path) -> None:
    """Another process holds an origin's lock past the wait: this one fetches for itself and still answers."""
    store = SharedOriginStore.create(str(tmp_path))
    fetches: list[str] = []

    async def fetch() -> tuple[dict, float]:
        fetches.append("x")
        return {"body": "User-agent: *\nDisallow: /\n"}, 60.0

    lock = os.open(store._path("robots", "http://h") + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held through a different open file: a different holder
        record, expires_at = asyncio.run(store.get("robots", "http://h", fetch, lock_wait_s=0.2))
        assert record["body"].startswith("User-agent") and fetches == ["x"]
        again, _ = asyncio.run(store.get("robots", "http://h", fetch, lock_wait_s=0.2))
        assert again == record and fetches == ["x"], "the stored answer is reused while fresh"
    finally:
        os.close(lock)
        store.close()


def test_a_store_nobody_closes_is_removed_with_its_owner(tmp_path: Path) -> None:
    import gc

    store = SharedOriginStore.create(str(tmp_path))
    root = store.root
    assert pickle.loads(pickle.dumps(store)).root == root  # what a worker process gets: the path
    assert os.path.isdir(root)
    del store
    gc.collect()
    assert not os.path.exists(root)
