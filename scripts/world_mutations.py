"""Break one stage on purpose and show that the world checks catch it (issue #20's "Done when").

Runs the demo pipeline through the runner (no Airflow: the checks, not the scheduler, are under test)
on the fixture crawl with the world model, with one mutation patched into this process, then measures
the run against the crawl's planted truth (``tests/world_checks.py``) and prints every missed bar:

  none      no mutation: every bar must hold
  shuffle   captions shuffled within a shard before CLIP (the clip stage reads the download Parquet)
  shift     image embedding rows shifted by one before tag (tag reads the clip stage's embeddings)
  idmap     the kNN index's id map off by one (the metadata row of id i is the row of id i+1)

    .venv/bin/python scripts/world_mutations.py none shuffle shift idmap

Exit status 0 when ``none`` passes and every mutation fails at least one bar. The world model is the
cached one (trained first when missing: about 2.5 minutes, 3.4 CPU-minutes, on a 2-core machine).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTATIONS = ("none", "shuffle", "shift", "idmap")
STAGES = ["extract", "download", "clip", "tag", "dedup_centroids", "dedup_partition", "dedup_bucket", "dedup",
          "curate", "index", "train", "eval"]


def _patch(mutation: str) -> None:
    """Patch the named defect into this process's stage code."""
    import numpy as np

    if mutation == "shuffle":
        from laion_tasks.stages.clip import encode

        read = encode._read_inputs

        def shuffled(uri: str):  # type: ignore[no-untyped-def]
            inputs = read(uri)
            random.Random(0).shuffle(inputs.captions)
            return inputs

        encode._read_inputs = shuffled
    elif mutation == "shift":
        from laion_tasks.stages import tag

        load = tag._load_embeddings

        def shifted(rows, clip_table, uri):  # type: ignore[no-untyped-def]
            emb, has = load(rows, clip_table, uri)
            return np.roll(emb, 1, axis=0), has

        tag._load_embeddings = shifted
    elif mutation == "idmap":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from laion_tasks.stages import index

        write = index._write_metadata

        def off_by_one(con, clip_paths, subset_paths, out_path, row_group_size, stats):  # type: ignore[no-untyped-def]
            n = write(con, clip_paths, subset_paths, out_path, row_group_size, stats)
            # what a search shows for id i (URL, caption, scores) becomes id i+1's; the columns that say
            # which embedding id i is (_shard, _row) stay, so the vectors are added as before
            table = pq.read_table(out_path)
            order = pa.array([(i + 1) % table.num_rows for i in range(table.num_rows)])
            fixed = {"id", "_shard", "_row"}
            shown = [c for c in table.column_names if c not in fixed]
            rotated = table.select(shown).take(order)
            for name in [c for c in table.column_names if c in fixed]:
                rotated = rotated.append_column(name, table.column(name))
            pq.write_table(rotated.select(table.column_names), out_path, row_group_size=row_group_size)
            return n

        index._write_metadata = off_by_one
    elif mutation != "none":
        raise SystemExit(f"unknown mutation {mutation!r}: one of {', '.join(MUTATIONS)}")


def run_one(mutation: str, work: Path) -> list[str]:
    """One pipeline run with ``mutation`` patched in; the bars it misses."""
    from laion_tasks import demo, runner, storage
    from laion_tasks.card import write_dataset_card
    from laion_tasks.config import load_settings
    from laion_tasks.fixtures.world_model import ensure_world_model
    from laion_tasks.fixtures.world_report import measure
    from laion_tasks.lineage import Lineage
    from tests.world_checks import world_failures

    _patch(mutation)
    env = demo.prepare(work, world=ensure_world_model(), n_wat=2, pages_per_wat=6)
    try:
        settings = load_settings(env.config_path, environ={})
        storage.configure(settings.storage)
        runner.run_all(settings, demo.DEMO_CRAWL, STAGES,
                       wat_paths_uri=f"{env.base_url}crawl-data/{demo.DEMO_CRAWL}/wat.paths.gz")
        # the train -> eval DAG's last task: the card (where the safety check reads punsafe's source)
        write_dataset_card(settings.storage.root, demo.DEMO_CRAWL, Lineage(settings.lineage.url), config=settings.curate,
                           clip=settings.clip)
        english = settings.clip.english
        report = measure(settings, demo.DEMO_CRAWL, env.truth_path, env.crawl_dir, english.model, english.checkpoint)
        print("\n".join(report.lines()))
        return world_failures(report)
    finally:
        env.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutations", nargs="*", help=f"any of {', '.join(MUTATIONS)} (default: all four)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one mutation
    args = parser.parse_args()
    args.mutations = args.mutations or list(MUTATIONS)
    unknown = [m for m in args.mutations if m not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}: choose from {', '.join(MUTATIONS)}")
    if args.one:
        with tempfile.TemporaryDirectory(prefix="laion-mutation-") as tmp:
            failures = run_one(args.mutations[0], Path(tmp))
        print(f"[{args.mutations[0]}] missed bars: {len(failures)}")
        print("\n".join(f"  {line}" for line in failures))
        raise SystemExit(1 if failures else 0)
    ok = True
    for mutation in args.mutations:  # one process each: a patch must not leak into the next run
        print(f"== {mutation}", flush=True)
        code = subprocess.run([sys.executable, __file__, "--one", mutation], cwd=REPO, check=False,
                              stdin=subprocess.DEVNULL).returncode
        caught = code != 0
        ok &= caught == (mutation != "none")
        print(f"== {mutation}: {'caught' if caught else 'all bars hold'}"
              f"{'' if caught == (mutation != 'none') else '  <-- unexpected'}", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
