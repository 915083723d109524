"""Zero-shot eval parity and speed: laion_tasks vs CLIP_benchmark 1.6.2 (its own venv), same run.

    .venv/bin/python bench/eval_parity.py [--templates N] [--threads T]

Both sides load the SAME randomly initialised laion-tiny-clip (seed 0, saved as a state_dict
checkpoint; the peer registers our model config with open_clip.add_model_config) and classify
the same images: ../shared/data/images/imagenet_sample200 against all 1000 ImageNet class
names x the 80 OpenAI templates, and skimage_clip8 against its 8 captions. Predictions,
logits and metrics must be identical. Records the run in bench/results/eval.json.

The peer venv is /work/peers/clip-benchmark, created if missing with the pip command from
../shared/PEERS.md (needs PyPI). tests/test_eval_parity.py reuses these helpers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
PEER_VENV = Path(os.environ.get("LAION_PEER_CLIP_BENCHMARK", "/work/peers/clip-benchmark"))
PEER_PACKAGES = ["clip-benchmark==1.6.2", "torch==2.14.1", "torchvision==0.29.1", "numpy<2.4"]
"""PEERS.md's command plus numpy<2.4: CLIP_benchmark 1.6.2's ``accuracy`` calls float() on a 1-element
array, which NumPy 2.4 no longer allows (TypeError: only 0-dimensional arrays can be converted)."""
PEER_SCRIPT = REPO / "bench" / "peers" / "clip_benchmark_zeroshot.py"
MODEL = "laion-tiny-clip"


class PeerUnavailable(RuntimeError):
    """The peer venv is missing and could not be created (offline, pip failure)."""


def peer_python(create: bool = True) -> Path:
    """The peer venv's python, creating the venv with PEERS.md's command when missing."""
    python = PEER_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import clip_benchmark.metrics.zeroshot_classification, open_clip, numpy; "
        "assert tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4), 'numpy ' + numpy.__version__",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not create:
        raise PeerUnavailable(f"{PEER_VENV} has no working clip-benchmark install")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "install", "-q", *PEER_PACKAGES],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise PeerUnavailable(
            f"could not create {PEER_VENV} (pip install {' '.join(PEER_PACKAGES)}; needs PyPI): "
            f"{exc} {detail[-500:].decode(errors='replace')}"
        ) from exc
    if subprocess.run(check, capture_output=True).returncode != 0:
        raise PeerUnavailable(f"{PEER_VENV} was created but clip_benchmark does not import")
    return python


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """The randomly initialised tiny model's state_dict: the one model both sides load."""
    import torch

    from laion_tasks.models.clip import load_clip

    clip = load_clip(MODEL, seed=seed, device="cpu")
    torch.save(clip.model.state_dict(), path)
    return path


@dataclass
class ParityCase:
    name: str
    dataset: str
    classnames: list[str]
    templates: list[str]


def imagenet_case(n_templates: int | None = None) -> ParityCase:
    from laion_tasks.stages.evaluate import default_classnames, default_templates

    templates = default_templates()
    return ParityCase(
        "imagenet_sample200",
        str(SHARED / "images" / "imagenet_sample200"),
        default_classnames("imagenet1k"),
        templates[:n_templates] if n_templates else templates,
    )


def skimage_case(work: Path) -> ParityCase:
    """8 images as an ImageFolder, one class per image, the CLIP notebook captions as class names."""
    src = SHARED / "images" / "skimage_clip8"
    rows = list(csv.DictReader(open(src / "captions.tsv", newline=""), delimiter="\t"))
    root = work / "skimage_clip8"
    for i, row in enumerate(rows):
        class_dir = root / f"{i:02d}_{Path(row['filename']).stem}"
        class_dir.mkdir(parents=True, exist_ok=True)
        link = class_dir / row["filename"]
        if not link.exists():
            link.symlink_to(src / row["filename"])
    return ParityCase("skimage_clip8", str(root), [r["caption"] for r in rows], ["{c}", "a photo of {c}."])


def run_case(case: ParityCase, checkpoint: Path, work: Path, batch_size: int = 50, threads: int = 2, amp: bool = False) -> dict:
    """Run both sides on one case; returns metrics, timings and the comparison."""
    import numpy as np
    import torch

    from laion_tasks.models.clip import MODEL_CONFIG_DIR, load_clip
    from laion_tasks.stages.evaluate import open_dataset, zeroshot_eval

    torch.set_num_threads(threads)
    dataset = open_dataset(case.dataset)
    clip = load_clip(MODEL, checkpoint=str(checkpoint), device="cpu")
    start = time.perf_counter()
    ours = zeroshot_eval(clip, dataset, case.classnames, case.templates, batch_size, amp=amp)
    ours_s = time.perf_counter() - start

    items = [[str(Path(s.path)), int(s.label)] for s in dataset]  # type: ignore[arg-type]
    prefix = str(work / f"peer-{case.name}")
    job = {
        "model_config_dir": str(MODEL_CONFIG_DIR),
        "model": MODEL,
        "checkpoint": str(checkpoint),
        "items": items,
        "classnames": case.classnames,
        "templates": case.templates,
        "batch_size": batch_size,
        "amp": amp,
        "threads": threads,
        "out_prefix": prefix,
    }
    job_path = work / f"job-{case.name}.json"
    job_path.write_text(json.dumps(job))
    start = time.perf_counter()
    proc = subprocess.run([str(peer_python()), str(PEER_SCRIPT), str(job_path)], capture_output=True, text=True)
    peer_wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"CLIP_benchmark peer failed on {case.name}: {proc.stderr[-3000:]}")
    peer = json.loads(Path(prefix + ".json").read_text())
    peer_logits = np.load(prefix + ".logits.npy")
    peer_target = np.load(prefix + ".target.npy")
    our_logits = ours.logits.numpy()
    return {
        "case": case.name,
        "n_images": len(ours.keys),
        "n_classes": len(case.classnames),
        "n_templates": len(case.templates),
        "ours": ours.metrics(),
        "peer": peer["metrics"],
        "targets_equal": bool(np.array_equal(ours.targets, peer_target)),
        "predictions_equal": bool(np.array_equal(our_logits.argmax(1), peer_logits.argmax(1))),
        "top5_equal": bool(
            np.array_equal(ours.logits.topk(5, 1).indices.numpy(), torch.from_numpy(peer_logits).topk(5, 1).indices.numpy())
        )
        if len(case.classnames) >= 5
        else None,
        "max_abs_logit_diff": float(np.abs(our_logits - peer_logits).max()) if our_logits.size else 0.0,
        "ours_s": ours_s,
        "peer_compute_s": peer["classifier_s"] + peer["images_s"],
        "peer_wall_s": peer_wall_s,
        "peer_open_clip": peer["open_clip"],
    }


def metrics_equal(a: dict, b: dict) -> bool:
    def same(x, y):  # noqa: ANN001
        if x is None or y is None:
            return (x is None or x != x) and (y is None or y != y)
        return (x != x and y != y) or abs(x - y) <= 1e-12

    return all(same(a[k], b[k]) for k in ("acc1", "acc5", "mean_per_class_recall"))


def write_results(rows: list[dict], path: Path, threads: int) -> None:
    """Record the run in ``path`` (bench/results/eval.json, bench/README.md); collect_results.py renders it."""
    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    setup = (
        f"torch threads={threads} on both sides. Same randomly initialised laion-tiny-clip (seed 0, one state_dict "
        "checkpoint loaded by both sides), fp32. Both sides do the same work (one text batch per class, then batched "
        "images); the timing ratio shows that laion_tasks adds no overhead to the protocol, nothing more. Peer wall "
        "time also includes its interpreter start and model load. A random model's accuracy is near chance: parity is "
        "about identical predictions."
    )
    cases = [{**r, "peer_over_ours": r["peer_compute_s"] / r["ours_s"]} for r in rows]
    save_run(path.stem, {
        "date": now(), "command": " ".join([".venv/bin/python bench/eval_parity.py", *sys.argv[1:]]),
        "machine": machine_info(), "setup": setup,
        "settings": {"threads": threads, "model": "laion-tiny-clip, randomly initialised (seed 0)"}, "cases": cases,
    }, title="Zero-shot eval: laion_tasks vs CLIP_benchmark 1.6.2", results_dir=path.parent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", type=int, default=None, help="use only the first N of the 80 templates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval.json",
                        help="the JSON record (bench/README.md)")
    args = parser.parse_args()
    peer_python()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-parity-") as tmp:
        work = Path(tmp)
        checkpoint = save_tiny_checkpoint(work / "tiny.pt")
        for case in (skimage_case(work), imagenet_case(args.templates)):
            row = run_case(case, checkpoint, work, threads=args.threads)
            print(json.dumps(row, indent=1))
            rows.append(row)
    write_results(rows, args.out, args.threads)
    ok = all(r["predictions_equal"] and r["targets_equal"] and metrics_equal(r["ours"], r["peer"]) for r in rows)
    print(f"parity {'OK' if ok else 'FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
