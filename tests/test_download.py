"""Download stage against a real HTTP server on loopback (hostile cases + real images)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_tasks.config import DownloadConfig
from laion_tasks.stages.download import (
    download_shard,
    is_retryable,
    parse_retry_after,
    retry_failed,
    x_robots_opt_out,
)
from tests.download_fixtures import (
    HTML_PAGE,
    FixtureServer,
    fail_then_ok,
    gzip_bomb,
    huge_body,
    make_jpeg,
    make_png_bomb,
    redirect,
    slow_body,
    warc_images,
    write_shard,
)

pytestmark = pytest.mark.timeout(180)


def test_config(**overrides: object) -> DownloadConfig:
    base = dict(
        allow_private_networks=True,  # the test server is on loopback; the SSRF tests turn this off
        request_deadline_s=2.0,
        connect_timeout_s=2.0,
        retries=2,
        backoff_base_s=0.05,
        backoff_max_s=2.0,
        processes=1,
        max_concurrency=32,
    )
    base.update(overrides)
    return DownloadConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def run_shard(tmp_path: Path, urls: list[str], config: DownloadConfig, blocklist=None, captions=None):
    shard = write_shard(tmp_path / "000000.parquet", urls, captions)
    tar_uri, parquet_uri = str(tmp_path / "out" / "000000.tar"), str(tmp_path / "out" / "000000.parquet")
    stats = download_shard(shard, tar_uri, parquet_uri, config, blocklist)
    return shard, tar_uri, parquet_uri, stats


# ------------------------------------------------------------------------------------
def test_hostile_cases_each_get_their_status(tmp_path: Path) -> None:
    good = make_jpeg()
    with FixtureServer() as srv:
        srv.static("/robots.txt", b"User-agent: *\nDisallow: /private/\n", headers={"Content-Type": "text/plain"})
        cases: dict[str, str] = {
            srv.static("/ok.jpg", good): "success",
            srv.static("/404", b"gone", status=404): "http_404",
            srv.static("/410", b"gone", status=410): "http_410",
            srv.static("/500", b"boom", status=500): "http_500",
            "/500-then-200": "success",
            "/429-then-200": "success",
            srv.static("/429-forever", b"slow down", status=429, headers={"Retry-After": "3600"}): "http_429",
            "/slow": "timeout",
            "/loop-a": "redirect_loop",
            "/chain/9": "too_many_redirects",
            "/moved": "success",
            srv.static("/noai.jpg", good, headers={"X-Robots-Tag": "noai"}): "opted_out_x_robots_tag",
            srv.static("/ua-noimageai.jpg", good, headers={"X-Robots-Tag": "laion-tasks: noimageai"}): "opted_out_x_robots_tag",
            srv.static("/other-ua.jpg", good, headers={"X-Robots-Tag": "otherbot: noai"}): "success",
            srv.static("/private/secret.jpg", good): "opted_out_robots_txt",
            srv.static("/tdm.jpg", good, headers={"tdm-reservation": "1"}): "opted_out_tdm_reservation",
            srv.static("/truncated.jpg", good[: len(good) // 2]): "decode_error",
            srv.static("/bomb.png", make_png_bomb(), headers={"Content-Type": "image/png"}): "decompression_bomb",
            srv.static("/html.jpg", HTML_PAGE): "not_an_image",
            "/big-announced": "too_large",
            "/big-streamed": "too_large",
            srv.static("/gzip-bomb.jpg", gzip_bomb(30 << 20), headers={"Content-Encoding": "gzip"}): "too_large",
            srv.static("/empty.jpg", b""): "empty_body",
        }
        srv.routes["/500-then-200"] = fail_then_ok(1, 500, good)
        srv.routes["/429-then-200"] = fail_then_ok(1, 429, good, {"Retry-After": "1"})
        srv.routes["/slow"] = slow_body()
        srv.routes["/loop-a"] = redirect("/loop-b")
        srv.routes["/loop-b"] = redirect(srv.url("/loop-a"))
        for i in range(1, 10):
            srv.routes[f"/chain/{i}"] = redirect(f"/chain/{i - 1}")
        srv.routes["/moved"] = redirect("/ok.jpg", 301)
        srv.routes["/big-announced"] = huge_body(50 << 20, announce_length=True)
        srv.routes["/big-streamed"] = huge_body(50 << 20, announce_length=False)

        urls = [srv.url(path) for path in cases] + ["ftp://example.org/a.jpg", "", "http:///nohost.jpg"]
        expected = list(cases.values()) + ["invalid_url"] * 3
        _, tar_uri, parquet_uri, stats = run_shard(tmp_path, urls, test_config(max_redirects=3))
        assert srv.seen("/private/secret.jpg") == 0, "robots.txt disallowed path was fetched"
        assert srv.seen("/robots.txt") == 1, "robots.txt must be fetched once per host and cached"
        assert srv.seen("/500-then-200") == 2 and srv.seen("/429-then-200") == 2

    table = pq.read_table(parquet_uri)
    rows = table.to_pylist()
    assert [r["url"] for r in rows] == urls, "every input row, in input order"
    got = {r["url"]: r["status"] for r in rows}
    assert [got[u] for u in urls] == expected, {u: (got[u], e) for u, e in zip(urls, expected) if got[u] != e}
    for r in rows:
        assert (r["status"] == "success") == (r["error_message"] is None), r
    moved = next(r for r in rows if r["url"].endswith("/moved"))
    assert moved["final_url"].endswith("/ok.jpg")
    assert stats.total == len(urls)
    assert stats.counts["success"] == expected.count("success")
    assert stats.counts["fail:http_404"] == 1 and stats.counts["fail:invalid_url"] == 3
    samples = read_tar(tar_uri)
    assert len(samples) == expected.count("success")
    ok_row = next(r for r in rows if r["url"].endswith("/ok.jpg"))
    assert ok_row["sha256"] == hashlib.sha256(good).hexdigest()
    assert ok_row["original_bytes"] == len(good) and ok_row["mime_type"] == "image/jpeg"
    assert (ok_row["original_width"], ok_row["original_height"], ok_row["width"], ok_row["height"]) == (320, 240, 256, 256)
    sample = samples[ok_row["key"]]
    assert sample["txt"].decode() == ok_row["caption"] == ok_row["alt"]
    assert json.loads(sample["json"])["sha256"] == ok_row["sha256"]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (256, 256)


def test_blocklisted_url_never_requested_and_image_never_stored(tmp_path: Path) -> None:
    listed_image = make_jpeg(color=(1, 2, 3))
    clean = make_jpeg(color=(250, 250, 250))

    class Blocklist:
        def __init__(self, urls: set[str], images: set[str]) -> None:
            self.urls, self.images = urls, images

        def url_blocked(self, url: str) -> bool:
            return hashlib.md5(url.encode()).hexdigest() in self.urls

        def image_blocked(self, data: bytes, sha256: bytes | None = None) -> bool:
            return hashlib.md5(data).hexdigest() in self.images

    with FixtureServer() as srv:
        srv.static("/listed.jpg", clean)
        srv.static("/listed-image.jpg", listed_image)
        srv.static("/clean.jpg", clean)
        srv.routes["/redirect-to-listed"] = redirect("/listed.jpg")
        listed_url = srv.url("/listed.jpg")
        blocklist = Blocklist({hashlib.md5(listed_url.encode()).hexdigest()}, {hashlib.md5(listed_image).hexdigest()})
        urls = [listed_url, srv.url("/redirect-to-listed"), srv.url("/listed-image.jpg"), srv.url("/clean.jpg")]
        _, tar_uri, parquet_uri, stats = run_shard(tmp_path, urls, test_config(), blocklist)
        assert srv.seen("/listed.jpg") == 0, "a hash-listed URL was requested"
    rows = pq.read_table(parquet_uri).to_pylist()
    assert [r["status"] for r in rows] == ["blocked_hashlist"] * 3 + ["success"]
    for r in rows[:3]:
        assert listed_url not in (r["error_message"] or "") and "listed" not in (r["error_message"] or "")
        assert r["sha256"] is None and r["final_url"] is None
    assert stats.counts["fail:blocked_hashlist"] == 3
    tar_bytes = Path(tar_uri).read_bytes()
    assert listed_image not in tar_bytes
    assert set(read_tar(tar_uri)) == {rows[3]["key"]}


def test_retry_failed_redownloads_only_retryable_and_merges(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="laion_tasks.progress")
    good, other = make_jpeg(), make_jpeg(color=(9, 9, 200))
    with FixtureServer() as srv:
        srv.static("/a.jpg", good)
        srv.static("/gone.jpg", b"", status=404)
        srv.routes["/flaky.jpg"] = fail_then_ok(3, 503, other)  # more failures than retries=1 allows
        urls = [srv.url("/a.jpg"), srv.url("/flaky.jpg"), srv.url("/gone.jpg")]
        config = test_config(retries=1)
        shard, tar_uri, parquet_uri, first = run_shard(tmp_path, urls, config)
        assert first.counts == {"success": 1, "fail:http_503": 1, "fail:http_404": 1}
        before_a = srv.seen("/a.jpg")
        stats = retry_failed(shard, tar_uri, parquet_uri, config)
        assert srv.seen("/a.jpg") == before_a, "a successful sample was downloaded again"
        assert srv.seen("/gone.jpg") == 1, "a permanent failure was retried"
    assert stats.counts == {"success": 2, "fail:http_404": 1}
    assert stats.extra["retried"] == 1 and stats.extra["recovered"] == 1
    # the task log's progress lines count every row the workers report back
    progress_lines = [m for m in caplog.messages if m.startswith("download ")]
    assert progress_lines[0].startswith("download 000000: 3/3 rows (100.0%)") and "finished in" in progress_lines[0]
    assert progress_lines[-1].startswith("download retry 000000: 1/1 rows (100.0%)")
    rows = pq.read_table(parquet_uri).to_pylist()
    assert [r["url"] for r in rows] == urls
    assert [r["status"] for r in rows] == ["success", "success", "http_404"]
    samples = read_tar(tar_uri)
    assert set(samples) == {rows[0]["key"], rows[1]["key"]}
    assert json.loads(samples[rows[1]["key"]]["json"])["sha256"] == hashlib.sha256(other).hexdigest()


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    with FixtureServer() as srv:
        for i in range(6):
            srv.static(f"/{i}.jpg", make_jpeg(color=(i * 40, 100, 100)))
        srv.static("/bad", b"x", status=404)
        urls = [srv.url(f"/{i}.jpg") for i in range(6)] + [srv.url("/bad")]
        shard, tar_uri, parquet_uri, first = run_shard(tmp_path, urls, test_config())
        first_parquet = pq.read_table(parquet_uri)
        first_samples = read_tar(tar_uri)
        second = download_shard(shard, tar_uri, parquet_uri, test_config())
    assert first.counts == second.counts == {"success": 6, "fail:http_404": 1}
    assert pq.read_table(parquet_uri).equals(first_parquet)
    assert read_tar(tar_uri) == first_samples


def test_helpers() -> None:
    assert x_robots_opt_out(["noindex, nofollow"], "laion-tasks", ["noai"]) is None
    assert x_robots_opt_out(["NoAI"], "laion-tasks", ["noai"]) == "noai"
    assert x_robots_opt_out(["googlebot: noai"], "laion-tasks", ["noai"]) is None
    assert x_robots_opt_out(["laion-tasks: noimageai, nofollow"], "laion-tasks", ["noimageai"]) == "noimageai"
    assert x_robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"], "laion-tasks", ["noai"]) is None
    assert x_robots_opt_out(["noai"], "laion-tasks", []) is None
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None
    assert is_retryable("http_503") and is_retryable("timeout") and is_retryable("http_429")
    assert not is_retryable("http_404") and not is_retryable("success") and not is_retryable("blocked_ssrf")


# -- real images ---------------------------------------------------------------------
def _real_images(shared: Path) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    for path in sorted((shared / "images" / "imagenet_sample200").glob("*.JPEG"))[:20]:
        files.append((f"/imagenet/{path.name}", path.read_bytes()))
    for path in sorted((shared / "images" / "skimage_clip8").iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            files.append((f"/skimage/{path.name}", path.read_bytes()))
    for warc in ("node-warc_books.toscrape.warc", "aut_IAH-20080430204825-00000-blackbook.warc.gz"):
        seen: set[str] = set()
        for i, (url, body, _ctype) in enumerate(warc_images(shared / "warc" / warc)):
            if url in seen:
                continue
            seen.add(url)
            files.append((f"/warc/{warc.split('_')[0]}/{i}", body))
    return files


def test_real_images_from_shared_data(tmp_path: Path, shared_data: Path) -> None:
    import webdataset as wds

    files = _real_images(shared_data)
    assert len(files) >= 20 + 8 + 20 + 40
    with FixtureServer() as srv:
        for path, body in files:
            srv.static(path, body, headers={"Content-Type": "application/octet-stream"})
        urls = [srv.url(path) for path, _ in files]
        _, tar_uri, parquet_uri, stats = run_shard(tmp_path, urls, test_config(processes=2))
    rows = pq.read_table(parquet_uri).to_pylist()
    failed = [(r["url"], r["status"], r["error_message"]) for r in rows if r["status"] != "success"]
    assert not failed
    assert stats.counts["success"] == len(files)
    for r, (_, body) in zip(rows, files):
        assert r["sha256"] == hashlib.sha256(body).hexdigest()
        assert r["mime_type"] in ("image/jpeg", "image/png", "image/gif")
    # webdataset reads the tar and decodes every image.
    dataset = wds.WebDataset(tar_uri, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    decoded = list(dataset)
    assert len(decoded) == len(files)
    for image, text, meta in decoded:
        assert image.size == (256, 256) and image.mode == "RGB"
        assert text == meta["caption"]


def test_open_clip_training_loader_reads_the_tar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip's own WebDataset pipeline (open_clip_train.data) consumes our shard."""
    import argparse
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    from open_clip_train.data import get_wds_dataset
    from webdataset.tariterators import tar_file_expander

    # webdataset >= 1.0 yields an empty end-of-shard marker that open_clip_train 3.x's
    # group_by_keys_nothrow does not expect (KeyError: 'fname'), whatever the tar holds.
    # The training stage needs the same one-line adaptation.
    monkeypatch.setattr(oc_data, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))

    with FixtureServer() as srv:
        for i in range(8):
            srv.static(f"/{i}.jpg", make_jpeg(200 + i * 10, 150, color=(i * 30, 60, 90)))
        urls = [srv.url(f"/{i}.jpg") for i in range(8)]
        _, tar_uri, _, stats = run_shard(tmp_path, urls, test_config(), captions=[f"a photo number {i}" for i in range(8)])
    assert stats.counts["success"] == 8
    from torchvision import transforms

    preprocess = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    tokenizer = open_clip.get_tokenizer("RN50")
    args = argparse.Namespace(
        train_data=tar_uri, train_data_upsampling_factors=None, train_num_samples=8, val_data=None,
        dataset_resampled=False, batch_size=4, workers=0, world_size=1, seed=0, distributed=False,
        horovod=False, rank=0, local_rank=0,
    )
    data_info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    batches = list(data_info.dataloader)
    assert sum(images.shape[0] for images, _ in batches) == 8
    images, texts = batches[0]
    assert tuple(images.shape[1:]) == (3, 32, 32) and texts.shape[0] == 4


def test_cli_regroup_then_download(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    runner = CliRunner()
    with FixtureServer() as srv:
        srv.static("/a.jpg", make_jpeg())
        srv.routes["/flaky"] = fail_then_ok(5, 503, make_jpeg())
        cand = tmp_path / "candidates"
        cand.mkdir()
        write_shard(cand / "x.parquet", [srv.url("/a.jpg"), srv.url("/flaky"), srv.url("/missing")], with_key=False)
        env = {"LAION_DOWNLOAD__ALLOW_PRIVATE_NETWORKS": "true", "LAION_DOWNLOAD__RETRIES": "0", "LAION_DOWNLOAD__PROCESSES": "1"}
        result = runner.invoke(app, ["regroup", str(cand), "--shards-dir", str(tmp_path / "shards"), "--shard-size", "2"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["shards"] == 2
        shard = str(tmp_path / "shards" / "000000.parquet")
        out = [str(tmp_path / "images" / "000000.tar"), str(tmp_path / "images" / "000000.parquet")]
        result = runner.invoke(app, ["download", shard, *out], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["counts"] == {"success": 1, "fail:http_503": 1}
        env["LAION_DOWNLOAD__RETRIES"] = "5"
        result = runner.invoke(app, ["download", shard, *out, "--retry-failed"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["counts"] == {"success": 2}


def test_sample_tar_writes_the_bytes_webdataset_writes(tmp_path):
    """Our tar writer (no webdataset/torch import in download processes) matches webdataset.TarWriter byte for byte."""
    import io
    import json

    import webdataset

    from laion_tasks.stages.download.shard import TAR_MTIME, SampleTar

    samples = [("000000001", {"jpg": b"\xff\xd8" + bytes(range(256)) * 120, "txt": "caf\u00e9".encode(),
                              "json": json.dumps({"caption": "caf\u00e9", "width": 256}).encode()}),
               ("000000002", {"jpg": b"\xff\xd8", "txt": b"", "json": b"{}"})]
    expected = io.BytesIO()
    with webdataset.TarWriter(expected, mtime=TAR_MTIME) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    with open(tmp_path / "ours.tar", "wb") as handle, SampleTar(handle) as sink:
        for key, members in samples:
            sink.write(key, members)
    assert (tmp_path / "ours.tar").read_bytes() == expected.getvalue()
