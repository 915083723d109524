"""CLIP scoring (the ``clip`` stage; its input side in :mod:`.data`, its model side in :mod:`.encode`): image-text cosine similarity, the caption's language and fp16 embeddings per shard.

Input is one download shard: a WebDataset tar (``KEY.jpg``/``KEY.webp`` + ``.txt`` + ``.json``)
and the parquet of *all* its samples (``status == "success"`` means the image is in the tar).
Output, aligned row for row with that parquet:

* a parquet with ``similarity``, ``clip_status`` and the caption's language. No threshold is
  applied here: curate and dedup compare the stored similarity with ``clip.*.threshold``,
  so changing a threshold re-runs curation, never GPU scoring;
* two ``.npy`` fp16 arrays (image and text embeddings, L2-normalised, zeros where
  ``has_embedding`` is false) that the index stage memory-maps.

As in LAION-5B, English captions are scored with the English model (threshold 0.28 for
ViT-B/32), other detected languages with the multilingual model (0.26), and captions with no
detected language with the English model; ``language_group`` records the route.

Throughput: a torch DataLoader reads the tar by offset in parallel workers, decodes and
preprocesses with the model's own open_clip transform (bit-identical to open_clip), and pins
memory on CUDA. On CUDA, JPEGs can instead be decoded batched on the GPU with
``torchvision.io.decode_jpeg`` and resized there: close to, not bit-identical with, the PIL
path (see tests). AMP (bf16/fp16) on CUDA, fp32 on CPU.
"""

from __future__ import annotations

from laion_tasks import layout
from laion_tasks.langid import LANGID_FIELDS
from laion_tasks.stage import Context, ShardStats, StageSpec


def _run_clip(ctx: Context, shard: str) -> ShardStats:
    from laion_tasks.stages.clip.encode import score_with_settings  # torch: only where the stage runs

    root, snap = ctx.root, ctx.snapshot
    return score_with_settings(
        ctx.settings,
        _images_parquet(ctx, shard),
        ctx.uri("tar", layout.images_tar_uri(root, snap, shard)),
        _clip_parquet(ctx, shard),
        ctx.uri("img_emb", layout.clip_image_emb_uri(root, snap, shard)),
        ctx.uri("txt_emb", layout.clip_text_emb_uri(root, snap, shard)),
    )


def _images_parquet(ctx: Context, shard: str) -> str:
    return ctx.uri("images_parquet", layout.images_parquet_uri(ctx.root, ctx.snapshot, shard))


def _clip_parquet(ctx: Context, shard: str) -> str:
    """The commit object (``laion clip --out-parquet`` names its own)."""
    return ctx.uri("out_parquet", layout.clip_parquet_uri(ctx.root, ctx.snapshot, shard))


def _download_shards(ctx: Context) -> list[str]:
    from laion_tasks.stages.regroup import download_shard_ids

    return download_shard_ids(ctx)


SPEC = StageSpec(
    name="clip",
    pod_section="clip",
    reads=("download",),
    # The models, and the language ID that routes each pair to one of them; the device, the precision
    # (bf16/fp16 autocast on a GPU) and the JPEG decoder (nvJPEG or PIL), which change the embeddings.
    # Not the thresholds: curate applies them to the stored similarity. Not batch_size, workers,
    # channels_last, compile, pod knobs (stage.EXECUTION_ONLY).
    result_fields=("clip.*.model", "clip.*.pretrained", "clip.*.checkpoint", "clip.use_multilingual", "clip.seed",
                   "clip.device", "clip.precision", "clip.gpu_jpeg_decode", *LANGID_FIELDS),
    output=_clip_parquet,
    run_shard=_run_clip,
    shards=_download_shards,
    plan_name="shards",
    input_uri=_images_parquet,
    section="clip",
)
