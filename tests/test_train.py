"""``laion train``: open_clip_train on a generated WebDataset (CPU, tiny model), then ``laion eval`` reads it."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from laion_tasks.stages import train as tr

REPO = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, "JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_subset(root: Path, shards: int = 2, per_shard: int = 32) -> Path:
    """64 image-caption pairs of 4 colours (+1 sample without a caption) as img2dataset-style shards."""
    names = list(COLORS)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                name = names[i % 4]
                shade = tuple(max(0, c - 3 * (i // 4)) for c in COLORS[name])
                key = f"{s:02d}{i:04d}"
                add(tar, f"{key}.jpg", jpeg(shade))  # type: ignore[arg-type]
                add(tar, f"{key}.txt", f"a photo of a {name} square".encode())
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
            if s == 0:
                add(tar, "nocaption.jpg", jpeg((0, 0, 0)))
    return root


def test_shard_pattern() -> None:
    assert tr.shard_pattern(["/d/000000.tar", "/d/000001.tar", "/d/000002.tar"]) == "/d/{000000..000002}.tar"
    assert tr.shard_pattern(["/d/000000.tar", "/d/000002.tar"]) == "/d/000000.tar::/d/000002.tar"
    assert tr.shard_pattern(["/d/a.tar"]) == "/d/a.tar"


def test_launch_command_uses_torchrun_for_several_gpus(tmp_path: Path) -> None:
    from laion_tasks.config import TrainConfig

    config = TrainConfig(gpus=4, batch_size=256)
    args = tr.open_clip_train_args("/d/{0..9}.tar", 100_000, config, tmp_path, "run", use_cuda=True)
    assert args[args.index("--precision") + 1] == "amp" and args[args.index("--device") + 1] == "cuda"
    command = tr.launch_command(args, config, use_cuda=True)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    single = tr.launch_command(args, TrainConfig(gpus=1), use_cuda=True)
    assert single[1:3] == ["-m", "laion_tasks.train_entry"]
    small = tr.open_clip_train_args("/d/0.tar", 10, TrainConfig(batch_size=32), tmp_path, "run", use_cuda=False)
    assert small[small.index("--batch-size") + 1] == "10" and small[small.index("--precision") + 1] == "fp32"


def test_train_then_eval_reads_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app
    from laion_tasks.lineage import Lineage

    lineage_url = f"sqlite:///{tmp_path / 'lineage.db'}"
    monkeypatch.setenv("LAION_LINEAGE__URL", lineage_url)
    monkeypatch.setenv("LAION_STORAGE__ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LAION_TRAIN__EPOCHS", "2")
    monkeypatch.setenv("LAION_TRAIN__BATCH_SIZE", "16")
    monkeypatch.setenv("LAION_TRAIN__WORKERS", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer subprocess: tiny batches, loaded CI box
    subset = make_subset(tmp_path / "data" / "demo" / "subsets" / "colors")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--subset-dir", str(subset), "--snapshot", "demo"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{") :])
    out = tmp_path / "data" / "demo" / "models" / "colors"
    assert stats["output_uri"] == str(out / "epoch_latest.pt")
    assert stats["counts"] == {"success": 64, "drop:missing_caption": 1}
    assert stats["extra"]["num_samples"] == 64 and stats["extra"]["loss_name"] == "Contrastive_loss"
    assert stats["extra"]["logged_steps"] == 8  # 2 epochs x 64 samples / 16
    assert (out / "train.log").read_text().count("Train Epoch") == 8
    assert json.loads((out / "train.json").read_text())["checkpoint"] == stats["output_uri"]
    checkpoint = torch.load(out / "epoch_latest.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and "state_dict" in checkpoint

    runs = Lineage(lineage_url).runs("demo", "train")
    assert [(r["status"], r["output_uri"]) for r in runs] == [("done", stats["output_uri"])]

    # laion eval reads the checkpoint; the trained model separates the colours better than its init
    folder = tmp_path / "eval"
    for name, color in COLORS.items():
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), tuple(max(0, c - 20 * i) for c in color)).save(folder / name / f"{i}.png")
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["a photo of a {c} square"]))
    accuracy = {}
    for label, extra in (("trained", ["--checkpoint", str(out)]), ("init", [])):
        res = runner.invoke(
            app,
            ["eval", "zeroshot", "--model", "laion-tiny-clip", "--dataset", str(folder), "--out", str(tmp_path / label),
             "--templates", str(templates), "--device", "cpu", *extra],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        accuracy[label] = json.loads((tmp_path / label / "zeroshot.json").read_text())["metrics"]["acc1"]
    assert accuracy["trained"] > accuracy["init"]


def test_stage_shards_copies_s3_shards(s3_root: str, tmp_path: Path) -> None:
    from laion_tasks import storage
    from laion_tasks.config import TrainConfig

    local = make_subset(tmp_path / "src", shards=1, per_shard=4) / "000000.tar"
    uri = storage.join(s3_root, "subsets", "x", "000000.tar")
    storage.write_bytes(uri, local.read_bytes())
    assert tr.subset_shards(storage.join(s3_root, "subsets", "x")) == [uri]
    assert tr.count_shard_samples(uri) == {"success": 4, "drop:missing_caption": 1}
    staged = tr._stage_shards([uri], TrainConfig(), tmp_path / "work")
    assert Path(staged[0]).read_bytes() == local.read_bytes()
    assert tr._stage_shards([uri], TrainConfig(shard_access="pipe"), tmp_path / "w2") == [f"pipe:aws s3 cp {uri} -"]


def test_train_pod_spec_renders_without_a_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))
    from laion_common.train_pod import train_pod_operator

    from laion_tasks.config import load_settings

    settings = load_settings(
        environ={},
        overrides={
            "storage": {"root": "s3://laion/runs", "s3_endpoint_url": "http://minio:9000"},
            "lineage": {"url": "postgresql+psycopg2://laion:train-pw-123@pg:5432/lineage"},
            "train": {"gpus": 8, "epochs": 32},
            "pods": {"train": {"image": "registry.example/laion-tasks:1", "namespace": "train",
                               "env_secret": "laion-credentials"}},
        },
    )  # fmt: skip
    op = train_pod_operator("train_subset", settings, "S", "laion400m", pool="gpu-train")
    assert op.pool == "gpu-train"
    # The run's Params (as the CPU tasks read them) reach the pod: a new root, force.
    op.render_template_fields({"params": {"storage_root": "s3://laion/rerun", "force": True}})
    pod = op.build_pod_request_obj(dry_run=True)
    container = pod.spec.containers[0]
    assert container.image == "registry.example/laion-tasks:1" and pod.metadata.namespace == "train"
    assert container.command == ["laion"]
    assert container.args == ["run", "train", "--snapshot", "S", "--shard", "laion400m", "--force"]
    assert container.resources.limits["nvidia.com/gpu"] == "8" == container.resources.requests["nvidia.com/gpu"]
    env = {e.name: e.value for e in container.env}
    assert json.loads(env["LAION_TRAIN"])["epochs"] == 32
    assert env["LAION_STORAGE__S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["LAION_STORAGE__ROOT"] == "s3://laion/rerun"
    # No credential in env: the lineage URL by secretKeyRef, the rest by envFrom, both from the Secret.
    lineage = next(e for e in container.env if e.name == "LAION_LINEAGE__URL")
    assert lineage.value is None and lineage.value_from.secret_key_ref.name == "laion-credentials"
    assert container.env_from[0].secret_ref.name == "laion-credentials"
    from kubernetes.client import ApiClient

    assert "train-pw-123" not in json.dumps(ApiClient().sanitize_for_serialization(pod))
    default = train_pod_operator("train_default", settings, "S", "laion400m")
    default.render_template_fields({"params": {}})
    assert {e.name: e.value for e in default.env_vars}["LAION_STORAGE__ROOT"] == "s3://laion/runs"
    assert default.arguments[-1] == "--no-force"
    assert any(v.name == "dshm" for v in pod.spec.volumes)
    # the env JSON rebuilds the same train section (same skip key) inside the pod
    from laion_tasks.stages.train import SPEC

    rebuilt = load_settings(environ={k: v for k, v in env.items() if k.startswith("LAION_") and v is not None})
    assert rebuilt.train == settings.train
    assert SPEC.config_digest(rebuilt, "laion400m") == SPEC.config_digest(settings, "laion400m")


def test_sample_counts_come_from_the_subset_metadata(tmp_path: Path) -> None:
    """Curate's sizes.json gives the sample counts: no tar is read to count (issue 15)."""
    import json as _json

    wds = tmp_path / "webdataset"
    wds.mkdir()
    (wds / "sizes.json").write_text(_json.dumps({"00000.tar": 7, "00001.tar": 3}))
    shards = [str(wds / "00000.tar"), str(wds / "00001.tar"), str(tmp_path / "other" / "x.tar")]
    assert tr._sizes_from_metadata(shards) == {shards[0]: 7, shards[1]: 3}


def test_the_trainer_sample_shuffle_follows_the_seed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """open_clip_train's sample shuffle is seeded from --seed (webdataset seeds it from pid and clock)."""
    from open_clip_train import data

    from laion_tasks.train_entry import _seeded_sample_shuffle

    monkeypatch.setattr(data.wds, "shuffle", data.wds.shuffle)  # restored after the test

    def order(seed: str) -> list[int]:
        monkeypatch.setattr(data.wds, "shuffle", unseeded)
        _seeded_sample_shuffle(["--lr", "1", "--seed", seed])
        return list(data.wds.shuffle(bufsize=50, initial=10)(iter(range(200))))

    unseeded = data.wds.shuffle
    assert order("3") == order("3")
    assert order("3") != order("4")
    assert sorted(order("3")) == list(range(200))


def test_our_trainer_flags_reach_open_clip_train(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--channels-last and --fused-adamw are taken out of the argv and change the model and optimizer
    open_clip_train builds; without them nothing is patched."""
    import torch
    from open_clip_train import main as train_main

    from laion_tasks import train_entry
    from laion_tasks.models.clip import register_local_configs

    register_local_configs()
    monkeypatch.setattr(train_main, "create_model_and_transforms", train_main.create_model_and_transforms)
    monkeypatch.setattr(train_main, "optim", train_main.optim)
    args = ["--lr", "1", "--channels-last", "--fused-adamw", "--seed", "0"]
    assert train_entry._pop_flag(args, "--channels-last") and train_entry._pop_flag(args, "--fused-adamw")
    assert args == ["--lr", "1", "--seed", "0"] and not train_entry._pop_flag(args, "--fused-adamw")

    plain, *_ = train_main.create_model_and_transforms("laion-world-clip", None)
    conv = next(m for m in plain.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert train_main.optim.AdamW is torch.optim.AdamW

    train_entry._channels_last_image_tower()
    train_entry._fused_adamw()
    model, *_ = train_main.create_model_and_transforms("laion-world-clip", None)
    conv = next(m for m in model.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = train_main.optim.AdamW(model.parameters(), lr=1e-3)
    assert optimizer.defaults["fused"] is True
    # What it saves loads into an ordinary model.
    plain.load_state_dict(model.state_dict())
