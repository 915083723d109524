"""Render "what a change re-runs" (docs/RERUN.md) from the stage declarations themselves.

Each stage's skip key holds its ``result_fields`` and the content of its ``input_files``; a stage also
re-runs when an upstream output it reads changed (``reads``). So a knob re-runs the stages that key it
and, transitively, every stage that reads them. Run: ``python -m laion_tasks.rerun_table > docs/RERUN.md``.
"""

from __future__ import annotations

import sys

from laion_tasks.stage import EXECUTION_ONLY, STAGE_MODULES, StageSpec


EVENTS = (
    ("`extract.max_wat_files` / `sample_wat_files` grows",
     "extract of the new WAT files only; their candidates go to new download shards (existing shards keep their "
     "content); those shards through download, clip, tag; the dedup runs whose shards changed are partitioned "
     "again; then dedup buckets, resolve, curate"),
    ("a WAT file or candidates file changes or disappears",
     "the download plan is recut; each download shard whose content changed (its checksum is in the skip key) "
     "and its dependents"),
    ("a hash list edited in place or replaced (keyed by content: sha256, or the S3 ETag)",
     "tag of every shard, which re-checks every row against the current lists, then its dependents; never a "
     "re-download"),
    ("`orchestration.max_mapped_tasks` changes", "dedup_partition of the shards whose dedup run changed, then dedup"),
    ("`retry_failed_downloads` (a run Param)",
     "download of the shards with retryable failures, then their clip, tag and dedup partition; dedup, curate"),
    ("a deleted output (a file, or every file of an output directory / S3 prefix)",
     "that shard of that stage, then its dependents"),
)
"""What re-runs on a change that is not a config knob (the skip key's inputs half)."""


def _specs() -> list[StageSpec]:
    from laion_tasks import runner

    return [runner.spec(name) for name in STAGE_MODULES]


def dependents(specs: list[StageSpec], names: set[str]) -> list[str]:
    """``names`` and every stage that reads one of them, transitively, in pipeline order."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for spec in specs:
            if spec.name not in out and out & set(spec.reads):
                out.add(spec.name)
                changed = True
    return [s.name for s in specs if s.name in out]


def _cell(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"`{i}`" for i in items) or "—"


def render() -> str:
    specs = _specs()
    lines = [
        "# What a change re-runs",
        "",
        "Generated from the stages' declarations (`StageSpec` in each stage module) by",
        "`python -m laion_tasks.rerun_table > docs/RERUN.md`; `tests/test_config.py` keeps it current.",
        "",
        "A shard re-runs when its skip key changed: the stage's result knobs, the content of its input files,",
        "or the exact upstream outputs it reads (so its readers follow). A shard whose commit object is missing",
        "re-runs too. Execution-only knobs re-run nothing.",
        "",
        "## Per stage",
        "",
        "| stage | result knobs | input files (by content) | reads | runs after |",
        "|---|---|---|---|---|",
    ]
    for spec in specs:
        lines.append(
            f"| {spec.name} | {_cell(spec.result_fields)} | {_cell(spec.input_files)} | {_cell(spec.reads)} | {_cell(spec.after)} |"
        )
    knobs: dict[str, set[str]] = {}
    for spec in specs:
        for field in (*spec.result_fields, *spec.input_files):
            knobs.setdefault(field, set()).add(spec.name)
    lines += ["", "## Per knob", "", "| knob | keyed by | re-runs |", "|---|---|---|"]
    for knob in sorted(knobs):
        keyed = [s.name for s in specs if s.name in knobs[knob]]
        lines.append(f"| `{knob}` | {_cell(keyed)} | {_cell(dependents(specs, knobs[knob]))} |")
    lines += ["", "## Events that are not knobs", "", "| event | re-runs |", "|---|---|"]
    lines += [f"| {event} | {effect} |" for event, effect in EVENTS]
    lines += ["", "## Re-run nothing", "", "Execution-only knobs (with why, in `laion_tasks/stage.py`):", ""]
    lines += [f"- `{knob}`" for knob in sorted(EXECUTION_ONLY)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
