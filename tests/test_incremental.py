"""Incremental runs through the real snapshot DAG (``airflow dags test``) on one fixture crawl.

Each scenario changes one thing (a knob, a deleted output, a recovered host, a grown
crawl), runs the DAG once, and asserts from lineage which stages re-ran, on which
shards, and that the funnel and every subset still count each candidate exactly once.
The scenarios share one crawl and each builds on the state the ones before it left; a test runs
the scenarios it depends on first (``reach``), so it passes alone and in any order.

Scenarios 3 (CLIP thresholds applied in curate) and 7 (dedup keeps an eligible copy)
test issue 12, items 4 and 5.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from laion_tasks import demo, layout, runner, storage
from laion_tasks.config import deep_merge, load_settings
from laion_tasks.fixtures.server import UNAVAILABLE_FILE
from laion_tasks.lineage import Lineage

pytestmark = pytest.mark.slow

SNAP = demo.DEMO_CRAWL
SUBSETS = ("laion2B-en", "laion2B-multi", "research-safe")
SHARD_STAGES = ("download", "clip", "tag", "dedup_partition")


@dataclass
class Crawl:
    env: demo.DemoEnv
    wat_files: int = 2
    unavailable: set[str] = field(default_factory=set)
    retry_urls: set[str] = field(default_factory=set)
    dup_url: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        settings = load_settings(self.env.config_path, environ={})
        storage.configure(settings.storage)
        return settings

    @property
    def root(self) -> str:
        return self.settings.storage.root

    def lineage(self) -> Lineage:
        return Lineage(self.settings.lineage.url)

    def configure(self, changes: dict[str, Any]) -> None:
        self.env.settings = deep_merge(self.env.settings, changes)
        self.env.config_path.write_text(yaml.safe_dump(self.env.settings, sort_keys=False))

    def serve_unavailable(self, urls: set[str]) -> None:
        self.unavailable = set(urls)
        paths = sorted("/" + u.split("/", 3)[3] for u in urls)
        (self.env.work / "crawl" / UNAVAILABLE_FILE).write_text("".join(p + "\n" for p in paths))

    def run_dag(self, **conf: Any) -> dict[str, set[str]]:
        """One DAG run; returns stage -> shard ids that ran (done runs recorded by this run)."""
        before = max((r["id"] for r in self.lineage().runs(SNAP)), default=0)
        demo.run_snapshot_dag(self.env, {"max_wat_files": self.wat_files, **conf})
        ran: dict[str, set[str]] = defaultdict(set)
        for r in self.lineage().runs(SNAP):
            if r["id"] > before and r["status"] == "done":
                ran[r["stage"]].add(r["shard_id"])
        return ran

    def shards(self) -> list[str]:
        ctx = runner.Context(self.settings, SNAP)
        return runner.spec("download").shards(ctx)

    def table(self, stage_dir: str, shard: str, columns: list[str] | None = None):  # type: ignore[no-untyped-def]
        with storage.local_copy(storage.join(self.root, SNAP, stage_dir, f"{shard}.parquet")) as path:
            return pq.read_table(path, columns=columns)

    def subset_rows(self, name: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for uri in storage.list_uris(layout.subset_dir(self.root, SNAP, name), ".parquet"):
            with storage.local_copy(uri) as path:
                rows += pq.read_table(path).to_pylist()
        return rows

    def rows_by_url(self, url: str) -> list[dict[str, Any]]:
        """Every (shard, key) row of a URL with its download, clip, tags and dedup columns."""
        out = []
        for shard in self.shards():
            images = self.table("images", shard).to_pylist()
            clip = {r["key"]: r for r in self.table("clip", shard).to_pylist()}
            tags = {r["key"]: r for r in self.table("tags", shard).to_pylist()}
            dedup = {r["key"]: r for r in self.table("dedup", shard).to_pylist()}
            for row in images:
                if row["url"] == url:
                    out.append({"shard": shard, **row, "clip": clip.get(row["key"]), "tags": tags.get(row["key"]),
                                "dedup": dedup.get(row["key"])})
        return out


def _candidates(work: Path) -> dict[int, list[dict[str, Any]]]:
    """The fixture crawl's candidates per WAT file, extracted here (not through the pipeline)."""
    from laion_tasks.config import ExtractConfig
    from laion_tasks.stages.extract import extract_wat

    out = {}
    wats = sorted((work / "crawl" / "crawl-data").rglob("*.warc.wat.gz"))
    for i, wat in enumerate(wats):
        target = work / "probe" / f"{i}.parquet"
        extract_wat(str(wat), str(target), ExtractConfig())
        out[i] = pq.read_table(target, columns=["url", "alt"]).to_pylist()
    return out


def _good_image(work: Path, url: str) -> bool:
    from PIL import Image

    path = work / "crawl" / url.split("/", 3)[3]
    try:
        with Image.open(path) as img:
            img.load()
            return min(img.size) >= 64 and img.format == "JPEG"
    except Exception:  # noqa: BLE001 - missing, truncated or not an image
        return False


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("incremental")
    env = demo.prepare(work, n_wat=3, pages_per_wat=4, cross_wat_duplicates=True)
    state = Crawl(env)
    # a lean DAG: three subsets (three curate tasks); the demo's tiny models and thresholds otherwise
    env.settings["curate"]["subsets"] = {k: v for k, v in env.settings["curate"]["subsets"].items() if k in SUBSETS}
    state.configure({})
    per_wat = _candidates(work)
    pairs = Counter((r["url"], r["alt"]) for rows in per_wat.values() for r in rows)
    paths = Counter(r["url"].split("?", 1)[0] for rows in per_wat.values() for r in rows)  # what the server 503s
    # scenario 7: the URL+alt pair that spans WAT files 1 and 2 (its first copy is in an old shard)
    spanning = {(r["url"], r["alt"]) for r in per_wat[1]} & {(r["url"], r["alt"]) for r in per_wat[2]}
    assert spanning, "the fixture crawl links a duplicate across WAT files"
    state.dup_url = sorted(spanning)[0][0]
    # scenario 4: English captions, good images, all in the first WAT file, each the only link to its path
    # (the crawl re-captions some pictures under a ?ref= URL, which the server would 503 too)
    state.retry_urls = {
        url for url, alt in sorted(pairs)
        if paths[url.split("?", 1)[0]] == 1 and (alt or "").startswith("a photo of a") and _good_image(work, url)
        and url in {r["url"] for r in per_wat[0]} and url != state.dup_url
    }
    state.retry_urls = set(sorted(state.retry_urls)[:3])
    assert len(state.retry_urls) == 3
    state.serve_unavailable(state.retry_urls | {state.dup_url})
    try:
        state.state["first"] = state.run_dag()
        yield state
    finally:
        env.stop()


def assert_each_candidate_once(crawl: Crawl) -> int:
    """Funnel, lineage and every subset count each candidate of the current plan exactly once."""
    lineage, root = crawl.lineage(), crawl.root
    runs = lineage.runs(SNAP)
    done = Counter((r["stage"], r["shard_id"]) for r in runs if r["status"] == "done")
    assert max(done.values()) == 1, done
    ctx = runner.Context(crawl.settings, SNAP)
    wat_ids = runner.spec("extract").shards(ctx)
    assert len(wat_ids) == crawl.wat_files
    candidates = 0
    for wat in wat_ids:
        with storage.local_copy(layout.candidates_uri(root, SNAP, wat)) as path:
            candidates += pq.ParquetFile(path).metadata.num_rows
    funnel: dict[str, Counter[str]] = defaultdict(Counter)
    for row in lineage.funnel(SNAP):
        funnel[row.stage][row.outcome] += row.count
    assert funnel["extract"]["kept"] == candidates > 0
    for stage in ("download", "clip", "tag", "dedup"):
        assert sum(funnel[stage].values()) == candidates, (stage, funnel[stage])
    shard_keys: list[str] = []
    for shard in crawl.shards():
        keys = crawl.table("shards", shard, ["key"]).column("key").to_pylist()
        # no shard is skipped with stale content: every output holds exactly its shard's rows
        for stage_dir in ("images", "clip", "tags", "dedup"):
            assert crawl.table(stage_dir, shard, ["key"]).column("key").to_pylist() == keys, (stage_dir, shard)
        shard_keys += keys
    assert len(shard_keys) == len(set(shard_keys)) == candidates
    from laion_tasks.stages.curate import read_manifest

    for name in SUBSETS:
        manifest = read_manifest(root, SNAP, name)
        assert manifest is not None and sum(manifest["counts"].values()) == candidates, (name, manifest)
        if manifest["status"] == "ok":
            assert len(crawl.subset_rows(name)) == manifest["counts"].get("kept", 0)
    from laion_tasks.verify import verify_snapshot

    assert [p.line() for p in verify_snapshot(crawl.settings, SNAP, lineage)] == []
    assert lineage.runs(SNAP, "verify")[-1]["status"] == "done", "the DAG's verify task passed"
    return candidates


def dedup_runs_of(shards: list[str], max_mapped_tasks: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Shard -> (its run's first position, its run's members), as the DAG batches dedup_partition."""
    out = {}
    for batch in runner.make_batches(sorted(shards), max_mapped_tasks):
        for shard in batch:
            out[shard] = (sorted(shards).index(batch[0]), tuple(batch))
    return out


def moved_shards(before: list[str], after: list[str], before_tasks: int, after_tasks: int) -> set[str]:
    """Shards whose dedup run is not the one they were partitioned in (new shards included)."""
    old, new = dedup_runs_of(before, before_tasks), dedup_runs_of(after, after_tasks)
    return {s for s in after if old.get(s) != new[s]}


def scenario_first_run_accounts_for_every_candidate(crawl: Crawl) -> None:
    assert_each_candidate_once(crawl)
    for url in crawl.retry_urls | {crawl.dup_url}:
        assert all(r["status"].startswith("http_5") for r in crawl.rows_by_url(url)[:1]), url


def scenario_1_tag_prompt_reruns_tag_and_dependents(crawl: Crawl) -> None:
    settings = crawl.settings
    sims = sorted(
        s for shard in crawl.shards()
        for s, status in zip(*crawl.table("clip", shard, ["similarity", "clip_status"]).to_pydict().values())
        # the pairs kept under the current thresholds (clip applies none: it stores the similarity)
        if s is not None and status == "scored"
        and s >= max(settings.clip.english.threshold, settings.clip.multilingual.threshold)
    )
    threshold = round(sims[len(sims) // 2], 6)  # scenario 3 rides on this run: half the kept pairs fall below
    crawl.state["threshold"] = threshold
    crawl.state["before"] = {n: len(crawl.subset_rows(n)) for n in SUBSETS}
    crawl.configure({
        "tag": {"nsfw_prompts": [*settings.tag.nsfw_prompts, "an explicit photo"]},
        "clip": {"english": {"threshold": threshold}, "multilingual": {"threshold": threshold}},
    })
    ran = crawl.run_dag()
    crawl.state["threshold_run"] = ran
    shards = set(crawl.shards())
    assert not ran["extract"] and not ran["download"] and not ran["clip"], ran
    assert ran["tag"] == shards
    assert ran["curate"] == set(SUBSETS)
    # dedup_partition decides which rows may represent a group (CLIP-kept, not hash-list blocked),
    # so the new thresholds and tags re-partition every shard; the centroids are kept
    assert ran["dedup_partition"] == shards and not ran["dedup_centroids"], ran
    assert_each_candidate_once(crawl)


def scenario_3_clip_threshold_reruns_curate_not_scoring(crawl: Crawl) -> None:
    ran, threshold = crawl.state["threshold_run"], crawl.state["threshold"]
    assert not ran["clip"], "a threshold is applied to the stored similarity, no shard is re-scored"
    assert ran["curate"] == set(SUBSETS)
    for name in ("laion2B-en", "laion2B-multi"):
        rows = crawl.subset_rows(name)
        assert all(r["similarity"] >= threshold for r in rows), name
    assert len(crawl.subset_rows("laion2B-en")) < crawl.state["before"]["laion2B-en"]


def scenario_2_execution_knobs_rerun_nothing_6_deleted_output_reruns_its_shard(crawl: Crawl) -> None:
    crawl.configure({"clip": {"batch_size": 7, "num_workers": 1}, "download": {"processes": 2, "max_concurrency": 3}})
    ctx = runner.open_context(crawl.settings, SNAP)
    for stage in list(runner.STAGE_MODULES)[:9]:
        assert runner.pending(ctx, stage) == [], stage

    # from here on every scored pair passes the CLIP filter (cosine >= -1), so which copy of a duplicate
    # group represents it (scenarios 4 and 7) does not depend on the random tiny model's scores
    crawl.configure({"clip": {"english": {"threshold": -1.0}, "multilingual": {"threshold": -1.0}}})
    victim = crawl.shards()[0]
    storage.delete(layout.clip_parquet_uri(crawl.root, SNAP, victim))
    ran = crawl.run_dag()
    assert not ran["extract"] and not ran["download"], ran
    assert ran["clip"] == {victim}, "only the shard whose output is gone is re-scored"
    assert ran["tag"] == {victim}, ran
    # the thresholds changed in the same run: eligibility is decided at partition, so every shard re-partitions
    assert ran["dedup_partition"] == set(crawl.shards()) and not ran["dedup_centroids"], ran
    assert ran["curate"] == set(SUBSETS)
    assert_each_candidate_once(crawl)


def scenario_4_retried_downloads_reach_the_subsets(crawl: Crawl) -> None:
    funnel_before = {r.outcome: r.count for r in crawl.lineage().funnel(SNAP) if r.stage == "download"}
    crawl.serve_unavailable({crawl.dup_url})  # the host is back for these URLs
    retried = {r["shard"] for url in crawl.retry_urls | {crawl.dup_url} for r in crawl.rows_by_url(url)}
    ran = crawl.run_dag(retry_failed_downloads=True)
    assert not ran["extract"]
    assert ran["download"] == retried, "only shards with retryable failures are re-fetched"
    assert ran["clip"] == ran["tag"] == ran["dedup_partition"] == retried
    assert ran["curate"] == set(SUBSETS)
    candidates = assert_each_candidate_once(crawl)
    funnel_after = {r.outcome: r.count for r in crawl.lineage().funnel(SNAP) if r.stage == "download"}
    statuses = {url: [r["status"] for r in crawl.rows_by_url(url)] for url in crawl.retry_urls}
    assert funnel_after["success"] == funnel_before["success"] + len(crawl.retry_urls), (funnel_before, funnel_after, statuses)
    assert sum(funnel_after.values()) == candidates, "a retried shard is counted once"
    en = {r["URL"] for r in crawl.subset_rows("laion2B-en")}
    for url in crawl.retry_urls:
        (row,) = crawl.rows_by_url(url)
        assert row["status"] == "success", row
        assert row["clip"]["similarity"] is not None and row["clip"]["has_embedding"], row  # scored
        assert row["tags"] is not None and row["tags"]["tag_status"] is not None, row  # tagged
        assert row["dedup"] is not None, row  # deduplicated
        qualifies = row["clip"]["language"] == "en"  # every scored pair passes the filter (scenario 6)
        if not qualifies:
            assert url not in en, url
        elif row["dedup"]["dup_reason"] is None:  # a snapshot-wide representative that qualifies
            assert url in en, url


def scenario_5_more_wat_files_extract_only_the_new_one(crawl: Crawl) -> None:
    old_plan = storage.read_text(layout.shards_manifest_uri(crawl.root, SNAP))
    old_shards = set(crawl.shards())
    old_wats = set(runner.spec("extract").shards(runner.Context(crawl.settings, SNAP)))
    crawl.serve_unavailable(set())
    crawl.wat_files = 3
    ran = crawl.run_dag()
    new_wats = set(runner.spec("extract").shards(runner.Context(crawl.settings, SNAP))) - old_wats
    assert len(new_wats) == 1 and ran["extract"] == new_wats
    new_shards = set(crawl.shards()) - old_shards
    assert new_shards and min(new_shards) > max(old_shards), "new candidates go to new shards"
    assert ran["download"] == new_shards, "existing shards keep their content and their downloads"
    assert ran["clip"] == ran["tag"] == new_shards
    tasks = crawl.settings.orchestration.max_mapped_tasks
    moved = moved_shards(sorted(old_shards), crawl.shards(), tasks, tasks)
    assert moved >= new_shards
    assert ran["dedup_partition"] == moved, "every shard whose dedup run changed is partitioned again"
    import json

    old, new = json.loads(old_plan), json.loads(storage.read_text(layout.shards_manifest_uri(crawl.root, SNAP)))
    assert {s: new["shards"][s] for s in old["shards"]} == old["shards"]
    assert_each_candidate_once(crawl)
    # scenario 7's pair: the copies in old shards failed for good, the copy in the new shard downloaded
    rows = sorted(crawl.rows_by_url(crawl.dup_url), key=lambda r: (r["key"], r["shard"]))
    assert [r["shard"] in new_shards for r in rows] == [False] * (len(rows) - 1) + [True], rows
    assert rows[0]["status"] != "success" and rows[-1]["status"] == "success", rows


def scenario_7_duplicate_pair_keeps_the_downloaded_copy(crawl: Crawl) -> None:
    rows = sorted(crawl.rows_by_url(crawl.dup_url), key=lambda r: (r["key"], r["shard"]))
    last = rows[-1]
    assert last["dedup"]["dup_reason"] is None, ("the downloaded copy represents the pair, not the failed one",
                                                 [(r["shard"], r["key"], r["status"], r["dedup"]) for r in rows])
    kept = [r for r in crawl.subset_rows("laion2B-en") if r["URL"] == crawl.dup_url]
    qualifies = last["clip"]["language"] == "en"  # every scored pair passes the filter (scenario 6)
    assert len(kept) == (1 if qualifies else 0), (qualifies, kept)


def scenario_8_fewer_mapped_tasks_regroup_dedup_runs_without_losing_a_shard(crawl: Crawl) -> None:
    """Issue 18: a changed max_mapped_tasks moves shards into other dedup runs; each moved shard is
    partitioned again and no downloaded row is left out of dedup (verify checks the verdicts)."""
    before = crawl.settings.orchestration.max_mapped_tasks
    crawl.configure({"orchestration": {"max_mapped_tasks": 2}})
    moved = moved_shards(crawl.shards(), crawl.shards(), before, 2)
    assert moved, "the new batching moves some shards"
    ran = crawl.run_dag()
    assert not ran["download"] and not ran["clip"] and not ran["tag"], ran
    assert ran["dedup_partition"] == moved, ran
    assert ran["dedup"] == {"resolve"}
    assert_each_candidate_once(crawl)
    work = Path(storage.local_path(storage.join(layout.snapshot_root(crawl.root, SNAP), "dedup_work", "runs")))
    assert len(list(work.glob("*.rows.parquet"))) == 2, "the old grouping's run files are removed"


# Each scenario builds on the state the ones before it left (one crawl, changed step by step). A test
# runs the scenarios it depends on first when they have not run, so any one test, alone or in any
# order, checks the same thing as the whole file in order.
SCENARIOS = [scenario_first_run_accounts_for_every_candidate, scenario_1_tag_prompt_reruns_tag_and_dependents, scenario_3_clip_threshold_reruns_curate_not_scoring, scenario_2_execution_knobs_rerun_nothing_6_deleted_output_reruns_its_shard, scenario_4_retried_downloads_reach_the_subsets, scenario_5_more_wat_files_extract_only_the_new_one, scenario_7_duplicate_pair_keeps_the_downloaded_copy, scenario_8_fewer_mapped_tasks_regroup_dedup_runs_without_losing_a_shard]


def reach(crawl: Crawl, scenario) -> None:  # type: ignore[no-untyped-def]
    """Run every scenario up to and including ``scenario`` that has not run on this crawl yet."""
    done = crawl.state.setdefault("scenarios_done", [])
    for step in SCENARIOS[: SCENARIOS.index(scenario) + 1]:
        if step.__name__ not in done:
            step(crawl)
            done.append(step.__name__)


def test_first_run_accounts_for_every_candidate(crawl: Crawl) -> None:
    reach(crawl, scenario_first_run_accounts_for_every_candidate)


def test_1_tag_prompt_reruns_tag_and_dependents(crawl: Crawl) -> None:
    reach(crawl, scenario_1_tag_prompt_reruns_tag_and_dependents)


def test_3_clip_threshold_reruns_curate_not_scoring(crawl: Crawl) -> None:
    reach(crawl, scenario_3_clip_threshold_reruns_curate_not_scoring)


def test_2_execution_knobs_rerun_nothing_6_deleted_output_reruns_its_shard(crawl: Crawl) -> None:
    reach(crawl, scenario_2_execution_knobs_rerun_nothing_6_deleted_output_reruns_its_shard)


def test_4_retried_downloads_reach_the_subsets(crawl: Crawl) -> None:
    reach(crawl, scenario_4_retried_downloads_reach_the_subsets)


def test_5_more_wat_files_extract_only_the_new_one(crawl: Crawl) -> None:
    reach(crawl, scenario_5_more_wat_files_extract_only_the_new_one)


def test_7_duplicate_pair_keeps_the_downloaded_copy(crawl: Crawl) -> None:
    reach(crawl, scenario_7_duplicate_pair_keeps_the_downloaded_copy)


def test_8_fewer_mapped_tasks_regroup_dedup_runs_without_losing_a_shard(crawl: Crawl) -> None:
    reach(crawl, scenario_8_fewer_mapped_tasks_regroup_dedup_runs_without_losing_a_shard)
