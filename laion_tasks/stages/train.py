"""Train CLIP on a curated subset with open_clip's own trainer (``open_clip_train``).

Why not our own loop: OpenCLIP's trainer is what LAION used to train on LAION-400M/2B;
its data pipeline, loss, schedule and checkpoints are the reference. This stage only
prepares its inputs (shard list, sample count, flags), launches it as a subprocess
(``python -m laion_tasks.train_entry`` single-process, or ``torchrun`` over N GPUs),
and publishes the final checkpoint atomically to storage.

Accounting: samples with an image and a caption are ``success`` (they are what
open_clip_train trains on), others are ``drop:missing_image`` / ``drop:missing_caption``
(open_clip_train would skip them). A curated subset's ``sizes.json`` (written by curate,
which copies whole samples) gives the counts without reading the tars; shards it does not
list are scanned once. The trainer's output goes to a file, never into memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from laion_tasks import layout, storage
from laion_tasks.config import TrainConfig
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
"""The image extensions open_clip_train's webdataset pipeline renames to ``image``."""
CHECKPOINT_NAME = layout.CHECKPOINT_NAME
LOSS_RE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?(\w+_loss): (\S+) \((\S+)\)")


def count_shard_samples(shard_uri: str) -> Counter[str]:
    """Outcome counts of one WebDataset shard, as open_clip_train will see it (image + txt)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    counts: Counter[str] = Counter()
    try:
        with storage.open_read(shard_uri) as raw:
            for sample in group_by_keys({**f, "__url__": shard_uri} for f in tar_file_iterator(raw)):
                if not any(k in sample for k in IMAGE_KEYS):
                    counts["drop:missing_image"] += 1
                elif "txt" not in sample:
                    counts["drop:missing_caption"] += 1
                else:
                    counts["success"] += 1
    except (tarfile.TarError, OSError, storage.StorageError, ValueError) as exc:
        raise StageError(f"{shard_uri}: unreadable WebDataset shard: {type(exc).__name__}: {exc}") from exc
    return counts


def _sizes_from_metadata(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the ``sizes.json`` beside the shards (curate writes it), where present."""
    out: dict[str, int] = {}
    for directory in sorted({s.rsplit("/", 1)[0] for s in shards if "/" in s}):
        uri = storage.join(directory, "sizes.json")
        if storage.exists(uri):
            sizes = json.loads(storage.read_text(uri))
            out.update({storage.join(directory, name): int(n) for name, n in sizes.items()})
    return out


def shard_pattern(shards: list[str]) -> str:
    """open_clip_train's ``--train-data``: a brace range when the names are numbered contiguously, else ``a::b``."""
    match = [re.fullmatch(r"(.*?)(\d+)(\.tar)", s) for s in shards]
    if len(shards) > 1 and all(match):
        prefixes = {m.group(1) for m in match}  # type: ignore[union-attr]
        widths = {len(m.group(2)) for m in match}  # type: ignore[union-attr]
        numbers = [int(m.group(2)) for m in match]  # type: ignore[union-attr]
        if len(prefixes) == 1 and len(widths) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            width = widths.pop()
            return f"{prefixes.pop()}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}.tar"
    return "::".join(shards)


def _resolve_precision(config: TrainConfig, use_cuda: bool) -> str:
    if config.precision != "auto":
        return config.precision
    return "amp" if use_cuda else "fp32"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def open_clip_train_args(
    train_data: str, num_samples: int, config: TrainConfig, logs_dir: Path, run_name: str, use_cuda: bool
) -> list[str]:
    """The exact open_clip_train flags this stage runs (also shown in the pod/CLI logs)."""
    batch_size = config.batch_size
    world = max(1, config.gpus) if use_cuda else 1
    if num_samples < batch_size * world:
        batch_size = max(1, num_samples // world)
        log.warning("only %d samples: batch size lowered from %d to %d", num_samples, config.batch_size, batch_size)
    device = config.device if config.device != "auto" else ("cuda" if use_cuda else "cpu")
    return [
        "--train-data", train_data,
        "--dataset-type", "webdataset",
        "--train-num-samples", str(num_samples),
        "--model", config.model,
        "--batch-size", str(batch_size),
        "--epochs", str(config.epochs),
        "--lr", str(config.lr),
        "--warmup", str(config.warmup),
        "--workers", str(config.workers),
        "--precision", _resolve_precision(config, use_cuda),
        "--seed", str(config.seed),
        "--device", device,
        "--logs", str(logs_dir),
        "--name", run_name,
        "--save-frequency", "1",
        "--save-most-recent",
        "--log-every-n-steps", "1",
        *config.extra_args,
    ]  # fmt: skip


def samples_seen(num_samples: int, args: list[str], epochs: int, world: int = 1) -> int:
    """Samples open_clip_train draws over all epochs: whole global batches, a whole number per loader worker
    (``open_clip_train.data.get_wds_dataset`` rounds up), repeating the data where it is smaller."""
    batch, workers = int(args[args.index("--batch-size") + 1]), max(1, int(args[args.index("--workers") + 1]))
    batches = -(-(-(-num_samples // (batch * world))) // workers) * workers
    return batches * batch * world * epochs


def launch_command(args: list[str], config: TrainConfig, use_cuda: bool) -> list[str]:
    """Single process, or torchrun with one worker per GPU."""
    if use_cuda and config.gpus > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={config.gpus}", "-m", "laion_tasks.train_entry", *args,
        ]  # fmt: skip
    return [sys.executable, "-m", "laion_tasks.train_entry", *args]


def _stage_shards(shards: list[str], config: TrainConfig, work: Path) -> list[str]:
    """Local paths open_clip_train can open: local as-is; s3 copied (stage) or streamed via awscli (pipe)."""
    out = []
    for index, uri in enumerate(shards):
        if not storage.is_s3(uri) and not storage.is_http(uri):
            out.append(str(storage.local_path(uri).resolve()))
        elif config.shard_access == "pipe" and storage.is_s3(uri):
            out.append(f"pipe:aws s3 cp {uri} -")
        else:
            target = work / "shards" / f"{index:06d}.tar"
            target.parent.mkdir(parents=True, exist_ok=True)
            with storage.open_read(uri) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.append(str(target))
    return out


def _final_losses(log_path: Path) -> dict[str, float | int]:
    """The last logged loss and the number of logged steps, reading the log a line at a time."""
    last: dict[str, float | int] = {}
    steps = 0
    if not log_path.exists():
        return last
    with open(log_path, errors="replace") as handle:
        for line in handle:
            for match in LOSS_RE.finditer(line):
                steps += 1
                last = {"epoch": int(match.group(1)), "loss_name": match.group(4), "loss": float(match.group(5))}  # type: ignore[dict-item]
    if last:
        last["logged_steps"] = steps
    return last


def _tail(path: Path, size: int = 4000) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode("utf-8", "replace")


def train_clip(
    train_shards: list[str],
    output_uri: str,
    config: TrainConfig,
    num_samples: int | None = None,
    *,
    run_name: str = "laion-train",
    work_dir: str | Path | None = None,
) -> ShardStats:
    """Train ``config.model`` on WebDataset shards with open_clip_train; publish the checkpoint.

    Writes ``<output_uri>/epoch_latest.pt`` (open_clip_train's checkpoint: ``state_dict``,
    ``epoch``, ``optimizer``; ``laion eval --checkpoint`` and ``load_clip`` read it),
    ``train.log``, ``params.txt`` and ``train.json``. ``num_samples`` defaults to the
    scanned count of usable samples. Returns counts per sample outcome; ``output_uri``
    of the stats is the checkpoint's URI.
    """
    if not train_shards:
        raise StageError(f"no training shards given for {output_uri}")
    stats = ShardStats()
    sizes = _sizes_from_metadata(list(train_shards))
    for shard in train_shards:
        if shard in sizes:
            stats.add("success", sizes[shard])
        else:
            stats.counts.update(count_shard_samples(shard))
    usable = stats.counts.get("success", 0)
    if usable == 0:
        raise StageError(f"{train_shards[0]} (+{len(train_shards) - 1}): no sample with an image and a caption")
    if num_samples and usable < config.batch_size * max(1, config.gpus):
        # open_clip_train repeats a small subset to reach num_samples, but drops each pass's partial batch:
        # with fewer samples than one batch no pass yields a batch and training never ends
        raise StageError(f"{train_shards[0]}: {usable} usable samples, fewer than one batch of "
                         f"{config.batch_size * max(1, config.gpus)}: lower train.batch_size to compare at train.samples_seen")
    samples = num_samples or usable
    use_cuda = config.device != "cpu" and _cuda_available()
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="laion-train-")) if own_work else Path(work_dir)  # type: ignore[arg-type]
    try:
        local_shards = _stage_shards(list(train_shards), config, work)
        logs_dir = work / "logs"
        args = open_clip_train_args(shard_pattern(local_shards), samples, config, logs_dir, run_name, use_cuda)
        command = launch_command(args, config, use_cuda)
        log.info("launching open_clip_train: %s", " ".join(command))
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        console = work / "console.log"
        with open(console, "wb") as out:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        run_dir = logs_dir / run_name
        log_path = run_dir / "out.log"
        if proc.returncode != 0:
            raise StageError(
                f"open_clip_train failed (exit {proc.returncode}) on {train_shards[0]}: "
                f"{_tail(console) or _tail(log_path)}"
            )
        checkpoint = run_dir / "checkpoints" / CHECKPOINT_NAME
        if not checkpoint.exists():
            raise StageError(f"open_clip_train finished but wrote no {checkpoint}: {_tail(log_path, 2000)}")
        checkpoint_uri = layout.checkpoint_uri(output_uri)
        with storage.atomic_local_path(checkpoint_uri) as tmp:
            shutil.copyfile(checkpoint, tmp)
        log_bytes = 0
        if log_path.exists():
            log_bytes = log_path.stat().st_size
            with storage.atomic_local_path(storage.join(output_uri, "train.log")) as tmp:
                shutil.copyfile(log_path, tmp)
        else:
            storage.write_text(storage.join(output_uri, "train.log"), "")
        params = run_dir / "params.txt"
        if params.exists():
            storage.write_text(storage.join(output_uri, "params.txt"), params.read_text())
        stats.output_uri = checkpoint_uri
        stats.checksum = storage.file_sha256(checkpoint)
        stats.bytes_written = checkpoint.stat().st_size + log_bytes
        stats.extra = {
            "model": config.model,
            "num_samples": samples,
            "usable_samples": usable,
            "samples_seen": samples_seen(samples, args, config.epochs, config.gpus if use_cuda and config.gpus > 1 else 1),
            "shards": len(train_shards),
            "epochs": config.epochs,
            "device": "cuda" if use_cuda else "cpu",
            "processes": config.gpus if use_cuda and config.gpus > 1 else 1,
            "open_clip_train_args": args,
            **_final_losses(log_path),
        }
        summary = {"checkpoint": checkpoint_uri, "counts": dict(stats.counts), **stats.extra}
        storage.write_text(storage.join(output_uri, "train.json"), json.dumps(summary, indent=2))
        return stats
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def subset_shards(subset_uri: str) -> list[str]:
    """The WebDataset shards of a curated subset: every ``.tar`` under its directory/prefix, sorted."""
    shards = storage.list_uris(subset_uri, ".tar")
    if not shards:
        raise StageError(f"{subset_uri}: no .tar WebDataset shards in this subset (curate with write_images)")
    return shards


# -- the stage's declaration ---------------------------------------------------------

TRAIN_RESULT_FIELDS = (
    "train.model",
    "train.epochs",
    "train.batch_size",  # training's batch size changes the optimisation (unlike an inference batch size)
    "train.gpus",  # global batch = batch_size x gpus
    "train.lr",
    "train.warmup",
    "train.seed",
    "train.extra_args",
    "train.device",  # a GPU, with precision auto, trains in amp
    "train.precision",
    "train.workers",  # WebDataset splits the shards by loader worker: the order samples are seen in
    "train.samples_seen",
)
"""Not here: shard_access and the pod knobs (``stage.EXECUTION_ONLY``)."""


def model_dir(ctx: Context, subset: str) -> str:
    return layout.model_dir(ctx.root, ctx.snapshot, subset)


def trained_subsets(config: TrainConfig) -> list[str]:
    """``train.subset`` then ``train.compare_subsets``: each is trained (and evaluated) with the same settings."""
    return list(dict.fromkeys([config.subset, *config.compare_subsets]))


def epoch_samples(config: TrainConfig) -> int | None:
    """``--train-num-samples`` per epoch that makes ``train.samples_seen`` in all (None: the subset's size)."""
    return -(-config.samples_seen // max(1, config.epochs)) if config.samples_seen else None


def _run_train(ctx: Context, subset: str) -> ShardStats:
    digest = SPEC.config_digest(ctx.settings, subset)
    shards = subset_shards(layout.subset_dir(ctx.root, ctx.snapshot, subset))
    config = ctx.settings.train
    return train_clip(shards, model_dir(ctx, subset), config, epoch_samples(config), run_name=f"{subset}-{digest[:8]}")


SPEC = StageSpec(
    name="train",
    downstream=True,
    reads=("curate",),  # the subset of the same name
    result_fields=TRAIN_RESULT_FIELDS,
    output=lambda ctx, subset: layout.checkpoint_uri(model_dir(ctx, subset)),
    run_shard=_run_train,
    shards=lambda ctx: trained_subsets(ctx.settings.train),
    plan_name="subsets",
    input_uri=lambda ctx, subset: layout.subset_dir(ctx.root, ctx.snapshot, subset),
    section="train",
    after_batch=lambda ctx, shards: {
        "subset": ctx.settings.train.subset,
        "checkpoint": layout.checkpoint_uri(model_dir(ctx, ctx.settings.train.subset)),
        "checkpoints": {s: layout.checkpoint_uri(model_dir(ctx, s)) for s in trained_subsets(ctx.settings.train)},
    },
)
