"""One runner for every stage: plan, batch, skip-or-run, record.

Each stage declares itself once, in its own module, as a :class:`StageSpec`: its name,
the upstream stages it reads, the config fields that change its results, the object
that commits its output and the function that runs it on one shard. This module does
the rest for all of them, and the DAG tasks, every ``laion`` stage command, the GPU pods
and the tests are thin doors onto it: a command on files it names passes them as context
options (``Context.uri``), and only this module builds a :class:`StageRun`.

Skip key: a shard is reused when its current done run in lineage has the same
(stage, shard, digest of the result fields, digest of the exact upstream outputs read)
and its commit object still exists. Upstream outputs are identified by the id of the
run that wrote them (inputs from outside the pipeline, such as a WAT file or a
download shard cut by the plan, by their URI or checksum; input files named in the
config, such as hash lists, by their content: sha256 or S3 ETag), so a stage re-runs
exactly when its inputs or its knobs changed, and its dependents follow because their
inputs changed. Execution-only knobs (``stage.EXECUTION_ONLY``: processes, batch sizes,
pools, pod resources) are never result fields, so changing them re-runs nothing;
``tests/test_result_fields.py`` checks every field each stage reads against these lists.

A batch keeps going past a shard that fails, then raises one error naming every
failed shard, so a retry only redoes those (the rest are recorded done).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

from laion_tasks import layout, progress, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage
from laion_tasks.stage import STAGE_MODULES, Context, ShardStats, StageError, StageSpec, file_identity

log = logging.getLogger(__name__)

Batch = dict[str, Any]
T = TypeVar("T")

class BatchError(StageError):
    """Some shards of a batch failed; the others are recorded done."""

    def __init__(self, message: str, failures: dict[str, str] | None = None, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}
        """Failed shard id -> its error (input URI, exception type and message)."""
        self.report = report or {}
        """The batch's report over the shards that did not fail (counts, done, skipped)."""


@dataclass(frozen=True)
class StageRun:
    """Identity of one stage execution on one shard: its skip key plus where it reads and writes."""

    snapshot: str
    stage: str
    shard_id: str
    input_uri: str
    config_digest: str
    inputs_digest: str | None = None
    """Digest of the exact upstream outputs read (their checksums or run ids); None: no upstream."""
    output_uri: str | None = None
    """The object that commits the output; checked to exist before a done run is reused."""


def is_reusable(record: dict[str, Any] | None, run: StageRun, output_exists: Callable[[str], bool] | None) -> bool:
    """A done run can stand for ``run``: same knobs, same inputs, the same commit object, still there.

    A record without any output URI, or with no way to check it, is never trusted.
    """
    if record is None or record["config_digest"] != run.config_digest:
        return False
    if (record.get("inputs_digest") or None) != (run.inputs_digest or None):
        return False
    if run.output_uri and record.get("output_uri") and record["output_uri"] != run.output_uri:
        return False  # it committed another object (a dedup run of another grouping): not this run's output
    out = run.output_uri or record.get("output_uri")
    return bool(out) and output_exists is not None and output_exists(out)


def run_stage(
    lineage: Lineage | None,
    run: StageRun,
    fn: Callable[[], ShardStats],
    *,
    force: bool = False,
    output_exists: Callable[[str], bool] | None = None,
) -> tuple[ShardStats | None, bool]:
    """Run ``fn`` for one shard unless its current done run has the same skip key and output.

    Returns ``(stats, skipped)``. A done record whose output has vanished is not
    trusted: the shard runs again. Failures are recorded with their error and re-raised.
    """
    if lineage is None:
        return fn().done(), False
    if not force and is_reusable(lineage.current_record(run.snapshot, run.stage, run.shard_id), run, output_exists):
        return None, True
    run_id = lineage.start(run.snapshot, run.stage, run.shard_id, run.input_uri, run.config_digest, run.inputs_digest)
    try:
        stats = fn().done()
    except BaseException as exc:
        lineage.fail(run_id, f"{type(exc).__name__}: {exc}")
        raise
    if run.output_uri is not None:
        stats.output_uri = run.output_uri  # the declared commit object: what a later skip checks

    lineage.finish(run_id, stats)
    return stats, False


def spec(name: str) -> StageSpec:
    """The declaration of a stage, from its module."""
    try:
        module = importlib.import_module(STAGE_MODULES[name])
    except KeyError:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(STAGE_MODULES)}") from None
    specs = getattr(module, "SPECS", None) or {module.SPEC.name: module.SPEC}
    return specs[name]


def make_batches(items: Sequence[T], max_batches: int) -> list[list[T]]:
    """Split items into at most ``max_batches`` contiguous, near-equal batches (stable order)."""
    if not items:
        return []
    size = math.ceil(len(items) / max(1, max_batches))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def open_context(settings: Settings, snapshot: str, *, lineage: bool = True, **options: Any) -> Context:
    storage.configure(settings.storage)
    progress.configure(settings.orchestration.progress_interval_s)
    db = None
    if lineage:
        db = Lineage(settings.lineage.url)
        db.ensure_snapshot(snapshot, layout.snapshot_root(settings.storage.root, snapshot), settings.digest())
    return Context(settings, snapshot, db, options)


def plan(ctx: Context, name: str) -> list[Batch]:
    """Plan a stage (write its manifest where it has one) and return range batches over its shards.

    A batch is ``{"start": i, "stop": j}`` into the plan's shard list: XCom carries no ids.
    """
    stage = spec(name)
    shard_ids = stage.plan(ctx) if stage.plan else stage.shards(ctx)
    if stage.plan and ctx.lineage is not None:
        retire(ctx, stage, set(shard_ids))
    batches = make_batches(range(len(shard_ids)), ctx.settings.orchestration.max_mapped_tasks)
    return [{"start": b[0], "stop": b[-1] + 1} for b in batches]


def retire(ctx: Context, planner: StageSpec, keep: set[str]) -> None:
    """Shards that left a plan: retire their lineage runs and delete their commit objects,
    so no count and no reader (curate globs each stage's directory) sees them again.

    Stages on the same plan only ever run on shards the planner planned, so when none of
    the planner's own shards left, there is nothing to do (and no other stage module is imported).
    """
    assert ctx.lineage is not None
    if not {r["shard_id"] for r in ctx.lineage.current_runs(ctx.snapshot, [planner.name])} - keep:
        return
    stages = [s for s in (spec(n) for n in STAGE_MODULES) if s.plan_name == planner.plan_name]
    for stage in stages:
        gone = {r["shard_id"] for r in ctx.lineage.current_runs(ctx.snapshot, [stage.name])} - keep
        for shard in sorted(gone):
            uri = stage.output(ctx, shard)
            if storage.exists(uri):
                storage.delete(uri)
        if gone:
            log.info("%s: %d shard(s) left the plan; their runs are superseded", stage.name, len(gone))
            ctx.lineage.supersede(ctx.snapshot, [stage.name], keep)


def batch_shards(ctx: Context, stage: StageSpec, batch: Batch) -> list[str]:
    """The shard ids a batch names: explicit ``shards``, or a ``start``/``stop`` range of the plan."""
    if "shards" in batch:
        return list(batch["shards"])
    return stage.shards(ctx)[batch.get("start", 0) : batch.get("stop")]


def _upstream_identity(ctx: Context, stage: StageSpec, shard: str, current: dict[str, list[dict[str, Any]]]) -> list[str]:
    """``stage:shard:run-id`` of every upstream output this shard reads (plus external inputs and input files)."""
    named = ctx.options.get("inputs")
    if named:  # files named on the command line: by URI and content, whatever lineage holds upstream
        return [f"{role}:{uri}:{_named_identity(ctx, uri)}" for role, uri in sorted(named.items())] + stage.input_file_identities(ctx)
    parts: list[str] = []
    for upstream in stage.reads:
        same_plan = spec(upstream).plan_name == stage.plan_name and bool(stage.plan_name)
        runs = current.get(upstream, [])
        if same_plan:
            runs = [r for r in runs if r["shard_id"] == shard]
            if not runs:
                parts.append(f"{upstream}:{shard}:missing")
        parts.extend(f"{upstream}:{r['shard_id']}:{r['id']}" for r in runs)
    if stage.external_inputs is not None:
        parts.append(stage.external_inputs(ctx, shard))
    parts.extend(stage.input_file_identities(ctx))  # hash lists: by content, not by path
    return parts


def _named_identity(ctx: Context, uri: str) -> str:
    """An input file named on the command line: its content (sha256, S3 ETag). Not read for an http(s)
    URI (a crawl's published WAT file: its URI is its identity), nor without lineage (no key is compared).
    A file that cannot be read is keyed as such: the stage then fails on it, and lineage records why."""
    if ctx.lineage is None or storage.is_http(uri):
        return "-"
    try:
        return file_identity(ctx, uri)
    except StageError:
        return "unreadable"


def inputs_digest(ctx: Context, stage: StageSpec, shard: str, current: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """Digest of the exact upstream outputs one shard of ``stage`` reads (the current generation)."""
    if current is None:
        current = _current_upstream(ctx, stage)
    blob = json.dumps(_upstream_identity(ctx, stage, shard, current)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _current_upstream(ctx: Context, stage: StageSpec) -> dict[str, list[dict[str, Any]]]:
    if ctx.lineage is None or not stage.reads:
        return {}
    current: dict[str, list[dict[str, Any]]] = {}
    for run in ctx.lineage.current_runs(ctx.snapshot, stage.reads):
        current.setdefault(run["stage"], []).append(run)
    return current


def stage_run(ctx: Context, stage: StageSpec, shard: str, current: dict[str, list[dict[str, Any]]] | None = None) -> StageRun:
    """The skip key and URIs of one shard of a stage."""
    return StageRun(
        ctx.snapshot,
        stage.name,
        shard,
        stage.input_uri(ctx, shard) if stage.input_uri else layout.snapshot_root(ctx.root, ctx.snapshot),
        stage.config_digest(ctx.settings, shard),
        inputs_digest(ctx, stage, shard, current),
        stage.output(ctx, shard),
    )


def pending(ctx: Context, name: str, shard_ids: Iterable[str] | None = None) -> list[str]:
    """The shards of a stage that a run would execute now (its skip key or output changed)."""
    stage = spec(name)
    current = _current_upstream(ctx, stage)
    out = []
    for shard in stage.shards(ctx) if shard_ids is None else shard_ids:
        run = stage_run(ctx, stage, shard, current)
        record = ctx.lineage.current_record(ctx.snapshot, name, shard) if ctx.lineage else None
        if (stage.must_run and stage.must_run(ctx, shard)) or not is_reusable(record, run, storage.output_exists):
            out.append(shard)
    return out


@dataclass
class BatchResult:
    counts: Counter[str] = field(default_factory=Counter)
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "done": self.done, "skipped": self.skipped, "failed": self.failed}


def run_batch(ctx: Context, name: str, batch: Batch, *, force: bool = False, details: bool = False) -> dict[str, Any]:
    """Run one stage on a batch of shards: skip what is current, run and record the rest.

    ``details`` adds every shard's stats (``shards``); DAG tasks leave it off, as XCom carries no per-shard data.
    """
    stage = spec(name)
    current = _current_upstream(ctx, stage)
    result = BatchResult()
    errors: list[str] = []
    for shard in batch_shards(ctx, stage, batch):
        run = stage_run(ctx, stage, shard, current)
        try:
            must = force or bool(stage.must_run and stage.must_run(ctx, shard))
            stats, skipped = run_stage(
                ctx.lineage, run, lambda shard=shard: stage.run_shard(ctx, shard), force=must, output_exists=storage.output_exists
            )
        except Exception as exc:  # noqa: BLE001 - recorded in lineage, reported below
            log.error("%s failed on shard %s (%s): %s", name, shard, run.input_uri, exc)
            result.failed.append(shard)
            errors.append(f"{shard} ({run.input_uri}): {type(exc).__name__}: {exc}")
            continue
        if skipped:
            result.skipped += 1
            result.shards[shard] = {"skipped": True}
            log.info("%s: shard %s is current (knobs %s, inputs %s), skipped", name, shard, run.config_digest, run.inputs_digest)
        else:
            assert stats is not None
            result.done += 1
            result.counts.update(stats.counts)
            result.shards[shard] = stats.to_dict()
            log.info("%s: shard %s done: %s", name, shard, dict(stats.counts))
    if errors:
        raise BatchError(
            f"{name}: {len(errors)} shard(s) failed (others recorded done):\n" + "\n".join(errors),
            failures=dict(zip(result.failed, errors)),
            report=result.to_dict(),
        )
    report = result.to_dict()
    if details:
        report["shards"] = result.shards
    if stage.after_batch is not None:
        report.update(stage.after_batch(ctx, result.shards))
    return report


def run(
    settings: Settings,
    snapshot: str,
    name: str,
    batch: Batch | None = None,
    *,
    force: bool = False,
    details: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Plan-free entry: run a stage on a batch (default: every shard of its current plan)."""
    ctx = open_context(settings, snapshot, **options)
    try:
        return run_batch(ctx, name, batch if batch is not None else {"start": 0, "stop": None}, force=force, details=details)
    finally:
        ctx.close()


def run_all(settings: Settings, snapshot: str, stages: Sequence[str], *, force: bool = False, **options: Any) -> dict[str, Any]:
    """Plan and run stages in order in this process (the CLI's and tests' whole-snapshot path)."""
    ctx = open_context(settings, snapshot, **options)
    report: dict[str, Any] = {}
    try:
        for name in stages:
            batches = plan(ctx, name)
            results = [run_batch(ctx, name, b, force=force) for b in batches]
            report[name] = {
                "done": sum(r["done"] for r in results),
                "skipped": sum(r["skipped"] for r in results),
                "counts": dict(sum((Counter(r["counts"]) for r in results), Counter())),
            }
    finally:
        ctx.close()
    return report


UNRECORDED = "-"
"""The snapshot of a command's run that no snapshot holds (``laion extract WAT OUT`` without ``--snapshot``):
nothing is recorded, and every file it reads or writes is named, so no layout path is derived from it."""


def run_on_files(
    settings: Settings,
    snapshot: str | None,
    name: str,
    shard: str,
    *,
    inputs: dict[str, str],
    outputs: dict[str, str],
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """One shard of a stage on files named on the command line (``laion extract WAT OUT``): the stage's own
    run, its files passed as context options (``Context.uri``), its inputs keyed by content; recorded in
    lineage under ``snapshot`` when one is given. Returns the shard's stats, or ``{"skipped": True}``."""
    try:
        report = run(settings, snapshot or UNRECORDED, name, {"shards": [shard]}, force=force, details=True,
                     lineage=snapshot is not None, inputs=inputs, outputs=outputs, **options)
    except BatchError as exc:  # the one shard: its error alone
        raise StageError(f"{name}: {' '.join(exc.failures.values())}") from exc
    return dict(report["shards"][shard])


def plan_only(settings: Settings, snapshot: str | None, name: str, **options: Any) -> list[str]:
    """Plan a stage and run nothing (``laion regroup``: the download plan on named files); its shard ids.
    Without a snapshot nothing is recorded or retired."""
    ctx = open_context(settings, snapshot or UNRECORDED, lineage=snapshot is not None, **options)
    try:
        plan(ctx, name)
        return spec(name).shards(ctx)
    finally:
        ctx.close()


def run_one(
    settings: Settings,
    snapshot: str | None,
    name: str,
    shard: str,
    fn: Callable[[], ShardStats],
    *,
    input_uri: str,
    output_uri: str,
    identity: Sequence[str] = (),
    force: bool = False,
) -> tuple[ShardStats | None, bool]:
    """A stage's run on what a command's options name, outside its plan (``laion train --subset-dir``,
    ``laion eval zeroshot``), keyed, skipped and recorded as a planned shard is: the stage's knobs
    (``settings`` carries the command's overrides) and ``identity`` (the named inputs, a model, a seed).
    Without a snapshot it just runs. Returns ``(stats, skipped)``."""
    digest = hashlib.sha256(json.dumps(list(identity)).encode()).hexdigest()[:16] if identity else None
    run = StageRun(snapshot or UNRECORDED, name, shard, input_uri, spec(name).config_digest(settings, shard), digest, output_uri)
    if snapshot is None:
        return run_stage(None, run, fn)
    ctx = open_context(settings, snapshot)
    try:
        return run_stage(ctx.lineage, run, fn, force=force, output_exists=storage.output_exists)
    finally:
        ctx.close()


def stage_env(settings: Settings, stage: StageSpec) -> dict[str, str]:
    """``LAION_*`` variables that rebuild, inside a pod, everything one stage's results depend on.

    The stage's own section whole (its execution knobs too), and each result field outside
    that section, so the pod computes the same skip key as the scheduler and no knob can be
    forgotten. Storage and credentials are the pod builder's business (``dags/laion_common``).
    """
    env: dict[str, str] = {}
    sections = {stage.section} if stage.section else set()
    for section in sorted(sections):
        env[f"LAION_{section.upper()}"] = json.dumps(getattr(settings, section).model_dump(mode="json"), sort_keys=True)
    keyed = (*stage.result_fields, *stage.input_files)
    fields = [f.split(".{shard}", 1)[0] for f in keyed if f.split(".", 1)[0] not in sections]
    for path, value in settings.knobs(fields).items():
        env["LAION_" + "__".join(p.upper() for p in path.split("."))] = json.dumps(value)
    return env
