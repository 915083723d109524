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
from tests.download_fixtures import FixtureServer, make_jpeg, redirect, write_shard

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


def test_robots_txt_with_a_utf8_byte_order_mark_keeps_its_rules(tmp_path: Path) -> None:
    """A BOM glued to the first ``User-agent`` line must not turn the file into "no rules"."""
    with FixtureServer() as srv:
        srv.static("/robots.txt", b"\xef\xbb\xbfUser-agent: *\nDisallow: /private/\n", headers={"Content-Type": "text/plain"})
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
    """TDMRep final report, "TDM File on the Origin Server": ``location`` matches the path of a file (the
    query names no other file), the first matching rule decides, escapes of unreserved characters compare
    decoded, and a ``$`` meant literally is written ``%24``."""
    tdmrep = [
        {"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy.json"},
        {"location": "/*.png$", "tdm-reservation": 1},
        {"location": "/~user/", "tdm-reservation": 1},
        {"location": "/price/foo-%24", "tdm-reservation": 1},
        {"location": "/search?private=*", "tdm-reservation": 1},
        {"location": "/", "tdm-reservation": 0},
    ]
    expected = {
        "/reserved/a.jpg": "opted_out_tdm_reservation",
        "/x/y.png": "opted_out_tdm_reservation",
        "/x/y.png?v=2": "opted_out_tdm_reservation",  # the same file: a query does not escape "/*.png$"
        "/x/y.png.jpg": "success",  # $ ends the pattern
        "/%7Euser/a.jpg": "opted_out_tdm_reservation",  # %7E is "~" (unreserved): compared decoded
        "/price/foo-$": "opted_out_tdm_reservation",  # "%24" in the pattern is a literal "$"
        "/search?private=1": "opted_out_tdm_reservation",  # a pattern with "?" is matched with the query
        "/search?public=1": "success",
        "/Reserved/a.jpg": "success",  # case sensitive, as the report says it should be
        "/free/b.jpg": "success",
    }
    with FixtureServer() as srv:
        srv.static("/.well-known/tdmrep.json", json.dumps(tdmrep).encode(), headers={"Content-Type": "application/json"})
        for path in expected:
            srv.static(path.split("?")[0], make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url(p) for p in expected])
        assert srv.seen("/reserved/a.jpg") == 0 and srv.seen("/x/y.png?v=2") == 0
        assert srv.seen("/.well-known/tdmrep.json") == 1
    assert {p: rows[srv.url(p)]["status"] for p in expected} == expected
    assert "policy.json" in rows[srv.url("/reserved/a.jpg")]["error_message"]


def test_tdmrep_json_behind_a_redirect_is_honoured(tmp_path: Path) -> None:
    """The report lets the origin answer with "a sequence of redirects" to the file."""
    with FixtureServer() as srv:
        srv.routes["/.well-known/tdmrep.json"] = redirect("/policies/tdm.json", 301)
        srv.static("/policies/tdm.json", b'[{"location": "/r/", "tdm-reservation": 1}]', headers={"Content-Type": "application/json"})
        srv.static("/r/a.jpg", make_jpeg())
        srv.static("/ok.jpg", make_jpeg())
        rows, _, _ = run(tmp_path, [srv.url("/r/a.jpg"), srv.url("/ok.jpg")])
        assert srv.seen("/r/a.jpg") == 0 and srv.seen("/policies/tdm.json") == 1
    assert rows[srv.url("/r/a.jpg")]["status"] == "opted_out_tdm_reservation"
    assert rows[srv.url("/ok.jpg")]["status"] == "success"


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


XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"


def xmp_packet(value: str, element_form: bool = False, default_ns: bool = False) -> str:
    """An XMP packet whose ``plus:DataMining`` is ``value`` (attribute, element, or PLUS as the default namespace)."""
    vocab = f"http://ns.useplus.org/ldf/vocab/{value}"
    if default_ns:
        attr, prop = "", f"<DataMining xmlns='http://ns.useplus.org/ldf/xmp/1.0/' rdf:resource='{vocab}'/>"
    elif element_form:
        attr, prop = "", f"<plus:DataMining rdf:resource='{vocab}'/>"
    else:
        attr, prop = f' plus:DataMining="{vocab}"', ""
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/"{attr}>{prop}</rdf:Description>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )


def xmp_jpeg(value: str, element_form: bool = False, jpeg: bytes | None = None) -> bytes:
    return jpeg_with_app([(0xE1, XMP_APP1 + xmp_packet(value, element_form).encode())], jpeg)


def solid_jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), color).save(out, "JPEG", quality=95)
    return out.getvalue()


def png_with_text(chunks: list[tuple[str, str, str]]) -> bytes:
    """A PNG with text chunks (kind, keyword, text): kind ``itxt-z`` (compressed iTXt), ``ztxt`` or ``text``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for kind, keyword, text in chunks:
        if kind == "itxt-z":
            info.add_itxt(keyword, text, zip=True)
        else:
            info.add_text(keyword, text, zip=kind == "ztxt")
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def raw_profile(xmp: str) -> str:
    """ImageMagick's ``Raw profile type xmp`` text: name, length, then the bytes in hex lines."""
    hexed = xmp.encode().hex()
    return "\nxmp\n" + f"{len(xmp.encode()):8d}\n" + "\n".join(hexed[i : i + 72] for i in range(0, len(hexed), 72)) + "\n"


def extended_xmp_jpeg(value: str) -> bytes:
    """A JPEG whose XMP is too large for one APP1 segment: the main packet points to an extended packet,
    cut into two APP1 extension segments, the cut falling inside the DataMining value."""
    extended = xmp_packet(value).encode()
    guid = hashlib.md5(extended).hexdigest().upper().encode()
    main = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmpNote="http://ns.adobe.com/xmp/note/" '
        f'xmpNote:HasExtendedXMP="{guid.decode()}"/></rdf:RDF></x:xmpmeta>'
    )
    cut = extended.index(b"DMI-") + 5
    signature = b"http://ns.adobe.com/xmp/extension/\x00"
    parts = [(0, extended[:cut]), (cut, extended[cut:])]
    segments = [(0xE1, XMP_APP1 + main.encode())]
    segments += [(0xE1, signature + guid + struct.pack(">II", len(extended), off) + chunk) for off, chunk in reversed(parts)]
    return jpeg_with_app(segments)


def c2pa_jpeg(entries: dict[str, dict[str, str]], label: str = "c2pa.training-mining", jpeg: bytes | None = None) -> bytes:
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
    return jpeg_with_app([(0xEB, seg1), (0xEB, seg2)], jpeg)


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
    # Every DMI-PROHIBITED* value refuses, listed or not; a listed value refuses too; any case.
    assert embedded_opt_out(xmp_jpeg("DMI-PROHIBITED-SEELINKEDRIGHTSEXPR"), []) is not None
    assert embedded_opt_out(xmp_jpeg("dmi-unspecified"), ["DMI-UNSPECIFIED"]) is not None
    assert embedded_opt_out(xmp_jpeg("DMI-UNSPECIFIED"), values) is None


MAGENTA, BLUE = (255, 0, 255), (0, 0, 255)


def tar_colours(tar: str) -> list[tuple[int, int, int]]:
    """The centre pixel of every image in a tar (thumbnails are padded with white: the centre is the picture)."""
    colours = []
    with tarfile.open(tar) as t:
        for member in t:
            if member.name.endswith((".jpg", ".webp")):
                with Image.open(t.extractfile(member)) as img:
                    rgb = img.convert("RGB")
                    colours.append(rgb.getpixel((rgb.width // 2, rgb.height // 2)))
    return colours


def near(colour: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
    return max(abs(a - b) for a, b in zip(colour, target)) <= 24


def test_a_jpeg_whose_metadata_prohibits_data_mining_is_never_stored(tmp_path: Path) -> None:
    """Every refused picture is magenta, every allowed one blue: no magenta pixel may reach the tar, and with
    the check off all three do (so the check below can see them)."""
    refused = solid_jpeg(MAGENTA)
    allowed = solid_jpeg(BLUE)
    with FixtureServer() as srv:
        cases = {
            srv.static("/xmp-no.jpg", xmp_jpeg("DMI-PROHIBITED-AIMLTRAINING", jpeg=refused)): "opted_out_embedded_metadata",
            srv.static("/xmp-no-element.jpg", xmp_jpeg("DMI-PROHIBITED", True, refused)): "opted_out_embedded_metadata",
            srv.static("/c2pa-no.jpg", c2pa_jpeg({"c2pa.ai_generative_training": {"use": "notAllowed"}}, jpeg=refused)):
                "opted_out_embedded_metadata",
            srv.static("/xmp-yes.jpg", xmp_jpeg("DMI-ALLOWED", jpeg=allowed)): "success",
            srv.static("/plain.jpg", allowed): "success",
        }  # fmt: skip
        urls = [srv.url(p) for p in cases]
        rows, tar, stats = run(tmp_path, urls)
        off, off_tar, _ = run(tmp_path, urls, config(respect_embedded_optouts=False), name="000001")
    assert {p: rows[srv.url(p)]["status"] for p in cases} == cases
    assert "DMI-PROHIBITED-AIMLTRAINING" in rows[srv.url("/xmp-no.jpg")]["error_message"]
    for path, status in cases.items():
        row = rows[srv.url(path)]
        if status != "success":
            assert row["sha256"] is None and row["width"] is None and row["original_bytes"] is None
            assert row["mime_type"] is None and row["original_width"] is None
    assert tar_keys(tar) == {rows[srv.url(p)]["key"] for p, s in cases.items() if s == "success"}
    colours = tar_colours(tar)
    assert len(colours) == 2 and all(near(c, BLUE) for c in colours)
    assert stats.counts["fail:opted_out_embedded_metadata"] == 3
    assert {r["status"] for r in off.values()} == {"success"}  # the switch turns the check off...
    assert sum(near(c, MAGENTA) for c in tar_colours(off_tar)) == 3  # ...and then the refused pictures are seen


def test_every_dmi_prohibited_value_in_any_case_is_refused(tmp_path: Path) -> None:
    """Default config: DMI-PROHIBITED-SEELINKEDRIGHTSEXPR, a future DMI-PROHIBITED-* value and lower-case
    spellings refuse; other values do not."""
    with FixtureServer() as srv:
        cases = {
            srv.static("/linked.jpg", xmp_jpeg("DMI-PROHIBITED-SEELINKEDRIGHTSEXPR")): "opted_out_embedded_metadata",
            srv.static("/lower.jpg", xmp_jpeg("dmi-prohibited-aimltraining")): "opted_out_embedded_metadata",
            srv.static("/future.jpg", xmp_jpeg("Dmi-Prohibited-SomethingNew", element_form=True)): "opted_out_embedded_metadata",
            srv.static("/c2pa-case.jpg", c2pa_jpeg({"C2PA.AI_Training": {"use": "NOTALLOWED"}}, "C2PA.Training-Mining")):
                "opted_out_embedded_metadata",
            srv.static("/allowed.jpg", xmp_jpeg("dmi-allowed")): "success",
            srv.static("/unspecified.jpg", xmp_jpeg("DMI-UNSPECIFIED")): "success",
        }  # fmt: skip
        rows, _, _ = run(tmp_path, [srv.url(p) for p in cases])
    assert {p: rows[srv.url(p)]["status"] for p in cases} == cases
    assert "DMI-PROHIBITED-SEELINKEDRIGHTSEXPR" in rows[srv.url("/linked.jpg")]["error_message"]


def test_every_xmp_packet_is_read_past_a_decoy(tmp_path: Path) -> None:
    decoy = (0xFE, b"Licence terms: http://ns.useplus.org/ldf/xmp/1.0/ (see our site)")  # a JPEG comment, no packet
    refusing = (0xE1, XMP_APP1 + xmp_packet("DMI-PROHIBITED-GENAIMLTRAINING").encode())
    with FixtureServer() as srv:
        cases = {
            srv.static("/decoy-then-packet.jpg", jpeg_with_app([decoy, refusing])): "opted_out_embedded_metadata",
            srv.static("/second-packet.jpg", jpeg_with_app([(0xE1, XMP_APP1 + xmp_packet("DMI-ALLOWED").encode()), refusing])):
                "opted_out_embedded_metadata",
            srv.static("/extended.jpg", extended_xmp_jpeg("DMI-PROHIBITED-AIMLTRAINING")): "opted_out_embedded_metadata",
            srv.static("/default-ns.jpg", jpeg_with_app([(0xE1, XMP_APP1 + xmp_packet("DMI-PROHIBITED", default_ns=True).encode())])):
                "opted_out_embedded_metadata",
            srv.static("/decoy-only.jpg", jpeg_with_app([decoy, (0xE1, XMP_APP1 + xmp_packet("DMI-ALLOWED").encode())])):
                "success",
        }  # fmt: skip
        rows, _, _ = run(tmp_path, [srv.url(p) for p in cases])
    assert {p: rows[srv.url(p)]["status"] for p in cases} == cases


def test_xmp_in_compressed_and_encoded_png_text_chunks_is_read(tmp_path: Path) -> None:
    prohibited, allowed = xmp_packet("DMI-PROHIBITED-AIMLTRAINING"), xmp_packet("DMI-ALLOWED")
    with FixtureServer() as srv:
        cases = {
            srv.static("/itxt-zlib.png", png_with_text([("itxt-z", "XML:com.adobe.xmp", prohibited)])): "opted_out_embedded_metadata",
            srv.static("/ztxt.png", png_with_text([("ztxt", "XML:com.adobe.xmp", prohibited)])): "opted_out_embedded_metadata",
            srv.static("/ztxt-raw-profile.png", png_with_text([("ztxt", "Raw profile type xmp", raw_profile(prohibited))])):
                "opted_out_embedded_metadata",
            srv.static("/text-raw-profile.png", png_with_text([("text", "Raw profile type xmp", raw_profile(prohibited))])):
                "opted_out_embedded_metadata",
            srv.static("/itxt-allowed.png", png_with_text([("itxt-z", "XML:com.adobe.xmp", allowed)])): "success",
            srv.static("/comment.png", png_with_text([("ztxt", "Comment", "made with care")])): "success",
        }  # fmt: skip
        rows, _, _ = run(tmp_path, [srv.url(p) for p in cases])
    assert {p: rows[srv.url(p)]["status"] for p in cases} == cases
    assert "DMI-PROHIBITED-AIMLTRAINING" in rows[srv.url("/ztxt-raw-profile.png")]["error_message"]
    # The compressed chunks really are compressed: the packet is not in the file as plain text.
    assert b"useplus" not in png_with_text([("itxt-z", "XML:com.adobe.xmp", prohibited)])


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
    from laion_tasks.stages.clip.encode import clip_score_shard

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
