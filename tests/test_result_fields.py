"""Every config field a stage reads while it runs is in its skip key, or named as not changing its output.

The whole pipeline runs once, in this process, on a small fixture crawl with the demo's tiny
random models, under a *recording config*: every ``Section`` attribute read while a stage's
``run_shard`` runs is recorded with its dotted path (an instance's path is known from the
settings tree; a copy of a section is traced back to every place its class occurs). A read of a
field that is neither among the stage's result fields or input files, nor a result field of a
stage it reads (whose re-run re-runs it), nor on :data:`laion_tasks.stage.EXECUTION_ONLY` /
:data:`laion_tasks.stage.UNKEYED_READS` fails the test, naming the stage, shard and field.

The download worker processes get their config by pickle; here they run inline (the same
``_fetch_rows`` loop) so that their reads are seen too. A whole-section read (``model_dump``,
a pickle) counts as a read of every field of the section.

The second half is the hash-list scenario: a list edited in place re-runs tag on every shard,
downloads nothing again, and the image it now lists is blocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import http.server
import importlib
import os
import pickle
import tarfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest

from laion_tasks import demo, demo_config, layout, runner, storage
from laion_tasks.config import Section, Settings
from laion_tasks.fixtures.crawl import build_fixture_crawl
from laion_tasks.fixtures.server import _QuietHandler
from laion_tasks.stage import EXECUTION_ONLY, UNKEYED_READS, Context, ShardStats, StageError, StageSpec, content_identity

pytestmark = pytest.mark.timeout(900)

SNAP = demo.DEMO_CRAWL
STAGES = tuple(runner.STAGE_MODULES)
FieldPath = tuple[str, ...]
WHOLE_SECTION_READS = frozenset({"model_dump", "model_dump_json", "__reduce_ex__", "__reduce__", "__getstate__"})
"""Attribute names through which a section is read whole (serialised, pickled to a worker)."""


# -- the recording config -------------------------------------------------------------


def _sections_mapping(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Section) for v in value.values())


@dataclass
class Recorder:
    """Knows the path of each section instance of one Settings tree and records the fields read."""

    settings: Settings
    paths: dict[int, FieldPath] = field(default_factory=dict)
    by_class: dict[type, list[FieldPath]] = field(default_factory=lambda: defaultdict(list))
    leaves: dict[FieldPath, list[FieldPath]] = field(default_factory=dict)
    """Section path -> the paths of all its leaf fields (a whole-section read reads them all)."""
    reads: dict[tuple[str, str], set[FieldPath]] = field(default_factory=lambda: defaultdict(set))
    """(stage, shard) -> field paths read while that shard ran."""
    current: tuple[str, str] | None = None
    paused: int = 0
    keep: list[Any] = field(default_factory=list)
    """The registered sections, held so that no other object can take their ids."""

    def __post_init__(self) -> None:
        self._walk(self.settings, ())

    def _walk(self, section: Section, path: FieldPath) -> list[FieldPath]:
        self.paths[id(section)] = path
        self.by_class[type(section)].append(path)
        self.keep.append(section)
        leaves: list[FieldPath] = []
        for name in type(section).__pydantic_fields__:
            value = section.__dict__[name]
            if isinstance(value, Section):
                leaves += self._walk(value, (*path, name))
            elif _sections_mapping(value):
                for key, item in value.items():
                    leaves += self._walk(item, (*path, name, key))
            else:
                leaves.append((*path, name))
        self.leaves[path] = leaves
        return leaves

    def _paths_of(self, obj: Section) -> list[FieldPath]:
        path = self.paths.get(id(obj))
        if path is not None:
            return [path]
        # a copy (model_copy) of a section: every place its class occurs (conservative)
        return self.by_class.get(type(obj)) or [(f"<unregistered {type(obj).__name__}>",)]

    def read(self, obj: Section, name: str, value: Any) -> None:
        if self.current is None or self.paused:
            return
        if name in type(obj).__pydantic_fields__:
            if isinstance(value, Section) or _sections_mapping(value):
                return  # a container: the fields read below it are recorded
            for path in self._paths_of(obj):
                self.reads[self.current].add((*path, name))
        elif name in WHOLE_SECTION_READS:
            for path in self._paths_of(obj):
                self.reads[self.current].update(self.leaves.get(path, [(*path, "*")]))

    @contextlib.contextmanager
    def shard(self, stage: str, shard: str) -> Iterator[None]:
        self.current = (stage, shard)
        self.reads[self.current]  # a shard that reads nothing is still listed
        try:
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator["Recorder"]:
        """Patch Section attribute access, the stage declarations' shard functions and the download workers."""
        original = Section.__getattribute__
        recorder = self

        def getattribute(obj: Section, name: str) -> Any:
            value = original(obj, name)
            if recorder.current is not None:
                recorder.read(obj, name, value)
            return value

        knobs = Settings.knobs

        def paused_knobs(obj: Settings, fields: Any) -> dict[str, Any]:
            # a stage that computes its own config digest reads its result fields, nothing else
            recorder.paused += 1
            try:
                return knobs(obj, fields)
            finally:
                recorder.paused -= 1

        monkeypatch.setattr(Section, "__getattribute__", getattribute)
        monkeypatch.setattr(Settings, "knobs", paused_knobs)
        for name in STAGES:
            module = importlib.import_module(runner.STAGE_MODULES[name])
            spec = runner.spec(name)
            recording = dataclasses.replace(spec, run_shard=self._recording(spec))
            if getattr(module, "SPECS", None):
                monkeypatch.setitem(module.SPECS, name, recording)
            else:
                monkeypatch.setattr(module, "SPEC", recording)
        from laion_tasks.stages.download import workers

        monkeypatch.setattr(workers, "pickle", _NoPickle)
        yield self

    def _recording(self, spec: StageSpec) -> Any:
        def run_shard(ctx: Context, shard: str) -> ShardStats:
            with self.shard(spec.name, shard):
                return spec.run_shard(ctx, shard)

        return run_shard


class _NoPickle:
    """Stands in for ``pickle`` in the download workers module: a blocklist that cannot be pickled
    keeps the download in this process (its documented fallback), on the same ``_fetch_rows`` loop
    the worker processes run, so the config reads of that loop are seen."""

    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
    loads = staticmethod(pickle.loads)

    @staticmethod
    def dumps(obj: Any, protocol: int | None = None) -> bytes:
        raise pickle.PicklingError("the recording test downloads in this process")


# -- what a stage may read -------------------------------------------------------------


def _pattern(field_path: str, shard: str | None) -> FieldPath | None:
    """A declared field as segments; ``{shard}`` is this shard (None: a pattern about other shards)."""
    parts = field_path.split(".")
    if "{shard}" in parts:
        if shard is None:
            return None
        parts = [glob.escape(shard) if p == "{shard}" else p for p in parts]
    return tuple(parts)


def _covers(pattern: FieldPath, path: FieldPath) -> bool:
    """Segment-wise glob match; a pattern naming a section or mapping covers everything below it."""
    return len(pattern) <= len(path) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(path, pattern))


def upstream_stages(spec: StageSpec) -> dict[str, StageSpec]:
    """Every stage this one reads, directly or through another: a change of their result fields
    re-runs them, and this stage follows because the runs it reads changed."""
    seen: dict[str, StageSpec] = {}
    todo = list(spec.reads)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = runner.spec(name)
            todo += seen[name].reads
    return seen


def undeclared(spec: StageSpec, shard: str, reads: set[FieldPath]) -> list[str]:
    """The fields read on ``shard`` that nothing declares: the skip key would miss a change of them."""
    patterns = [_pattern(f, shard) for f in (*spec.result_fields, *spec.input_files)]
    for upstream in upstream_stages(spec).values():
        same_shards = bool(spec.plan_name) and upstream.plan_name == spec.plan_name
        patterns += [_pattern(f, shard if same_shards else None) for f in upstream.result_fields]
    patterns += [_pattern(f, None) for f in (*EXECUTION_ONLY, *UNKEYED_READS.get(spec.name, {}))]
    usable = [p for p in patterns if p is not None]
    return sorted(".".join(path) for path in reads if not any(_covers(p, path) for p in usable))


# -- the fixture pipeline ----------------------------------------------------------------


class CountingServer:
    """The fixture crawl on loopback, in this process, counting requests per path."""

    def __init__(self, directory: Path) -> None:
        self.counts: Counter[str] = Counter()
        lock = threading.Lock()
        counts = self.counts

        class Handler(_QuietHandler):
            def send_head(self):  # type: ignore[no-untyped-def]
                with lock:
                    counts[self.path.split("?", 1)[0]] += 1
                return super().send_head()

        directory.mkdir(parents=True, exist_ok=True)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def image_requests(self) -> int:
        return sum(n for path, n in self.counts.items() if path.startswith("/img/"))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Pipeline:
    settings: Settings
    crawl: Path
    server: CountingServer
    lists: dict[str, Path]
    recorder: Recorder
    report: dict[str, Any]

    @property
    def root(self) -> str:
        return self.settings.storage.root

    def shards(self) -> list[str]:
        return runner.spec("download").shards(runner.Context(self.settings, SNAP))

    def rows(self, stage_dir: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for shard in self.shards():
            table = pq.read_table(storage.join(self.root, SNAP, stage_dir, f"{shard}.parquet"))
            out += [{"shard": shard, **r} for r in table.to_pylist()]
        return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    work = tmp_path_factory.mktemp("result_fields").resolve()
    server = CountingServer(work / "crawl")
    build_fixture_crawl(work / "crawl", server.base_url, SNAP, n_wat=2, pages_per_wat=3)
    lists = {kind: work / f"{kind}-list.txt" for kind in ("url", "image", "pdq")}
    # one listed URL of the crawl (never fetched), and entries that match nothing yet
    lists["url"].write_text(f"# fixture list\n{_md5(server.base_url + 'img/00003.jpg')}\n")
    lists["image"].write_text(f"sha256:{hashlib.sha256(b'not in the crawl').hexdigest()}\n")
    lists["pdq"].write_text("0" * 64 + "\n")
    config = demo_config.demo_config(
        work, server.base_url, str(work / "data"), f"sqlite:///{work / 'lineage.db'}",
        extra={
            "extract": {"max_wat_files": 2},
            "download": {"shard_size": 25, "processes": 2},
            "hashlists": {"url": str(lists["url"]), "image": str(lists["image"]), "pdq": str(lists["pdq"])},
            "dedup": {"buckets": 2, "cluster_size": 10},
            "index": {"subsets": ["laion2B-en"], "index_key": "IVF2,Flat"},  # a few vectors: two lists
        },
    )
    config["curate"]["subsets"] = {k: v for k, v in config["curate"]["subsets"].items() if k in ("laion2B-en", "research-safe")}
    settings = Settings.model_validate(config)
    recorder = Recorder(settings)
    try:
        with pytest.MonkeyPatch.context() as mp, recorder.installed(mp):
            report = runner.run_all(settings, SNAP, STAGES)
        yield Pipeline(settings, work / "crawl", server, lists, recorder, report)
    finally:
        server.close()


# -- the checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGES)
def test_every_field_a_stage_reads_is_in_its_key(pipeline: Pipeline, name: str) -> None:
    ran = {shard: reads for (stage, shard), reads in pipeline.recorder.reads.items() if stage == name}
    assert ran, f"{name} ran on no shard of the fixture pipeline: {pipeline.report.get(name)}"
    spec = runner.spec(name)
    missing = {shard: undeclared(spec, shard, reads) for shard, reads in ran.items()}
    missing = {shard: fields for shard, fields in missing.items() if fields}
    assert not missing, (
        f"{name} reads config fields that are not in its skip key (add them to its result_fields, or to "
        f"EXECUTION_ONLY / UNKEYED_READS in laion_tasks/stage.py with the reason they cannot change its output): {missing}"
    )


@pytest.mark.parametrize(
    "name, attribute, removed",
    [
        ("clip", "result_fields", "clip.precision"),
        ("clip", "result_fields", "clip.use_multilingual"),
        ("tag", "result_fields", "tag.nsfw_*"),
        ("tag", "input_files", "hashlists.url"),
        ("dedup_centroids", "result_fields", "dedup.memory_limit"),
        ("curate", "result_fields", "curate.rows_per_file"),
        ("index", "result_fields", "index.index_key"),
        ("eval", "result_fields", "eval.precision"),
    ],
)
def test_a_field_left_out_of_a_key_is_caught(pipeline: Pipeline, name: str, attribute: str, removed: str) -> None:
    """The check can fail: the same recorded reads, against a declaration with one field less."""
    spec = runner.spec(name)
    kept = tuple(f for f in getattr(spec, attribute) if f != removed)
    assert len(kept) == len(getattr(spec, attribute)) - 1, f"{removed} is not in {name}.{attribute}"
    fewer = dataclasses.replace(spec, **{attribute: kept})
    flagged = {f for (stage, shard), reads in pipeline.recorder.reads.items() if stage == name
               for f in undeclared(fewer, shard, reads)}
    assert flagged, f"{name} without {removed}: nothing flagged"
    assert all(_covers(tuple(removed.split(".")), tuple(f.split("."))) for f in flagged), flagged


def test_a_hash_list_edited_in_place_reruns_tag_not_download(pipeline: Pipeline) -> None:
    settings, shards = pipeline.settings, pipeline.shards()
    en = {r["URL"] for r in _subset_rows(pipeline, "laion2B-en")}
    tags = {r["key"]: r for r in pipeline.rows("tags")}
    # a downloaded image that is in a subset and on no list yet; its hash from the served file itself
    target = next(r for r in pipeline.rows("images") if r["status"] == "success" and r["url"] in en
                  and tags[r["key"]]["tag_status"] != "blocked_hashlist")
    served = pipeline.crawl / target["url"].split("/", 3)[3]
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    assert target["sha256"] == digest
    ctx = runner.open_context(settings, SNAP)
    assert all(runner.pending(ctx, stage) == [] for stage in ("download", "clip", "tag")), "the fixture run is current"
    fetched = pipeline.server.image_requests()
    assert fetched > 0

    with pipeline.lists["image"].open("a") as handle:  # the same path, edited in place
        handle.write(f"sha256:{digest}  # added after the crawl\n")
    ctx = runner.open_context(settings, SNAP)
    assert runner.pending(ctx, "download") == [] and runner.pending(ctx, "clip") == []
    assert runner.pending(ctx, "tag") == shards, "every shard is re-checked against the grown list"

    report = runner.run_all(settings, SNAP, STAGES[: STAGES.index("curate") + 1])
    assert report["download"]["done"] == 0 and report["clip"]["done"] == 0, report
    assert report["tag"]["done"] == len(shards), report
    assert pipeline.server.image_requests() == fetched, "no image is downloaded again"
    row = next(r for r in pipeline.rows("tags") if r["key"] == target["key"])
    assert row["tag_status"] == "blocked_hashlist" and row["hashlist_blocked"], row
    tar = layout.images_tar_uri(pipeline.root, SNAP, row["shard"])
    with storage.local_copy(tar) as path, tarfile.open(path) as members:
        assert not [m for m in members.getnames() if m.startswith(target["key"] + ".")], "its bytes are stripped"
    assert target["url"] not in {r["URL"] for r in _subset_rows(pipeline, "laion2B-en")}
    assert runner.pending(runner.open_context(settings, SNAP), "tag") == [], "an unchanged list re-runs nothing"


def _subset_rows(pipeline: Pipeline, name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for uri in storage.list_uris(layout.subset_dir(pipeline.root, SNAP, name), ".parquet"):
        rows += pq.read_table(uri).to_pylist()
    return rows


# -- input files by content --------------------------------------------------------------


def test_content_identity_follows_content_not_path_or_mtime(tmp_path: Path) -> None:
    listed = tmp_path / "image-list.txt"
    listed.write_text("sha256:" + "a" * 64 + "\n")
    first = content_identity(str(listed))
    assert first == "sha256:" + hashlib.sha256(listed.read_bytes()).hexdigest()
    stat = listed.stat()
    os.utime(listed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert content_identity(str(listed)) == first, "a touched file holds the same list"
    listed.write_text("sha256:" + "b" * 64 + "\n")  # same size, same path
    assert content_identity(str(listed)) != first
    moved = tmp_path / "elsewhere.txt"
    moved.write_bytes(listed.read_bytes())
    assert content_identity(str(moved)) == content_identity(str(listed)), "the path is not the identity"
    with pytest.raises(StageError, match="missing.txt"):
        content_identity(str(tmp_path / "missing.txt"))


def test_s3_list_is_keyed_by_its_etag(s3_root: str) -> None:
    uri = storage.join(s3_root, "lists", "image.txt")
    storage.write_text(uri, "sha256:" + "a" * 64 + "\n")
    first = content_identity(uri)
    assert first.startswith("etag:")
    assert content_identity(uri) == first
    storage.write_text(uri, "sha256:" + "b" * 64 + "\n")
    assert content_identity(uri) != first


def test_tag_key_has_the_list_content_download_key_has_no_list(tmp_path: Path) -> None:
    listed = tmp_path / "urls.txt"
    listed.write_text(_md5("http://example.org/a.jpg") + "\n")
    settings = Settings.model_validate({
        "storage": {"root": str(tmp_path / "data")}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"},
        "hashlists": {"url": str(listed)}})

    def digests() -> tuple[str, str]:
        ctx = runner.open_context(settings, "S")  # one context per DAG task: a new one sees the new content
        return (runner.inputs_digest(ctx, runner.spec("tag"), "000000"),
                runner.inputs_digest(ctx, runner.spec("download"), "000000"))

    tag_before, download_before = digests()
    listed.write_text(listed.read_text() + _md5("http://example.org/b.jpg") + "\n")
    tag_after, download_after = digests()
    assert tag_after != tag_before and download_after == download_before
    moved = tmp_path / "moved.txt"
    moved.write_bytes(listed.read_bytes())
    settings = settings.model_copy(update={"hashlists": settings.hashlists.model_copy(update={"url": str(moved)})})
    assert digests()[0] == tag_after, "the same list under another path is the same input"
    assert runner.spec("tag").config_digest(settings, "000000") == runner.spec("tag").config_digest(
        settings.model_copy(update={"hashlists": settings.hashlists.model_copy(update={"url": None})}), "000000"
    ), "the path is not a result field"


@pytest.mark.parametrize(
    "change, moves, stays",
    [
        ({"clip": {"precision": "fp32"}}, {"clip"}, {"download", "tag"}),
        ({"clip": {"device": "cpu"}}, {"clip"}, {"download"}),
        ({"clip": {"gpu_jpeg_decode": False}}, {"clip"}, {"download", "tag"}),
        ({"clip": {"batch_size": 7, "channels_last": True}}, set(), set(STAGES)),
        ({"dedup": {"memory_limit": "1GB"}}, {"dedup_centroids"}, {"dedup_partition", "dedup_bucket", "dedup"}),
        ({"dedup": {"faiss_gpu": True}}, {"dedup_bucket", "dedup"}, {"dedup_centroids", "dedup_partition"}),
        ({"dedup": {"gpu_knn": 16}}, {"dedup_bucket", "dedup"}, {"dedup_centroids", "dedup_partition"}),
        ({"index": {"nprobe": 8, "k_factor": 4}}, set(), set(STAGES)),
        ({"index": {"hnsw_m": 16}}, {"index"}, {"curate", "train"}),
        ({"train": {"precision": "fp32"}}, {"train"}, {"curate", "index", "eval"}),
        ({"eval": {"precision": "amp"}}, {"eval"}, {"train"}),
        ({"download": {"usage_pref_refuse": []}}, {"download"}, {"clip", "tag"}),
        ({"download": {"usage_pref_reading": "drafts"}}, {"download"}, {"clip", "tag"}),
        ({"curate": {"subsets": {"laion2B-en": {"where": "language = 'en' AND clip_kept", "intended_uses": [],
                                                "description": "English pairs at clip.english.threshold"}}}},
         {"curate"}, {"download", "clip", "tag", "dedup"}),
    ],
)
def test_knob_changes_the_key_of_these_stages(change: dict[str, Any], moves: set[str], stays: set[str]) -> None:
    """A knob's own key change (dependents then follow through their inputs); execution-only and
    query-time knobs move no key."""
    base, changed = Settings(), Settings.model_validate(change)
    moved = {name for name in STAGES
             if runner.spec(name).config_digest(base, "laion2B-en") != runner.spec(name).config_digest(changed, "laion2B-en")}
    assert moves <= moved and not moved & stays, moved
