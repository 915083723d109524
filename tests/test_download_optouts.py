"""Opt-outs and safety checks of the download stage, each against a real loopback server:
robots.txt (RFC 9309), TDMRep, opt-outs embedded in the image, the per-origin short-circuit,
and PDQ hash lists checked before anything is written."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_tasks.config import DownloadConfig
from laion_tasks.hashlists import HashLists, pdq_hash
from laion_tasks.net.robots import parse_robots, user_agent_token
from laion_tasks.net.tdmrep import parse_tdmrep
from laion_tasks.stages.download import download_shard
from laion_tasks.stages.download.optout import c2pa_training_refusal, embedded_opt_out, plus_data_mining
from tests.download_fixtures import FixtureServer, make_jpeg, send, write_shard

pytestmark = pytest.mark.timeout(180)
TOKEN = "laion-tasks"


def config(**overrides: object) -> DownloadConfig:
    base = dict(allow_private_networks=True, request_deadline_s=5.0, retries=0, processes=1, max_concurrency=16)
    base.update(overrides)
    return DownloadConfig(**base)


def run(tmp_path: Path, urls: list[str], cfg: DownloadConfig | None = None, blocklist=None, name: str = "000000"):  # type: ignore[no-untyped-def]
    shard = write_shard(tmp_path / f"{name}-in.parquet", urls)
    tar, parquet = str(tmp_path / f"{name}.tar"), str(tmp_path / f"{name}.parquet")
    stats = download_shard(shard, tar, parquet, cfg or config(), blocklist)
    rows = pq.read_table(parquet).to_pylist()
    return {r["url"]: r for r in rows}, tar, stats


def tar_keys(tar: str) -> set[str]:
    with tarfile.open(tar) as t:
        return {m.name.split(".", 1)[0] for m in t}


# -- robots.txt ---------------------------------------------------------------------------------
def test_default_user_agent_carries_our_token_and_a_contact_url() -> None:
    ua = DownloadConfig().user_agent
    assert user_agent_token(ua) == TOKEN
    assert "+https://" in ua


def test_robots_txt_in_two_tcp_segments_is_read_whole(tmp_path: Path) -> None:
    first = b"User-agent: *\n# " + b"x" * 3000 + b"\n"
    second = b"Disallow: /private/\n"

    def robots(h) -> None:  # type: ignore[no-untyped-def]
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(first) + len(second)))
        h.end_headers()
        h.wfile.write(first)
        h.wfile.flush()
        time.sleep(0.3)  # the rule arrives in a later segment
        h.wfile.write(second)

    with FixtureServer() as srv:
        srv.routes["/robots.txt"] = robots
        srv.static("/private/x.jpg", make_jpeg())
        srv.static("/ok.jpg", make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url("/private/x.jpg"), srv.url("/ok.jpg")])
        assert srv.seen("/private/x.jpg") == 0
    assert rows[srv.url("/private/x.jpg")]["status"] == "opted_out_robots_txt"
    assert rows[srv.url("/ok.jpg")]["status"] == "success"


def test_robots_wildcards_dollar_longest_match_and_our_group(tmp_path: Path) -> None:
    robots = (
        b"User-agent: *\nDisallow: /\n\n"
        b"User-agent: laion-tasks\nDisallow: /*.jpg$\nAllow: /keep/*.jpg$\nDisallow: /tmp\nAllow: /tmp/ok\n"
    )
    expected = {
        "/a/b.jpg": "opted_out_robots_txt",  # * and $
        "/a/b.jpg?size=2": "success",  # $ anchors the end: the query makes it not match
        "/keep/c.jpg": "success",  # the longer Allow wins
        "/a/b.png": "success",  # our group applies, not "*"
        "/tmp/x.png": "opted_out_robots_txt",
        "/tmp/ok.png": "success",
    }
    with FixtureServer() as srv:
        srv.static("/robots.txt", robots, headers={"Content-Type": "text/plain"})
        for path in expected:
            srv.static(path.split("?")[0], make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url(p) for p in expected])
        assert srv.seen("/a/b.jpg") == 0 and srv.seen("/a/b.jpg?size=2") == 1
    assert {p: rows[srv.url(p)]["status"] for p in expected} == expected


@pytest.mark.parametrize(("code", "status"), [(401, "success"), (403, "success"), (404, "success"), (503, "robots_txt_unavailable")])
def test_robots_txt_errors_per_rfc_9309(tmp_path: Path, code: int, status: str) -> None:
    """4xx (401 and 403 too): no rules. 5xx: everything disallowed, and no image is requested."""
    with FixtureServer() as srv:
        srv.static("/robots.txt", b"nope", status=code)
        paths = [f"/img{i}.jpg" for i in range(5)]
        for path in paths:
            srv.static(path, make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url(p) for p in paths])
        assert srv.seen("/robots.txt") == 1
        requested = sum(srv.seen(p) for p in paths)
    assert {r["status"] for r in rows.values()} == {status}
    assert requested == (len(paths) if status == "success" else 0)


def test_an_origin_that_opts_out_host_wide_is_not_asked_again(tmp_path: Path) -> None:
    with FixtureServer() as srv:
        srv.static("/robots.txt", b"User-agent: laion-tasks\nDisallow: /\n\nUser-agent: *\nAllow: /\n")
        paths = [f"/p{i}/img.jpg" for i in range(30)]
        for path in paths:
            srv.static(path, make_jpeg())
        urls = [srv.url(p) for p in paths]
        rows, _, stats = run(tmp_path, urls, config(max_concurrency=2))
        assert srv.requests == ["/robots.txt"], "after a host-wide opt-out nothing else may be requested"
    assert stats.counts == {"fail:opted_out_robots_txt": len(urls)}
    assert any("not requested" in (r["error_message"] or "") for r in rows.values())
    rules = parse_robots(b"User-agent: laion-tasks\nDisallow: /\nAllow: /public/\n")
    assert not rules.disallows_everything(TOKEN), "an Allow leaves part of the origin open"
    assert parse_robots(b"User-agent: *\nDisallow: /\n").disallows_everything(TOKEN)


# -- TDMRep ---------------------------------------------------------------------------------------
def test_tdmrep_json_path_patterns(tmp_path: Path) -> None:
    tdmrep = [
        {"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy.json"},
        {"location": "/*.png$", "tdm-reservation": 1},
        {"location": "/", "tdm-reservation": 0},
    ]
    expected = {
        "/reserved/a.jpg": "opted_out_tdm_reservation",
        "/x/y.png": "opted_out_tdm_reservation",
        "/x/y.png?v=2": "success",  # $ ends the pattern; the first matching rule is "/" (not reserved)
        "/free/b.jpg": "success",
    }
    with FixtureServer() as srv:
        srv.static("/.well-known/tdmrep.json", json.dumps(tdmrep).encode(), headers={"Content-Type": "application/json"})
        for path in expected:
            srv.static(path.split("?")[0], make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url(p) for p in expected])
        assert srv.seen("/reserved/a.jpg") == 0
        assert srv.seen("/.well-known/tdmrep.json") == 1
    assert {p: rows[srv.url(p)]["status"] for p in expected} == expected
    assert "policy.json" in rows[srv.url("/reserved/a.jpg")]["error_message"]


def test_tdmrep_reserving_everything_short_circuits_the_origin(tmp_path: Path) -> None:
    with FixtureServer() as srv:
        srv.static("/.well-known/tdmrep.json", b'[{"location": "/*", "tdm-reservation": 1}]')
        paths = [f"/i{i}.jpg" for i in range(10)]
        for path in paths:
            srv.static(path, make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url(p) for p in paths], config(max_concurrency=1))
        assert sum(srv.seen(p) for p in paths) == 0
    assert {r["status"] for r in rows.values()} == {"opted_out_tdm_reservation"}
    assert parse_tdmrep(b"not json").rules == () and parse_tdmrep(b"{}").rules == ()


# -- opt-outs embedded in the image --------------------------------------------------------------
def jpeg_with_app(payload_segments: list[tuple[int, bytes]], jpeg: bytes | None = None) -> bytes:
    jpeg = jpeg or make_jpeg()
    segments = b"".join(b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body for marker, body in payload_segments)
    return jpeg[:2] + segments + jpeg[2:]


def xmp_jpeg(value: str, element_form: bool = False) -> bytes:
    prop = (
        f"<plus:DataMining rdf:resource='http://ns.useplus.org/ldf/vocab/{value}'/>"
        if element_form
        else ""
    )
    attr = "" if element_form else f' plus:DataMining="http://ns.useplus.org/ldf/vocab/{value}"'
    xmp = (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/"{attr}>{prop}</rdf:Description>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return jpeg_with_app([(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp.encode())])


def c2pa_jpeg(entries: dict[str, dict[str, str]], label: str = "c2pa.training-mining") -> bytes:
    """A JPEG with a C2PA manifest store in APP11 JUMBF, split over two segments."""
    import cbor2

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload) + 8) + kind + payload

    cbor_uuid = bytes.fromhex("63626f72001100108000 00aa00389b71".replace(" ", ""))
    assertion = box(b"jumb", box(b"jumd", cbor_uuid + b"\x03" + label.encode() + b"\x00") + box(b"cbor", cbor2.dumps({"entries": entries})))
    store = box(b"jumb", box(b"jumd", b"\x00" * 16 + b"\x03c2pa\x00") + assertion)
    half = len(store) // 2
    header = store[:8]
    seg1 = b"JP" + struct.pack(">HI", 1, 1) + store[:half]
    seg2 = b"JP" + struct.pack(">HI", 1, 2) + header + store[half:]
    return jpeg_with_app([(0xEB, seg1), (0xEB, seg2)])


def test_image_metadata_parsers() -> None:
    assert plus_data_mining(xmp_jpeg("DMI-PROHIBITED-AIMLTRAINING")) == ["DMI-PROHIBITED-AIMLTRAINING"]
    assert plus_data_mining(xmp_jpeg("DMI-PROHIBITED", element_form=True)) == ["DMI-PROHIBITED"]
    values = DownloadConfig().embedded_optout_dmi_values
    assert embedded_opt_out(xmp_jpeg("DMI-ALLOWED"), values) is None
    assert embedded_opt_out(make_jpeg(), values) is None
    refusal = c2pa_training_refusal(c2pa_jpeg({"c2pa.ai_training": {"use": "notAllowed"}, "c2pa.ai_inference": {"use": "allowed"}}))
    assert refusal == "c2pa.training-mining: c2pa.ai_training notAllowed"
    assert c2pa_training_refusal(c2pa_jpeg({"cawg.data_mining": {"use": "constrained"}}, "cawg.training-mining"))
    assert c2pa_training_refusal(c2pa_jpeg({"c2pa.ai_training": {"use": "allowed"}})) is None


def test_a_jpeg_whose_xmp_prohibits_data_mining_is_never_stored(tmp_path: Path) -> None:
    refused = xmp_jpeg("DMI-PROHIBITED-AIMLTRAINING")
    with FixtureServer() as srv:
        cases = {
            srv.static("/xmp-no.jpg", refused): "opted_out_embedded_metadata",
            srv.static("/xmp-no-element.jpg", xmp_jpeg("DMI-PROHIBITED", element_form=True)): "opted_out_embedded_metadata",
            srv.static("/c2pa-no.jpg", c2pa_jpeg({"c2pa.ai_generative_training": {"use": "notAllowed"}})): "opted_out_embedded_metadata",
            srv.static("/xmp-yes.jpg", xmp_jpeg("DMI-ALLOWED")): "success",
            srv.static("/plain.jpg", make_jpeg()): "success",
        }
        urls = [srv.url(p) for p in cases]
        rows, tar, stats = run(tmp_path, urls)
        off, _, _ = run(tmp_path, urls, config(respect_embedded_optouts=False), name="000001")
    assert {p: rows[srv.url(p)]["status"] for p in cases} == cases
    assert "DMI-PROHIBITED-AIMLTRAINING" in rows[srv.url("/xmp-no.jpg")]["error_message"]
    for path, status in cases.items():
        row = rows[srv.url(path)]
        if status != "success":
            assert row["sha256"] is None and row["width"] is None
    assert tar_keys(tar) == {rows[srv.url(p)]["key"] for p, s in cases.items() if s == "success"}
    assert refused[-2000:] not in Path(tar).read_bytes()
    assert stats.counts["fail:opted_out_embedded_metadata"] == 3
    assert {r["status"] for r in off.values()} == {"success"}  # the switch turns the check off


# -- PDQ hash lists before any write --------------------------------------------------------------
def test_a_pdq_near_image_is_in_no_tar_parquet_or_embedding(tmp_path: Path) -> None:
    from tests.clip_fixtures import synthetic_image

    from PIL import ImageEnhance

    listed = synthetic_image(7, (400, 300))
    buf = io.BytesIO()  # the listed picture, brighter, smaller and re-encoded: only PDQ can catch it
    ImageEnhance.Brightness(listed).enhance(1.2).resize((300, 225)).save(buf, "JPEG", quality=70)
    served = buf.getvalue()
    clean_buf = io.BytesIO()
    synthetic_image(99, (400, 300)).save(clean_buf, "JPEG", quality=90)
    listed_hash, _ = pdq_hash(listed)
    distance = int(np.unpackbits(np.bitwise_xor(
        np.frombuffer(listed_hash, np.uint8), np.frombuffer(pdq_hash(Image.open(io.BytesIO(served)))[0], np.uint8)
    )).sum())  # fmt: skip
    assert 0 < distance <= 31, distance
    lists = HashLists(pdq_max_distance=31)
    lists.set_pdq({listed_hash})
    lists.image = {"sha256": {hashlib.sha256(b"something else").digest()}}  # exact digests do not match

    with FixtureServer() as srv:
        urls = [srv.url(srv.static("/near.jpg", served)), srv.url(srv.static("/clean.jpg", clean_buf.getvalue()))]
        rows, tar, stats = run(tmp_path, urls, config(processes=2), lists)
    near_row, clean_row = rows[urls[0]], rows[urls[1]]
    assert near_row["status"] == "blocked_hashlist" and clean_row["status"] == "success"
    assert near_row["sha256"] is None and near_row["original_width"] is None and near_row["final_url"] is None
    assert tar_keys(tar) == {clean_row["key"]}
    assert stats.counts["fail:blocked_hashlist"] == 1 and lists.matches["pdq"] == 1

    # Nothing downstream can embed it: the CLIP stage reads only the tar.
    from laion_tasks.config import ClipConfig, ClipModelConfig
    from laion_tasks.stages.clip_score import clip_score_shard

    clip_cfg = ClipConfig(
        english=ClipModelConfig(model="laion-tiny-clip", pretrained=None, threshold=0.0),
        use_multilingual=False, num_workers=1, batch_size=4, device="cpu",
    )  # fmt: skip
    out = tmp_path / "clip.parquet"
    clip_score_shard(str(tmp_path / "000000.parquet"), tar, str(out), str(tmp_path / "c.img.npy"), str(tmp_path / "c.txt.npy"), clip_cfg)
    clip_rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    embeddings = np.load(tmp_path / "c.img.npy")
    assert clip_rows[near_row["key"]]["clip_status"] == "no_image" and not clip_rows[near_row["key"]]["has_embedding"]
    assert int(np.count_nonzero(np.abs(embeddings).sum(axis=1))) == 1  # only the clean image has an embedding


def test_origin_cache_shares_one_load_and_reloads_after_its_ttl() -> None:
    import asyncio

    from laion_tasks.net.origin_cache import OriginCache

    loads: list[str] = []

    async def load(origin: str) -> int:
        loads.append(origin)
        await asyncio.sleep(0)
        return len(loads)

    async def scenario() -> tuple[list[int], int]:
        kept = OriginCache(load, ttl_s=3600)
        shared = await asyncio.gather(*(kept.get("http://a") for _ in range(5)))
        expiring = OriginCache(load, ttl_s=-1)  # every entry is already stale once loaded
        await expiring.get("http://b")
        return shared, await expiring.get("http://b")

    shared, reloaded = asyncio.run(scenario())
    assert shared == [1] * 5 and loads == ["http://a", "http://b", "http://b"] and reloaded == 3
