"""Comparing subsets (issue 22 item 4): the train and eval stages run on ``train.subset`` and every
``train.compare_subsets`` with the same settings and the same number of samples seen, and the card gets
one zero-shot table. Real open_clip_train on the CPU with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_train import COLORS, make_subset

from laion_tasks import layout, runner, storage
from laion_tasks.card import COMPARISON_MARKER, post_comparison_to_card
from laion_tasks.config import Settings, TrainConfig
from laion_tasks.stage import StageError
from laion_tasks.stages import train as tr

SNAP = "CC-COMPARE-2025-01"


def _subset(root: Path, name: str, per_shard: int, rules: dict) -> None:
    directory = Path(layout.subset_dir(str(root), SNAP, name))
    make_subset(directory / "webdataset", shards=2, per_shard=per_shard)
    manifest = {"subset": name, "status": "ok", "rows": 2 * per_shard, "where": "language = 'en'", "rules": rules}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_compared_subsets_train_to_the_same_samples_seen_and_share_one_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "data"
    _subset(root, "big", 20, {})
    _subset(root, "small", 8, {"clip_score": {"top_pct": 30.0, "threshold": 0.2512, "population": 900, "score": "similarity",
                                              "models": ["laion-tiny-clip"], "quantile": "exact"}})
    folder = tmp_path / "eval"
    for name, color in COLORS.items():
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), color).save(folder / name / "0.png")
    settings = Settings.model_validate({
        "storage": {"root": str(root)},
        "lineage": {"url": f"sqlite:///{tmp_path / 'lineage.db'}"},
        "train": {"subset": "big", "compare_subsets": ["small"], "samples_seen": 64, "epochs": 2, "batch_size": 8,
                  "workers": 0, "device": "cpu"},
        "eval": {"dataset": str(folder), "device": "cpu"},
    })
    storage.write_text(storage.join(layout.card_dir(str(root), SNAP), "README.md"), "# Dataset card\n\n## Funnel\n")
    trained = runner.run(settings, SNAP, "train")
    assert set(trained["checkpoints"]) == {"big", "small"}
    logs = {}
    for subset, usable in (("big", 40), ("small", 16)):
        info = json.loads((root / SNAP / "models" / subset / "train.json").read_text())
        assert info["usable_samples"] == usable and info["num_samples"] == 32  # 64 seen over 2 epochs
        assert info["samples_seen"] == 64 and info["logged_steps"] == 8  # 2 epochs x 32 / 8, however big the subset
        logs[subset] = info
    def flags(args: list[str]) -> dict[str, str]:
        """open_clip_train's flags with their values, less the ones naming the subset's own paths."""
        out = {}
        for i, arg in enumerate(args):
            if arg.startswith("--"):
                nxt = args[i + 1] if i + 1 < len(args) else ""
                out[arg] = "" if nxt.startswith("--") else nxt
        return {k: v for k, v in out.items() if k not in ("--train-data", "--logs", "--name")}

    big, small = flags(logs["big"]["open_clip_train_args"]), flags(logs["small"]["open_clip_train_args"])
    assert big == small and big["--train-num-samples"] == "32" and big["--batch-size"] == "8"
    evaluated = runner.run(settings, SNAP, "eval")
    assert set(evaluated["subsets"]) == {"big", "small"} and all(v["metrics"] for v in evaluated["subsets"].values())
    posted = post_comparison_to_card(settings, SNAP)
    card = storage.read_text(posted["card"])
    assert card.count(COMPARISON_MARKER) == 1 and card.startswith("# Dataset card")
    table = [line for line in card.splitlines() if line.startswith("| big ") or line.startswith("| small ")]
    assert len(table) == 2 and all("| 64 |" in line for line in table)
    acc = {r["subset"]: r["metrics"]["acc1"] for r in posted["rows"]}
    assert f"{100 * acc['small']:.1f}%" in table[1] and "CLIP score top 30% (>= 0.2512)" in table[1]
    post_comparison_to_card(settings, SNAP)  # posting again replaces the table
    assert storage.read_text(posted["card"]).count(COMPARISON_MARKER) == 1


def test_a_subset_smaller_than_one_batch_cannot_be_trained_to_a_sample_count(tmp_path: Path) -> None:
    """open_clip_train drops each pass's partial batch: fewer samples than a batch would never end an epoch."""
    shards = make_subset(tmp_path / "s", shards=1, per_shard=6)
    with pytest.raises(StageError, match="6 usable samples, fewer than one batch of 8: lower train.batch_size"):
        tr.train_clip([str(p) for p in sorted(shards.glob("*.tar"))], str(tmp_path / "out"), TrainConfig(batch_size=8), 64)


def test_samples_seen_rounds_as_open_clip_train_does() -> None:
    assert tr.epoch_samples(TrainConfig(samples_seen=100, epochs=3)) == 34
    assert tr.epoch_samples(TrainConfig()) is None
    args = ["--batch-size", "16", "--workers", "3"]
    assert tr.samples_seen(100, args, 1) == 144  # 7 batches, a multiple of 3 workers: 9
    assert tr.samples_seen(100, ["--batch-size", "16", "--workers", "0"], 2) == 224
    assert tr.trained_subsets(TrainConfig(subset="a", compare_subsets=["b", "a", "c"])) == ["a", "b", "c"]
