"""Zero-shot evaluation: metrics on hand-made cases, the dataset layouts, real shared data, the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from laion_tasks.config import EvalConfig
from laion_tasks.stages import evaluate as ev
from laion_tasks.stage import StageError

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny batches gain nothing from intra-op threads, and on a loaded 2-core CI box OpenMP spinning
    makes them 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    from laion_tasks.models.clip import load_clip

    return load_clip("laion-tiny-clip", device="cpu", seed=0)


def jpeg(color: tuple[int, int, int], size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def make_image_folder(root: Path, per_class: int = 2) -> Path:
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg(tuple(max(0, c - 15 * i) for c in color)))  # type: ignore[arg-type]
    return root


# ---------------------------------------------------------------- metrics, known answers


def test_metrics_on_a_hand_constructed_case() -> None:
    # 6 images, 6 classes; rows are logits. Truth: 0,0,1,1,2,3.
    logits = torch.tensor(
        [
            [9, 1, 0, 0, 0, 0],  # class 0 -> pred 0 (correct)
            [1, 9, 0, 0, 0, 0],  # class 0 -> pred 1 (wrong, 0 is 2nd)
            [0, 1, 9, 0, 0, 0],  # class 1 -> pred 2 (wrong, 1 is 2nd)
            [0, 9, 1, 0, 0, 0],  # class 1 -> pred 1 (correct)
            [0, 9, 1, 0, 0, 0],  # class 2 -> pred 1 (wrong, 2 is 2nd)
            [9, 8, 7, 6, 5, 4],  # class 3 -> pred 0 (wrong, 3 is 4th: inside top-5)
        ],
        dtype=torch.float32,
    )
    target = torch.tensor([0, 0, 1, 1, 2, 3])
    acc1, acc5 = ev.topk_accuracy(logits, target, (1, 5))
    assert acc1 == pytest.approx(2 / 6)
    assert acc5 == pytest.approx(1.0)
    (acc2,) = ev.topk_accuracy(logits, target, (2,))
    assert acc2 == pytest.approx(5 / 6)  # class 3's image has its label 4th
    pred = logits.argmax(1).numpy()
    # recalls: class0 1/2, class1 1/2, class2 0/1, class3 0/1; class 4/5 absent from truth are ignored
    assert ev.mean_per_class_recall(target.numpy(), pred) == pytest.approx((0.5 + 0.5 + 0 + 0) / 4)
    names = [f"c{i}" for i in range(6)]
    confused = ev.most_confused(target.numpy(), pred, names, top=10)
    assert [(c["true"], c["predicted"], c["count"]) for c in confused] == [
        ("c0", "c1", 1),
        ("c1", "c2", 1),
        ("c2", "c1", 1),
        ("c3", "c0", 1),
    ]
    # sklearn semantics when a predicted class never occurs in the truth: it is not averaged in.
    assert ev.mean_per_class_recall(np.array([0, 0, 1]), np.array([0, 2, 2])) == pytest.approx((0.5 + 0.0) / 2)


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(tiny) -> None:  # type: ignore[no-untyped-def]
    templates = ["a photo of a {c}.", "a drawing of a {}.", "{c}"]
    classifier = ev.build_classifier(tiny, ["cat", "dog"], templates)
    assert classifier.shape == (tiny.embed_dim, 2)
    with torch.no_grad():
        tokens = tiny.tokenizer(["a photo of a dog.", "a drawing of a dog.", "dog"])
        emb = torch.nn.functional.normalize(tiny.model.encode_text(tokens), dim=-1).mean(0)
    assert torch.allclose(classifier[:, 1], emb / emb.norm(), atol=1e-6)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(2), atol=1e-5)


def test_zeroshot_eval_predicts_the_highest_cosine(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dataset = ev.open_dataset(str(make_image_folder(tmp_path / "colors")))
    result = ev.zeroshot_eval(tiny, dataset, dataset.classnames, ["a {c} square"], batch_size=3)
    classifier = ev.build_classifier(tiny, dataset.classnames, ["a {c} square"])
    images = torch.stack([tiny.preprocess(Image.open(s.path).convert("RGB")) for s in dataset])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(tiny.model.encode_image(images), dim=-1)
    expected = 100.0 * feats @ classifier
    assert torch.allclose(result.logits, expected, atol=1e-4)
    assert (result.predictions == expected.argmax(1).numpy()).all()
    assert result.acc5 is None  # fewer than 5 classes: CLIP_benchmark reports no top-5
    assert result.acc1 == pytest.approx(float((result.predictions == result.targets).mean()))


# ---------------------------------------------------------------- layouts & outcomes


def test_image_folder_counts_undecodable_images(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = make_image_folder(tmp_path / "folder")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "red" / "notes.txt").write_text("ignored: not an image extension")
    dataset = ev.open_dataset(str(root))
    assert dataset.layout == "imagefolder"
    assert dataset.classnames == ["blue", "green", "red", "yellow"]
    assert dataset.size == 9
    result = ev.zeroshot_eval(tiny, dataset, dataset.classnames, ["{c}"], batch_size=4)
    assert result.counts == {"success": 8, "bad:undecodable_image": 1}
    assert result.errors == ["red/broken.jpg: undecodable_image"]


def write_wds(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__").decode()
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_with_cls_labels(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    names = list(COLORS)
    good = [{"__key__": f"{i:04d}".encode(), "jpg": jpeg(COLORS[names[i % 4]]), "cls": str(i % 4).encode()} for i in range(10)]
    write_wds(tmp_path / "000000.tar", good[:6])
    write_wds(
        tmp_path / "000001.tar",
        good[6:]
        + [
            {"__key__": b"nolabel", "jpg": jpeg((0, 0, 0))},
            {"__key__": b"badlabel", "jpg": jpeg((0, 0, 0)), "cls": b"seven"},
            {"__key__": b"outofrange", "jpg": jpeg((0, 0, 0)), "cls": b"9"},
            {"__key__": b"noimage", "cls": b"1"},
        ],
    )
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    dataset = ev.open_dataset(str(tmp_path / "{000000..000001}.tar"))
    assert dataset.layout == "webdataset"
    assert dataset.classnames == names
    result = ev.zeroshot_eval(tiny, dataset, dataset.classnames, ["a {c} square"], batch_size=4)
    assert result.counts == {
        "success": 10,
        "bad:missing_label": 1,
        "bad:unparsable_label": 1,
        "bad:label_out_of_range": 1,
        "bad:missing_image": 1,
    }
    assert result.targets.tolist() == [i % 4 for i in range(10)]
    # the directory form finds the same shards
    assert ev.open_dataset(str(tmp_path)).layout == "webdataset"


def test_template_and_classname_json_forms(tmp_path: Path) -> None:
    assert len(ev.default_templates()) == 80
    assert ev.class_prompts("dog", ["a {c}.", "the {}."]) == ["a dog.", "the dog."]
    assert ev.class_prompts("dog", {"dog": ["a good dog"]}) == ["a good dog"]
    keyed = tmp_path / "t.json"
    keyed.write_text(json.dumps({"mine": ["x {c}"], "other": ["y {c}"]}))
    assert ev.load_templates(f"{keyed}#other") == ["y {c}"]
    assert ev.load_templates(str(keyed), dataset_name="mine") == ["x {c}"]
    assert ev.default_classnames("pets")[:2] == ["Abyssinian", "American Bulldog"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(StageError):
        ev.load_templates(str(bad))
    with pytest.raises(StageError):
        ev.load_classnames(str(keyed))  # a mapping without a key to pick


# ---------------------------------------------------------------- real data


def test_shipped_clip_benchmark_text_is_a_byte_copy(shared_data: Path) -> None:
    for name in ("en_classnames.json", "en_zeroshot_classification_templates.json"):
        shipped = (ev.ZEROSHOT_DATA_DIR / name).read_bytes()
        original = (shared_data / "images" / "clip_benchmark_text" / name).read_bytes()
        assert hashlib.sha256(shipped).hexdigest() == hashlib.sha256(original).hexdigest()


def test_imagenet_sample200_flat_layout(tiny, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = shared_data / "images" / "imagenet_sample200"
    dataset = ev.open_dataset(str(root))
    assert dataset.layout == "labels_tsv"
    assert dataset.size == 200
    # labels index into all 1000 classes, named as CLIP_benchmark names them
    assert dataset.classnames == ev.default_classnames("imagenet1k")
    rows = list(csv.DictReader(open(root / "labels.tsv", newline=""), delimiter="\t"))
    samples = list(dataset)
    assert [s.label for s in samples] == [int(r["class_index"]) for r in rows]
    assert all(dataset.classnames[int(r["class_index"])] == r["clip_benchmark_classname"] for r in rows)

    templates = ev.default_templates()[:2]
    result = ev.zeroshot_eval(tiny, dataset, dataset.classnames, templates, batch_size=64)
    assert result.counts == {"success": 200}
    assert result.logits.shape == (200, 1000)
    assert 0.0 <= result.acc1 <= result.acc5 <= 1.0  # type: ignore[operator]

    stats = ev.write_report(result, str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "zeroshot.json").read_text())
    assert report["n_images"] == 200 and report["n_classes"] == 1000 and report["n_templates"] == 2
    assert report["metrics"]["acc1"] == result.acc1
    assert sum(c["count"] for c in report["most_predicted"]) <= 200
    markdown = (tmp_path / "report" / "zeroshot.md").read_text()
    assert "Most confused class pairs" in markdown and "| top-1 accuracy |" in markdown
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "report" / "predictions.parquet")
    assert table.num_rows == 200 and table.column("label").to_pylist() == result.targets.tolist()
    assert stats.counts == {"success": 200} and stats.output_uri.endswith("zeroshot.json")


def test_skimage_clip8_captions_as_classes(tiny, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = shared_data / "images" / "skimage_clip8"
    rows = list(csv.DictReader(open(src / "captions.tsv", newline=""), delimiter="\t"))
    root = tmp_path / "skimage"
    for i, row in enumerate(rows):
        (root / f"{i:02d}").mkdir(parents=True)
        (root / f"{i:02d}" / row["filename"]).symlink_to(src / row["filename"])
    dataset = ev.open_dataset(str(root))
    captions = [r["caption"] for r in rows]
    result = ev.zeroshot_eval(tiny, dataset, captions, ["{c}"], batch_size=8)
    assert result.counts == {"success": 8}
    assert result.targets.tolist() == list(range(8))
    assert result.acc5 is not None and result.acc1 <= result.acc5
    assert len(result.per_class) == 8


# ---------------------------------------------------------------- CLI


def test_cli_eval_zeroshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    monkeypatch.setenv("LAION_LINEAGE__URL", f"sqlite:///{tmp_path / 'lineage.db'}")
    from laion_tasks.lineage import Lineage

    Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").ensure_snapshot("demo", str(tmp_path))  # --snapshot must name a known one
    root = make_image_folder(tmp_path / "colors")
    classnames = tmp_path / "classes.json"
    classnames.write_text(json.dumps(["blue thing", "green thing", "red thing", "yellow thing"]))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["a photo of a {c}.", "a {c}"]))
    out = tmp_path / "out"
    args = [
        "eval", "zeroshot", "--model", "laion-tiny-clip", "--dataset", str(root), "--out", str(out),
        "--classnames", str(classnames), "--templates", str(templates), "--batch-size", "3", "--device", "cpu",
        "--snapshot", "demo",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{") :])
    assert printed["counts"] == {"success": 8}
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["n_templates"] == 2 and report["per_class"][0]["class"] == "blue thing"
    assert not math.isnan(report["metrics"]["acc1"])
    runs = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs("demo", "eval")
    assert [r["status"] for r in runs] == ["done"]
    # same model, data and config again: lineage skips it
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and '"skipped": true' in again.output


def test_evaluate_zeroshot_stage_uses_config_defaults(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = make_image_folder(tmp_path / "colors", per_class=1)
    stats = ev.evaluate_zeroshot(tiny, str(root), str(tmp_path / "o"), EvalConfig(batch_size=2, top_confusions=3))
    assert stats.counts == {"success": 4}
    assert set(stats.extra["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    report = json.loads((tmp_path / "o" / "zeroshot.json").read_text())
    assert report["n_templates"] == 80 and len(report["most_confused"]) <= 3
