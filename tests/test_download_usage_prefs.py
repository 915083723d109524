"""AI-use preferences through the real downloader against loopback servers: each form the drafts give as an
example (draft-ietf-aipref-attach-05 §1.2 and §3.4, draft-ietf-aipref-vocab-07 §6, contentsignals.org,
RSL 1.0's robots.txt guide) gives the outcome the text states, refusals at download are
``opted_out:<use>`` without the image being requested, and what is found is in ``usage_pref``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from laion_tasks.config import DownloadConfig
from laion_tasks.net.usage_prefs import UsagePref, parse_robots_usage, parse_statement
from laion_tasks.stages.download import download_shard, retry_failed
from tests.download_fixtures import FixtureServer, make_jpeg, redirect, send, write_shard

pytestmark = pytest.mark.timeout(180)
TEXT = {"Content-Type": "text/plain"}

# draft-ietf-aipref-attach-05 §3.4, Figure 2 (the document's example robots.txt), verbatim.
ATTACH_EXAMPLE_ROBOTS = b"""User-Agent: *
Allow: /
Disallow: /never/
Content-Usage: train-ai=n
Content-Usage: /ai-ok/ train-ai=y

User-Agent: ExampleBot
Allow: /
Content-Usage: train-ai=y
"""
# contentsignals.org's example robots.txt (its policy comment block shortened to one line).
CONTENT_SIGNALS_ROBOTS = b"""# As a condition of accessing this website, you agree to abide by the following content signals: ...
User-Agent: *
Content-Signal: ai-train=no, search=yes, ai-input=yes
Allow: /
"""
# rslstandard.org, "Adding RSL to robots.txt", Example robots.txt File, verbatim.
RSL_ROBOTS = b"""License: https://your-website.com/license.xml

User-agent: Googlebot
Allow: /
"""


def config(**overrides: Any) -> DownloadConfig:
    base: dict[str, Any] = dict(allow_private_networks=True, request_deadline_s=5.0, retries=0, processes=1, max_concurrency=8)
    base.update(overrides)
    return DownloadConfig(**base)


def run(tmp_path: Path, urls: list[str], cfg: DownloadConfig | None = None, name: str = "000000"):  # type: ignore[no-untyped-def]
    shard = write_shard(tmp_path / f"{name}-in.parquet", urls)
    stats = download_shard(shard, str(tmp_path / f"{name}.tar"), str(tmp_path / f"{name}.parquet"), cfg or config())
    return {r["url"]: r for r in pq.read_table(tmp_path / f"{name}.parquet").to_pylist()}, stats


def serve(srv: FixtureServer, robots: bytes | None, paths: list[str], headers: dict[str, str] | None = None) -> list[str]:
    if robots is not None:
        srv.static("/robots.txt", robots, headers=TEXT)
    for path in paths:
        srv.static(path, make_jpeg(), headers={"Content-Type": "image/jpeg", **(headers or {})})
    return [srv.url(p) for p in paths]


def values(row: dict[str, Any]) -> tuple[str | None, str | None, str | None] | None:
    pref = row["usage_pref"]
    return None if pref is None else (pref["train_ai"], pref["ai_input"], pref["search"])


# -- the statement format (draft-ietf-aipref-vocab-07 §6) and the robots.txt rule (attach-05 §3.2) --------
@pytest.mark.parametrize(
    ("statement", "drafts", "strict"),
    [
        ("train-ai=y, search=n", {"train-ai": "y", "search": "n"}, {"train-ai": "y", "search": "n"}),  # §6
        # §6.5.1: duplicated keys, the last applies; a Boolean and a String are not Tokens: all unknown.
        ('train-ai=y, train-ai, search=n, search="n"', {}, {"search": "n"}),  # strict: refusals only
        ("train-ai;allow=n, train-ai=y", {"train-ai": "y"}, {"train-ai": "y"}),  # §6.5.2: parameters are ignored
        ('train-ai;has;parameters="?";', {}, {}),  # §6.5.2: parameters, preference unknown
        ("Train-AI=n", {}, {"train-ai": "n"}),  # §6.5.1: upper case does not parse (case sensitive)
        ("train-ai=no", {}, {"train-ai": "n"}),  # not the Token n
        ("train-genai=n, ai-use=n", {}, {"train-ai": "n", "ai-input": "n"}),  # vocab -02 / -03 labels
        ("bots=n, search=y", {"search": "y"}, {"train-ai": "n", "ai-input": "n", "search": "y"}),  # -03 parent
        ("future-use=n, train-ai=y", {"train-ai": "y"}, {"train-ai": "y"}),  # §6.4: unknown labels are ignored
    ],
)
def test_content_usage_statements(statement: str, drafts: dict[str, str], strict: dict[str, str]) -> None:
    assert parse_statement("Content-Usage", statement, "drafts") == drafts
    assert parse_statement("Content-Usage", statement, "strict") == strict


def test_content_signal_statements_and_the_rule_syntax() -> None:
    assert parse_statement("Content-Signal", "search=yes, ai-train=no, ai-input=no", "drafts") == {
        "search": "y", "train-ai": "n", "ai-input": "n"}  # fmt: skip
    assert parse_statement("Content-Signal", "AI-Train=No", "drafts") == {}
    assert parse_statement("Content-Signal", "AI-Train=No", "strict") == {"train-ai": "n"}
    usage = parse_robots_usage(
        "Content-Usage: train-ai=n\n"  # before any group: only the strict reading takes it
        "User-agent: a\nUser-agent: b\nContent-Usage: /x%20y/*.jpg$\ttrain-ai=y # comment\n"
        "Content-Signal: search=no\nUser-agent: c\nLicense: https://l.example/1.xml\nContent-Usage: \n"
    )
    assert [(r.field, r.path, r.statement, r.agents) for r in usage.rules] == [
        ("Content-Usage", "", "train-ai=n", None),
        ("Content-Usage", "/x%20y/*.jpg$", "train-ai=y", frozenset({"a", "b"})),
        ("Content-Signal", "", "search=no", frozenset({"a", "b"})),
    ]
    assert usage.licenses == ("https://l.example/1.xml",)
    assert usage.pref_for("http://h/x y/p.jpg", "a", "drafts") == UsagePref(
        (("search", "n"), ("train-ai", "y")),
        ("robots.txt Content-Usage: /x%20y/*.jpg$ train-ai=y", "robots.txt Content-Signal: search=no"),
        ("https://l.example/1.xml",),
    )
    assert usage.pref_for("http://h/x y/p.jpg?v=1", "b", "strict").value("train-ai") == "n"  # $: only the orphan matches
    assert usage.pref_for("http://h/p.jpg", "c", "drafts") == UsagePref(licenses=("https://l.example/1.xml",))


# -- through the downloader ------------------------------------------------------------------------------
def test_attach_draft_robots_example_per_path_and_group(tmp_path: Path) -> None:
    """attach-05 §3.4, Table 1: /test crawlable with train-ai=n, /never/test not crawlable, /ai-ok/test train-ai=y;
    ExampleBot uses its own group: everything crawlable, train-ai=y. By default a train-ai refusal is not fetched."""
    paths = ["/test", "/never/test", "/ai-ok/test"]
    with FixtureServer() as srv:
        urls = serve(srv, ATTACH_EXAMPLE_ROBOTS, paths)
        rows, stats = run(tmp_path, urls)
        assert srv.seen("/test") == 0 and srv.seen("/never/test") == 0 and srv.seen("/ai-ok/test") == 1
        recorded, recorded_stats = run(tmp_path, urls, config(usage_pref_refuse=[]), name="000001")
        bot, _ = run(tmp_path, urls, config(user_agent="ExampleBot/1.0 (+https://example.org)"), name="000002")
    by_path = {p: rows[u] for p, u in zip(paths, urls)}
    assert {p: r["status"] for p, r in by_path.items()} == {
        "/test": "opted_out_ai_train", "/never/test": "opted_out_robots_txt", "/ai-ok/test": "success"}  # fmt: skip
    assert values(by_path["/test"]) == ("n", None, None) and values(by_path["/ai-ok/test"]) == ("y", None, None)
    assert by_path["/test"]["usage_pref"]["sources"] == ["robots.txt Content-Usage: train-ai=n"]
    assert by_path["/ai-ok/test"]["usage_pref"]["sources"] == ["robots.txt Content-Usage: /ai-ok/ train-ai=y"]
    assert by_path["/never/test"]["usage_pref"] is None  # §3.1: no preferences for what cannot be crawled
    assert "train-ai refused: robots.txt Content-Usage: train-ai=n" in by_path["/test"]["error_message"]
    assert stats.counts == {"opted_out:ai_train": 1, "fail:opted_out_robots_txt": 1, "success": 1}
    assert stats.extra["usage_pref_kept"] == {"train-ai=y": 1}
    # With no use refused at download the preference is only recorded: a column, for curate.
    assert [recorded[u]["status"] for u in urls] == ["success", "opted_out_robots_txt", "success"]
    assert values(recorded[urls[0]]) == ("n", None, None)
    assert recorded_stats.extra["usage_pref_kept"] == {"train-ai=n": 1, "train-ai=y": 1}
    assert [bot[u]["status"] for u in urls] == ["success"] * 3
    assert {values(bot[u]) for u in urls} == {("y", None, None)}


def test_attach_draft_header_and_robots_examples(tmp_path: Path) -> None:
    """attach-05 §1.2: the response field ``Content-Usage: train-ai=n``, and the same directive in robots.txt."""
    with FixtureServer() as header_srv, FixtureServer() as robots_srv:
        header_urls = serve(header_srv, None, ["/h.jpg"], {"Content-Usage": "train-ai=n"})
        header_urls += serve(header_srv, None, ["/y.jpg"], {"Content-Usage": "train-ai=y"})
        robots_urls = serve(robots_srv, b"User-Agent: *\nAllow: /\nContent-Usage: train-ai=n\n", ["/r.jpg"])
        rows, stats = run(tmp_path, header_urls + robots_urls)
        assert robots_srv.seen("/r.jpg") == 0, "a robots.txt refusal is known before the request"
    assert [rows[u]["status"] for u in header_urls + robots_urls] == ["opted_out_ai_train", "success", "opted_out_ai_train"]
    refused = rows[header_urls[0]]
    assert values(refused) == ("n", None, None) and refused["usage_pref"]["sources"] == ["header Content-Usage: train-ai=n"]
    assert refused["sha256"] is None and refused["width"] is None  # refused before the body: nothing of it kept
    assert values(rows[header_urls[1]]) == ("y", None, None)
    assert stats.counts == {"opted_out:ai_train": 2, "success": 1}


def test_conflicts_resolve_to_the_most_restrictive(tmp_path: Path) -> None:
    """attach-05 §3.1: identical paths combine by vocab-07 §5.1 (any n wins); the header and robots.txt combine
    the same way; the longest path decides between different paths."""
    robots = (b"User-agent: *\nAllow: /\nContent-Usage: /a/ train-ai=y\nContent-Usage: /a/ train-ai=n, search=y\n"
              b"Content-Usage: /b/ train-ai=y\nContent-Usage: /b/deeper/ train-ai=n\n")
    with FixtureServer() as srv:
        urls = serve(srv, robots, ["/a/1.jpg", "/b/2.jpg", "/b/deeper/3.jpg"])
        urls += serve(srv, None, ["/b/4.jpg"], {"Content-Usage": "train-ai=n"})
        rows, _ = run(tmp_path, urls, config(usage_pref_refuse=[]))
    assert [values(rows[u]) for u in urls] == [("n", None, "y"), ("y", None, None), ("n", None, None), ("n", None, None)]
    assert rows[urls[3]]["usage_pref"]["sources"] == ["robots.txt Content-Usage: /b/ train-ai=y", "header Content-Usage: train-ai=n"]


def test_content_signals_examples(tmp_path: Path) -> None:
    """contentsignals.org: ``ai-train=no`` refuses training (not fetched); the issue's ``search=yes, ai-train=no,
    ai-input=no`` is recorded when nothing is refused at download; refusing ``ai-input`` uses its own status."""
    with FixtureServer() as cs, FixtureServer() as cf, FixtureServer() as hdr:
        cs_urls = serve(cs, CONTENT_SIGNALS_ROBOTS, ["/a.jpg"])
        cf_urls = serve(cf, b"User-Agent: *\nContent-Signal: search=yes, ai-train=no, ai-input=no\nAllow: /\n", ["/b.jpg"])
        hdr_urls = serve(hdr, None, ["/c.jpg"], {"Content-Signal": "ai-train=yes, search=yes, ai-input=no"})
        rows, _ = run(tmp_path, cs_urls + cf_urls + hdr_urls)
        assert cs.seen("/a.jpg") == 0 and cf.seen("/b.jpg") == 0
        recorded, _ = run(tmp_path, cf_urls, config(usage_pref_refuse=[]), name="000001")
        inputs, input_stats = run(tmp_path, hdr_urls, config(usage_pref_refuse=["ai-input"]), name="000002")
    assert [rows[u]["status"] for u in cs_urls + cf_urls + hdr_urls] == ["opted_out_ai_train", "opted_out_ai_train", "success"]
    assert values(rows[cs_urls[0]]) == ("n", "y", "y")
    assert rows[cs_urls[0]]["usage_pref"]["sources"] == ["robots.txt Content-Signal: ai-train=no, search=yes, ai-input=yes"]
    assert values(rows[hdr_urls[0]]) == ("y", "n", "y")
    assert recorded[cf_urls[0]]["status"] == "success" and values(recorded[cf_urls[0]]) == ("n", "n", "y")
    assert inputs[hdr_urls[0]]["status"] == "opted_out_ai_input" and input_stats.counts == {"opted_out:ai_input": 1}


def test_rsl_license_url_is_recorded(tmp_path: Path) -> None:
    """RSL 1.0: ``License:`` is global (here before any group; Googlebot's group does not concern us): the
    URL is recorded for every sample of the origin, and nothing is refused for it."""
    with FixtureServer() as srv:
        urls = serve(srv, RSL_ROBOTS, ["/p.jpg"])
        rows, stats = run(tmp_path, urls)
    row = rows[urls[0]]
    assert row["status"] == "success" and values(row) == (None, None, None)
    assert row["usage_pref"]["licenses"] == ["https://your-website.com/license.xml"] and row["usage_pref"]["sources"] == []
    assert stats.extra["usage_pref_kept"] == {"rsl_license": 1}


def test_strict_and_drafts_readings(tmp_path: Path) -> None:
    robots = b"Content-Usage: train-ai=n\nUser-agent: *\nAllow: /\nContent-Usage: /d/ Train-AI=no\n"
    with FixtureServer() as srv:
        urls = serve(srv, robots, ["/d/1.jpg", "/e/2.jpg"])
        strict, _ = run(tmp_path, urls)
        drafts, _ = run(tmp_path, urls, config(usage_pref_reading="drafts"), name="000001")
        off, _ = run(tmp_path, urls, config(respect_usage_prefs=False), name="000002")
    assert [strict[u]["status"] for u in urls] == ["opted_out_ai_train"] * 2  # what reads as a refusal is one
    assert [drafts[u]["status"] for u in urls] == ["success"] * 2
    assert values(drafts[urls[0]]) == (None, None, None) and drafts[urls[1]]["usage_pref"] is None
    assert drafts[urls[0]]["usage_pref"]["sources"] == ["robots.txt Content-Usage: /d/ Train-AI=no"]  # found, not understood
    assert [off[u]["status"] for u in urls] == ["success"] * 2 and {off[u]["usage_pref"] is None for u in urls} == {True}


def test_every_hop_of_a_redirect_counts(tmp_path: Path) -> None:
    """The robots.txt of every origin on the way applies (combined most-restrictive): an image behind a
    redirect to an origin that refuses training is refused there, before its image is requested."""
    with FixtureServer() as first, FixtureServer() as second:
        serve(second, b"User-agent: *\nContent-Usage: train-ai=n\n", ["/img.jpg"])
        first.routes["/go.jpg"] = redirect(second.url("/img.jpg"))
        rows, _ = run(tmp_path, [first.url("/go.jpg")])
        assert second.seen("/img.jpg") == 0
    row = rows[first.url("/go.jpg")]
    assert row["status"] == "opted_out_ai_train" and row["final_url"] == second.url("/img.jpg")


def test_one_robots_answer_per_origin_carries_the_preferences_to_every_worker(tmp_path: Path) -> None:
    robots = b"User-agent: *\nContent-Usage: /n/ train-ai=n\nContent-Usage: /y/ train-ai=y\nLicense: https://l.example/x.xml\n"
    with FixtureServer() as srv:
        urls = serve(srv, robots, [f"/{'ny'[i % 2]}/{i}.jpg" for i in range(8)])
        rows, _ = run(tmp_path, urls, config(processes=2, usage_pref_refuse=[]))
        assert srv.seen("/robots.txt") == 1
    assert [values(rows[u])[0] for u in urls] == ["n", "y"] * 4
    assert {tuple(rows[u]["usage_pref"]["licenses"]) for u in urls} == {("https://l.example/x.xml",)}


def test_a_retry_keeps_the_preferences_of_the_rows_it_does_not_retry(tmp_path: Path) -> None:
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(h) -> None:  # type: ignore[no-untyped-def]
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            send(h, 503, b"busy")
        else:
            send(h, 200, make_jpeg(), {"Content-Usage": "search=n"})

    with FixtureServer() as srv:
        urls = serve(srv, b"User-agent: *\nContent-Usage: train-ai=y\n", ["/ok.jpg"])
        srv.routes["/flaky.jpg"] = flaky
        urls.append(srv.url("/flaky.jpg"))
        shard = write_shard(tmp_path / "in.parquet", urls)
        tar, parquet = str(tmp_path / "s.tar"), str(tmp_path / "s.parquet")
        download_shard(shard, tar, parquet, config())
        retry_failed(shard, tar, parquet, config())
    rows = {r["url"]: r for r in pq.read_table(parquet).to_pylist()}
    assert [rows[u]["status"] for u in urls] == ["success", "success"]
    assert values(rows[urls[0]]) == ("y", None, None) and values(rows[urls[1]]) == ("y", None, "n")
