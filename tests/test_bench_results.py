"""bench/RESULTS.md and docs/SCALE.md are what bench/collect_results.py makes of bench/results/*.json.

The recorded runs are the record; the two Markdown files are derived. These tests fail when either file
was edited by hand or left stale after a JSON change, and check that a target is only called met when
the recorded figure meets it (issue 21: headlines had claimed more than the runs showed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_generator():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("collect_results", REPO / "bench" / "collect_results.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["collect_results"] = module
    spec.loader.exec_module(module)
    return module


cr = _load_generator()

MACHINE = {"cpus": 2, "arch": "x86_64", "mem_gib": 24, "gpu": None, "shared": True, "load": "1.0 at the end"}


def write(tmp: Path, name: str, runs: list[dict], **extra: object) -> None:
    (tmp / f"{name}.json").write_text(json.dumps({"bench": name, "title": name, "runs": runs, **extra}))


def headline(text: str, figure: str) -> str:
    """The headline table row whose figure column contains ``figure``."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and figure in line]
    assert rows, f"no headline row with {figure!r}"
    return rows[0]


def verdict_cell(row: str) -> str:
    return [c.strip() for c in row.strip("|").split("|")][6]


# ---------------------------------------------------------------- the committed files


@pytest.mark.parametrize("name", ["RESULTS.md", "SCALE.md", "README.md"])
def test_generated_file_matches_recorded_runs(name: str) -> None:
    expected = {path.name: (path, text) for path, text in cr.outputs().items()}
    path, text = expected[name]
    assert path.read_text() == text, (
        f"{path.relative_to(REPO)} differs from what bench/collect_results.py makes of bench/results/*.json: "
        "run `.venv/bin/python bench/collect_results.py` (and never edit the file by hand)"
    )


def test_readme_headlines_name_every_missed_target(tmp_path: Path) -> None:
    """The README's generated block counts the targets per stage and names each one not met, with its figure."""
    write(tmp_path, "clip", [{
        "label": "latest GPU", "date": "2026-12-04", "machine": {**MACHINE, "gpu": "1 x H200"},
        "settings": {"model": "ViT-B-32"},
        "ours": {"pairs_per_s": 2000.0, "seconds": 10, "load_s": 1, "rounds_pairs_per_s": [2000.0]},
        "peer": {"name": "clip-retrieval", "pairs_per_s": 900.0, "seconds": 22, "load_s": 1, "rounds_pairs_per_s": [900.0]},
    }])
    block = cr.render_readme_headlines(cr.load_records(tmp_path))
    assert block.startswith(cr.README_BEGIN) and block.endswith(cr.README_END)
    assert "- **clip**: 1 of 2 targets met; not met: pairs/s on 1 x H200: 2,000 (target >= 5,000 pairs/s)." in block
    with pytest.raises(ValueError, match="missing"):
        cr.readme_with_headlines("# no block here\n", cr.load_records(tmp_path))


def test_every_recorded_run_states_date_and_machine() -> None:
    records = cr.load_records()
    assert records, "bench/results/*.json holds no record"
    for name, record in records.items():
        for run in record["runs"]:
            assert run["date"] and run["machine"].get("cpus"), f"{name}: run {run.get('label')} without date/machine"
    text = cr.RESULTS_MD.read_text()
    for name, record in records.items():
        for run in record["runs"]:
            assert f"Measured {run['date']} on a {cr.describe_machine(run['machine'])}." in text


def test_no_markdown_left_as_a_record() -> None:
    assert not list((REPO / "bench" / "results").glob("*.md")), "bench/results/ keeps JSON only; RESULTS.md is derived"


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("value", "op", "threshold", "expected"),
    [
        (0.9478, ">=", 0.95, "**not met**"),
        (0.95, ">=", 0.95, "met"),
        (0.96, ">=", 0.95, "met"),
        (18_416, ">=", 20_000, "**not met**"),
        (5.8, "<", 20, "met"),
        (20.0, "<", 20, "**not met**"),
        (False, "==", True, "**not met**"),
        (True, "==", True, "met"),
        (-0.02, ">", 0.0, "**not met**"),
        (None, ">=", 0.95, "not measured"),
        (float("nan"), ">=", 0.95, "not measured"),
    ],
)
def test_verdict_is_met_only_when_the_figure_meets_the_target(value: object, op: str, threshold: object,
                                                               expected: str) -> None:
    assert cr.verdict(value, cr.Target(op, threshold, "t")) == expected


def test_unknown_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="operator"):
        cr.Target("~=", 1, "t")


def test_rendered_met_claims_follow_the_figures(tmp_path: Path) -> None:
    """Rows built from recorded figures: the recall below target and the slower language ID say not met."""
    entry = {"seconds": 10.0, "cpu_seconds": 66.0, "steps": {}, "vmhwm_kb": 1_000_000, "anon_peak_kb": 500_000,
             "recall_exact": 1.0, "recall_near": 0.9478, "precision": 1.0}
    write(tmp_path, "dedup", [{"date": "2026-12-01", "machine": MACHINE,
                               "settings": {"memory_limit": "4GB", "threshold": 0.95, "near_cosine": [0.972, 0.995]},
                               "results": [{"rows": 1_000_000, "ours": entry},
                                           {"rows": 4_000_000, "ours": {**entry, "cpu_seconds": 280.0,
                                                                        "recall_near": 0.9574}}]}])
    langid = {"date": "2026-12-01", "machine": MACHINE,
              "test_set": {"name": "lingua", "independent": False, "tuned_on": "samples of it"},
              "sets": {"sentences": {"n": 10, "detectors": {"hybrid": {"acc": 0.896, "acc_common": 0.911, "rate": 1.0},
                                                             "cld3": {"acc": 0.882, "acc_common": 0.931, "rate": 1.0}}},
                       "word-pairs": {"n": 10, "detectors": {"hybrid": {"acc": 0.69, "acc_common": 0.729, "rate": 1.0},
                                                              "cld3": {"acc": 0.63, "acc_common": 0.673, "rate": 1.0}}}},
              "alt_text": {"name": "alt", "n": 10, "median_chars": 48, "deferred_to_lingua": 0.1,
                           "rate": {"hybrid": 18_416, "cld3": 17_851}}}
    write(tmp_path, "langid", [langid])
    text = cr.render_results(cr.load_records(tmp_path))
    assert verdict_cell(headline(text, "near recall, 1M rows")) == "**not met**"
    assert verdict_cell(headline(text, "near recall, 4M rows")) == "met"
    assert verdict_cell(headline(text, "CPU-µs per row")) == "not measured"
    assert verdict_cell(headline(text, "common languages, lingua sentences")) == "**not met**"
    assert verdict_cell(headline(text, "common languages, lingua word-pairs")) == "met"
    assert verdict_cell(headline(text, "strings/s per core")) == "**not met**"
    assert "more accurate than CLD3" not in text
    assert "**Not an independent test**" in text
    # the closing list states every target with its verdict and figure
    assert "near recall, 1M rows (planted pairs): target >= 0.95: **not met** (0.9478)." in text
    # near recall is never averaged with exact recall
    assert "0.9739" not in text


def test_download_cpu_ratio_is_best_of_each(tmp_path: Path) -> None:
    """Best round of each side (5.22 / 3.71 = 1.41x), not the best single-round ratio (1.61x)."""
    def side(success: int, img_s: float, cpu: float) -> dict:
        return {"success": success, "img_s": img_s, "cpu_ms_per_img": cpu, "steady_cpu_ms_per_img": cpu - 0.2,
                "cpu_share": 0.3}

    rounds = [{"peer": side(100, 200, 5.22), "ours": side(100, 132, 3.71), "img_s_ratio": 0.66, "cpu_ratio": 1.41},
              {"peer": side(100, 160, 6.28), "ours": side(100, 121, 3.91), "img_s_ratio": 0.76, "cpu_ratio": 1.61}]
    write(tmp_path, "download", [{"date": "2026-12-01", "machine": MACHINE,
                                  "inputs": {"imagenet": {"n": 100, "rounds": rounds}}}])
    text = cr.render_results(cr.load_records(tmp_path))
    row = headline(text, "CPU ms per image, input `imagenet`")
    assert "1.41x best of each" in row and "1.61x" not in row
    assert verdict_cell(headline(text, "img/s, 2 cores, 100 loopback URLs")) == "**not met**"
    assert "Output quality against a reference (PSNR / SSIM): not measured" in text


def test_checks_and_tables_added_to_a_record_are_rendered(tmp_path: Path) -> None:
    """What another bench adds (a check, a table, a new key) shows up without touching the generator."""
    run = {"date": "2026-12-02", "machine": {**MACHINE, "gpu": "1 x NVIDIA H200"},
           "checks": [{"figure": "near recall, brute force, 1M", "value": 0.951,
                       "target": {"op": ">=", "value": 0.95, "text": ">= 0.95"}},
                      {"figure": "PSNR gap to img2dataset (dB)", "value": -0.7,
                       "target": {"op": ">=", "value": -0.5, "text": "within 0.5 dB"}}],
           "tables": [{"title": "Brute-force ground truth", "columns": ["rows", "pairs"], "rows": [[1000000, 12345]]}]}
    write(tmp_path, "newbench", [run])
    # a run without tables of its own: keys the renderer does not read are shown as recorded figures
    write(tmp_path, "dedup", [{"date": "2026-12-03", "machine": MACHINE, "new_measurement": {"psnr_db": 41.5},
                               "alternates": [{"rows": 1000, "probes": 4, "recall_near": 0.97}],
                               "results": [{"rows": 1000, "ours": {"seconds": 1.0, "cpu_seconds": 1.0,
                                                                   "vmhwm_kb": 1, "anon_peak_kb": 1,
                                                                   "recall_near": 0.96, "band_recall": 0.93}}]}])
    text = cr.render_results(cr.load_records(tmp_path))
    assert verdict_cell(headline(text, "brute force, 1M")) == "met"
    assert verdict_cell(headline(text, "PSNR gap")) == "**not met**"
    assert "**Brute-force ground truth**" in text and "| 1,000,000 | 12,345 |" in text
    assert "| new_measurement.psnr_db | 41.5 |" in text
    assert "**alternates**" in text and "| 1,000 | 4 | 0.97 |" in text
    assert "| 1,000 | ours | band_recall | 0.93 |" in text
    assert "GPU figures: newbench (2026-12-02, 1 x NVIDIA H200)." in text


def test_optional_parts_may_be_missing(tmp_path: Path) -> None:
    """A record with only the required keys renders, and SCALE.md says 'not measured' for absent stages."""
    write(tmp_path, "dedup", [{"date": "2026-12-01", "machine": MACHINE}])
    write(tmp_path, "clip", [{"date": "2026-12-01", "machine": MACHINE,
                              "ours": {"pairs_per_s": 2.0, "seconds": 1.0, "load_s": 1.0},
                              "peer": {"pairs_per_s": 2.5, "seconds": 1.0, "load_s": 1.0}}])
    records = cr.load_records(tmp_path)
    text = cr.render_results(records)
    assert verdict_cell(headline(text, "pairs/s, on CPU")) == "**not met**"
    assert verdict_cell(headline(text, "pairs/s on one GPU (H100 class)")) == "not measured"
    scale = cr.render_scale(records, cr.SCALE_TEMPLATE.read_text())
    assert "{{" not in scale
    assert "Stages without a recorded run, left out of the totals: extract, download, tag, dedup, curate, index." in scale


def test_record_without_machine_is_refused_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path, "extract", [{"date": "2026-12-01"}])
    with pytest.raises(ValueError, match=r"extract\.json: runs\[0\] has no 'machine'"):
        cr.load_records(tmp_path)


def test_save_run_replaces_the_run_with_the_same_label(tmp_path: Path) -> None:
    cr.save_run("curate", {"label": "2026-12-01, no dedup verdicts", "date": "d1", "machine": MACHINE},
                regenerate=False, results_dir=tmp_path)
    cr.save_run("curate", {"date": "d2", "machine": MACHINE}, regenerate=False, results_dir=tmp_path)
    cr.save_run("curate", {"date": "d3", "machine": MACHINE}, regenerate=False, results_dir=tmp_path)
    runs = json.loads((tmp_path / "curate.json").read_text())["runs"]
    assert [(r["label"], r["date"]) for r in runs] == [("2026-12-01, no dedup verdicts", "d1"), ("latest", "d3")]
    with pytest.raises(ValueError, match="machine"):
        cr.save_run("curate", {"date": "d4"}, regenerate=False, results_dir=tmp_path)
