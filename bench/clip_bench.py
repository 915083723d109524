"""CLIP scoring throughput: laion-tasks vs clip-retrieval 2.45.0 inference, same shards, same weights, one run.

    .venv/bin/python bench/clip_bench.py [--pairs 256] [--shards 4] [--batch-size 64] [--workers 2] [--device auto]

On a GPU machine without this repo's venv, ``--ours-python`` and ``--peer-python`` name the interpreters (or
wrapper scripts) of each side; ``bench/device_clip_gpu.sh`` is the one command used on the lent H200.

* Data: download-style WebDataset shards (256 px border-padded JPEG q95, ``.txt``, ``.json``
  + parquet) built from ``../shared/data/images/imagenet_sample200`` (test-only images, written
  to a temp dir, never into the repo) with "a photo of a <class>" captions; synthetic pictures
  when ../shared is absent.
* Model: open_clip ViT-B-32 at 224 px. No real weights exist on this machine, so the model is
  randomly initialised (LAION_ALLOW_RANDOM_WEIGHTS=1, seed 0) and saved as a checkpoint that
  *both* sides load: same architecture and FLOPs as laion2b_s34b_b79k, so timings are valid.
* Timing: each side runs in its own fresh process (the peer in its own venv,
  /work/peers/clip-retrieval, created per ../shared/PEERS.md if missing); the model is
  loaded first, then the clock runs over all shards: decode + preprocess + tokenize +
  encode images and texts + write outputs. Ours also does language ID and the status parquet.
* Correctness: our embeddings vs open_clip's reference encoding (cosine >= 0.999) and vs
  clip-retrieval's embeddings of the same pairs, matched by key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
PEER_VENV = Path("/work/peers/clip-retrieval")
PEER_PIP = ["clip-retrieval==2.45.0", "setuptools<81"]
MODEL = "ViT-B-32"

sys.path.insert(0, str(REPO / "tests"))  # the shard builder shared with the tests


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} (clip-retrieval 2.45.0)", flush=True)
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", *PEER_PIP], check=True)
    return python


def build_shards(work: Path, pairs: int, shards: int) -> list[tuple[Path, Path]]:
    from PIL import Image, ImageOps

    from clip_fixtures import FixtureSample, encode_image, synthetic_image, write_shard

    sources: list[tuple[Image.Image, str]] = []
    folder = SHARED / "images" / "imagenet_sample200"
    if folder.is_dir():
        for path in sorted(folder.glob("*.JPEG")):
            label = path.stem.split("_", 1)[1].replace("_", " ")
            with Image.open(path) as img:
                sources.append((img.convert("RGB"), f"a photo of a {label}"))
    if not sources:
        sources = [(synthetic_image(i, (500, 375)), f"a synthetic picture number {i}") for i in range(64)]
    samples = []
    encoded: dict[tuple[int, bool], bytes] = {}  # a large run repeats each (picture, mirrored) pair: encode it once
    for i in range(pairs):
        img, caption = sources[i % len(sources)]
        mirrored = bool((i // len(sources)) % 2)
        variant = (i % len(sources), mirrored)
        if variant not in encoded:
            shown = ImageOps.mirror(img) if mirrored else img
            # What the downloader stores by default: 256x256, border-padded, JPEG q95.
            padded = ImageOps.pad(shown, (256, 256), method=Image.Resampling.LANCZOS, color=(0, 0, 0))
            encoded[variant] = encode_image(padded)
        samples.append(FixtureSample(f"{i:09d}", caption, encoded[variant]))
    per = (pairs + shards - 1) // shards
    out = []
    for s in range(shards):
        out.append(write_shard(work / "shards", samples[s * per : (s + 1) * per], name=f"{s:06d}"))
    return out


def save_random_checkpoint(path: Path) -> None:
    import torch

    os.environ["LAION_ALLOW_RANDOM_WEIGHTS"] = "1"
    from laion_tasks.models.clip import load_clip

    clip = load_clip(MODEL, device="cpu", seed=0)
    torch.save(clip.model.state_dict(), path)


OURS = """
import json, sys, time
from laion_tasks.config import ClipConfig, ClipModelConfig
from laion_tasks.models.clip import cached_clip
from laion_tasks.stages.clip.encode import clip_score_shard
args = json.loads(sys.argv[1])
model = ClipModelConfig(model=args["model"], pretrained=None, checkpoint=args["ckpt"], threshold=0.28)
cfg = ClipConfig(english=model, multilingual=model, use_multilingual=False, device=args["device"],
                 batch_size=args["batch_size"], num_workers=args["workers"])
t0 = time.perf_counter()
cached_clip(model.model, None, model.checkpoint, cfg.device, cfg.seed)
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
scored = 0
for pq_path, tar_path in args["shards"]:
    name = pq_path.rsplit("/", 1)[-1].replace(".parquet", "")
    out = args["out"] + "/" + name
    st = clip_score_shard(pq_path, tar_path, out + ".parquet", out + ".img.npy", out + ".txt.npy", cfg)
    scored += st.extra["scored_pairs"]
elapsed = time.perf_counter() - t0
print("\\nRESULT " + json.dumps({"pairs": scored, "seconds": elapsed, "load_s": load_s}))
"""

PEER = """
import json, sys, time
args = json.loads(sys.argv[1])
from all_clip import load_clip
from clip_retrieval.clip_inference.main import main
clip_model = "open_clip:" + args["model"] + "/" + args["ckpt"]
t0 = time.perf_counter()
# Same keyword order as clip_retrieval's ClipMapper, so main() below hits this lru_cache entry.
load_clip(clip_model=clip_model, use_jit=False, warmup_batch_size=args["batch_size"], clip_cache_path=None)
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
main(input_dataset=args["wds_pattern"], output_folder=args["out"], input_format="webdataset",
     batch_size=args["batch_size"], num_prepro_workers=args["workers"], enable_text=True, enable_image=True,
     enable_metadata=True, clip_model=clip_model, use_jit=False, enable_wandb=False)
elapsed = time.perf_counter() - t0
print("\\nRESULT " + json.dumps({"pairs": args["pairs"], "seconds": elapsed, "load_s": load_s}))
"""


def run_side(python: Path, code: str, args: dict, env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    t0 = time.perf_counter()
    # A real script file with a __main__ guard: clip-retrieval starts "spawn" processes that re-import it.
    script = Path(args["out"]) / "run_side.py"
    body = textwrap.indent(code.strip("\n"), "    ")
    script.write_text(f"def _main():\n{body}\n\n\nif __name__ == '__main__':\n    _main()\n")
    proc = subprocess.run([str(python), str(script), json.dumps(args)], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # clip-retrieval's progress printer ends lines with "\r", so find the marker anywhere.
    found = re.findall(r"RESULT (\{[^\n\r]*\})", proc.stdout)
    if not found:
        raise RuntimeError(f"{python}: no RESULT line in its output:\n{proc.stdout[-3000:]}")
    result = json.loads(found[-1])
    result["process_wall_s"] = wall
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    return result


def correctness(work: Path, shards: list[tuple[Path, Path]], ckpt: Path, reference_pairs: int) -> dict:
    import io
    import tarfile

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from laion_tasks.models.clip import load_clip

    ours_img, ours_txt, keys = [], [], []
    for pq_path, _ in shards:
        name = pq_path.stem
        rows = pq.read_table(work / "ours" / f"{name}.parquet").to_pylist()
        ours_img.append(np.load(work / "ours" / f"{name}.img.npy").astype(np.float32))
        ours_txt.append(np.load(work / "ours" / f"{name}.txt.npy").astype(np.float32))
        keys += [r["key"] for r in rows]
    ours_img_a, ours_txt_a = np.concatenate(ours_img), np.concatenate(ours_txt)
    index = {k: i for i, k in enumerate(keys)}

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    # 1. open_clip's reference encoding of the first pairs (its transform on the PIL image).
    clip = load_clip(MODEL, checkpoint=str(ckpt), device="cpu")
    images, captions, ref_keys = [], [], []
    with tarfile.open(shards[0][1]) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(images) < reference_pairs:
                key = member.name[:-4]
                images.append(Image.open(io.BytesIO(tar.extractfile(member).read())))
                captions.append(tar.extractfile(f"{key}.txt").read().decode())
                ref_keys.append(key)
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(clip.model.encode_image(torch.stack([clip.preprocess(i) for i in images])), dim=-1)
        ref_txt = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(captions)), dim=-1)
    idx = [index[k] for k in ref_keys]
    ref_img_cos, ref_txt_cos = cos(ours_img_a[idx], ref_img.numpy()), cos(ours_txt_a[idx], ref_txt.numpy())

    # 2. clip-retrieval's embeddings of all pairs, matched by key.
    peer_meta = pq.read_table(sorted((work / "peer" / "metadata").glob("*.parquet"))[0]).to_pylist()
    peer_img = np.load(sorted((work / "peer" / "img_emb").glob("*.npy"))[0]).astype(np.float32)
    peer_txt = np.load(sorted((work / "peer" / "text_emb").glob("*.npy"))[0]).astype(np.float32)
    pidx = [index[m["image_path"]] for m in peer_meta]
    peer_img_cos, peer_txt_cos = cos(ours_img_a[pidx], peer_img), cos(ours_txt_a[pidx], peer_txt)
    return {
        "reference_pairs": len(idx),
        "ref_img_cos_min": float(ref_img_cos.min()),
        "ref_txt_cos_min": float(ref_txt_cos.min()),
        "peer_pairs": len(pidx),
        "peer_img_cos_min": float(peer_img_cos.min()),
        "peer_img_cos_mean": float(peer_img_cos.mean()),
        "peer_txt_cos_min": float(peer_txt_cos.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=1, help="Alternate ours/peer this many times; best round counts.")
    parser.add_argument("--reference-pairs", type=int, default=32)
    parser.add_argument("--ours-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="interpreter (or wrapper script) that runs our side")
    parser.add_argument("--peer-python", type=Path, default=None,
                        help="interpreter with clip-retrieval 2.45.0; default: the venv of ../shared/PEERS.md")
    parser.add_argument("--keep", action="store_true", help="Keep the temp dir with shards and outputs.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "clip.json",
                        help="the JSON record (bench/README.md)")
    args = parser.parse_args()

    peer_python = args.peer_python or ensure_peer()
    work = Path(tempfile.mkdtemp(prefix="laion-clip-bench-"))
    shards = build_shards(work, args.pairs, args.shards)
    ckpt = work / "vit_b_32_random_seed0.pt"
    save_random_checkpoint(ckpt)
    common = {
        "model": MODEL, "ckpt": str(ckpt), "batch_size": args.batch_size, "workers": args.workers,
        "device": args.device, "pairs": args.pairs, "shards": [[str(p), str(t)] for p, t in shards],
        # clip-retrieval takes a brace pattern: dir/{000000..000003}.tar
        "wds_pattern": f"{shards[0][1].parent}/{{{shards[0][1].stem}..{shards[-1][1].stem}}}.tar",
    }
    ours_runs, peer_runs = [], []
    for r in range(args.rounds):
        for side in ("ours", "peer"):
            out = work / side
            if out.exists():
                import shutil

                shutil.rmtree(out)
            out.mkdir()
            if side == "ours":
                res = run_side(args.ours_python, OURS, {**common, "out": str(out)}, {})
                ours_runs.append(res)
            else:
                res = run_side(peer_python, PEER, {**common, "out": str(out)}, {"NO_ALBUMENTATIONS_UPDATE": "1"})
                peer_runs.append(res)
            print(f"round {r} {side}: {res['pairs']} pairs in {res['seconds']:.1f}s = {res['pairs_per_s']:.2f} pairs/s "
                  f"(model load {res['load_s']:.1f}s, process {res['process_wall_s']:.1f}s)", flush=True)
    check = correctness(work, shards, ckpt, args.reference_pairs)
    print(json.dumps(check, indent=2))
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    machine = machine_info()
    if not on_gpu and machine["gpu"]:
        machine["note"] = f"ran on the CPU; the machine's GPU ({machine['gpu']}) was not used"
        machine["gpu"] = None
    setup = (
        f"torch threads: default. Model: open_clip {MODEL}, 224 px, **randomly initialised** (seed 0; no weights "
        "exist on this machine), saved once as a checkpoint that both sides load: same architecture and FLOPs as the "
        "laion2b weights, so throughput is representative; similarities are not. "
        + ("bf16 autocast on the GPU (ours)" if on_gpu else "fp32 on CPU (both)") + f". Data: {args.pairs} pairs in "
        f"{args.shards} download-style WebDataset shards (256x256 border-padded JPEG q95, ImageNet sample images, "
        f"\"a photo of a <class>\" captions). Batch {args.batch_size}, {args.workers} decode workers on both sides. "
        "Timed: after the model is loaded, all shards: read tar, decode, preprocess, tokenize, encode image and text, "
        "write embeddings (ours also: language ID, status parquet, similarity). Best of "
        f"{args.rounds} alternating round(s)."
    )

    def best(runs: list[dict]) -> dict:
        top = max(runs, key=lambda r: r["pairs_per_s"])
        return {"pairs_per_s": top["pairs_per_s"], "seconds": top["seconds"], "load_s": top["load_s"],
                "rounds_pairs_per_s": [r["pairs_per_s"] for r in runs], "rounds": runs}

    run = {
        "date": now(),
        "command": f".venv/bin/python bench/clip_bench.py --pairs {args.pairs} --shards {args.shards} "
                   f"--batch-size {args.batch_size} --workers {args.workers} --rounds {args.rounds} --device {args.device}"
                   + (" (through bench/device_clip_gpu.sh: each side's interpreter given)" if args.peer_python else ""),
        "machine": machine, "setup": setup,
        "settings": {"model": MODEL, "pairs": args.pairs, "shards": args.shards, "batch_size": args.batch_size,
                     "workers": args.workers, "rounds": args.rounds, "device": "cuda" if on_gpu else "cpu"},
        "ours": best(ours_runs), "peer": {"name": "clip-retrieval 2.45.0", **best(peer_runs)}, "correctness": check,
    }
    # A GPU run and a CPU run are different figure sets: keep both in the record.
    save_run(args.out.stem, {"label": "latest GPU" if on_gpu else "latest", **run},
             title="CLIP scoring (`bench/clip_bench.py`)", results_dir=args.out.parent)
    print(f"recorded in {args.out}")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
