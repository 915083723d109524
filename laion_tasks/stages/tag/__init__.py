"""Tag stage: language, NSFW, watermark, aesthetics, safety hash lists, per sample of one shard.

Inputs are the download stage's parquet (every sample, with a status) and WebDataset tar,
and the clip stage's parquet plus fp16 image embeddings. The output is one parquet row
per download row, in the same order: nothing is deleted, all scores are columns.

The one exception is safety: a sample whose URL, original sha256, stored bytes or PDQ
hash matches an operator hash list gets ``tag_status = 'blocked_hashlist'`` and its
image bytes are removed from the shard. The tag parquet is written first, then the tar
is rewritten atomically without the blocked samples (``.jpg``, ``.txt`` and ``.json``).
If the run dies in between, the re-run finds the same matches and rewrites the tar.
Blocks are sticky: keys already marked blocked in a previous tag parquet stay blocked,
even if their bytes are gone from the tar. Only counts and hashes are logged.

Scores:

* ``punsafe``: LAION's CLIP NSFW head on the image embedding when ``tag.nsfw_weights`` is
  set (``nsfw_method='laion_detector'``), else CLIP zero-shot with the prompt sets
  (``'zero_shot'``), using the text tower of ``clip.english`` (the model whose image
  embeddings the clip stage stored).
* ``pwatermark``: LAION's efficientnet_b3a detector on the 256 px image when
  ``tag.watermark_weights`` is set, else zero-shot on the embedding.
* ``aesthetic_score``: the improved aesthetic predictor when ``tag.aesthetic_weights`` is set;
  null otherwise (``stats.extra['aesthetic_available'] = False``).
* ``nudenet_unsafe``: NudeNet's highest exposed-body detection score (``tag.nudenet``); with
  ``tag.nsfw_method: nudenet`` it is also ``punsafe`` (``nsfw_method='nudenet'``).
* ``nsfw_text``: an alt-text keyword hit (whole words, case-insensitive).
* ``language*``: copied from the clip stage's parquet, so language ID runs once per sample (the clip
  stage routes each pair by it, and its lineage digest covers every ``langid.*`` knob, so a knob change re-runs clip and then tag).
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, TagConfig
from laion_tasks.hashlists import HashLists, hashlists_for, pdq_hash
from laion_tasks.progress import Progress, shard_label
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec, read_parquet
from laion_tasks.stages.tag.inputs import (
    BLOCKED,
    OUTPUT_SCHEMA,
    _block_without_image,
    _clip_languages,
    _Columns,
    _DownloadRows,
    _float_column,
    _load_embeddings,
    _previously_blocked,
    _read_download_rows,
    _rewrite_tar_without,
)
from laion_tasks.wds import image_bytes, iter_samples, sample_files
from laion_tasks.stages.tag.models import (
    _aesthetic_head,
    _device,
    _nsfw_head,
    _watermark_model,
    _zero_shot_for,
    keyword_pattern,
)

log = logging.getLogger(__name__)

# tag_status -> ShardStats outcome
OUTCOMES = {
    "tagged": "success",
    "no_image": "skip:no_image",
    BLOCKED: f"drop:{BLOCKED}",
    "no_embedding": "fail:no_embedding",
    "image_unreadable": "fail:image_unreadable",
    "missing_from_tar": "fail:missing_from_tar",
}



@dataclass
class _ImageModels:
    """The models that need pixels (watermark detector, NudeNet), fed in batches of ``tag.image_batch_size``."""

    watermark: Any
    nudenet: bool
    device: str
    batch_size: int
    pending: list[tuple[int, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, config: TagConfig, clip_config: ClipConfig) -> _ImageModels:
        device = _device(clip_config)
        watermark = _watermark_model(config.watermark_weights, device) if config.watermark_weights else None
        nudenet = config.nudenet or config.nsfw_method == "nudenet"
        if nudenet:
            from laion_tasks.models.heads import nudenet_available

            if not nudenet_available():
                raise StageError("tag.nudenet or tag.nsfw_method=nudenet is on but the 'nudenet' package is not "
                                 "installed (pip install nudenet)")
        return cls(watermark, nudenet, device, config.image_batch_size)

    @property
    def wanted(self) -> bool:
        return self.watermark is not None or self.nudenet

    def add(self, i: int, image: Any, cols: _Columns) -> None:
        self.pending.append((i, image))
        if len(self.pending) >= self.batch_size:
            self.flush(cols)

    def flush(self, cols: _Columns) -> None:
        if not self.pending:
            return
        idx = [i for i, _ in self.pending]
        ims = [im for _, im in self.pending]
        if self.watermark is not None:
            from laion_tasks.models.heads import watermark_probabilities

            cols.pwatermark[idx] = watermark_probabilities(self.watermark, ims, self.device)
            for i in idx:
                cols.watermark_method[i] = "laion_detector"
        if self.nudenet:
            from laion_tasks.models.heads import nudenet_unsafe

            cols.nudenet[idx] = nudenet_unsafe(ims)
        self.pending.clear()


def _check_sample(
    i: int, files: dict[str, bytes], cols: _Columns, hashlists: HashLists | None, has_emb: np.ndarray
) -> Any:
    """Hash-list checks on one sample's bytes, then its PDQ hash and status. Returns the decoded image, or None."""
    from PIL import Image

    if cols.blocked[i]:
        return None
    data = image_bytes(files)
    if data is None:
        cols.status[i] = "missing_from_tar"
        return None
    if hashlists is not None and hashlists.image_blocked(data):
        cols.block(i)
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:
        cols.status[i] = "image_unreadable"
        return None
    digest, _quality = pdq_hash(image)
    cols.pdq[i] = digest.hex()
    if hashlists is not None and hashlists.pdq is not None and hashlists.pdq_hash_blocked(digest)[0]:
        cols.block(i)
        return None
    cols.status[i] = "tagged" if has_emb[i] else "no_embedding"
    return image


def _image_pass(
    tar_path: Path,
    tar_uri: str,
    rows: _DownloadRows,
    cols: _Columns,
    has_emb: np.ndarray,
    hashlists: HashLists | None,
    models: _ImageModels,
    stats: ShardStats,
) -> set[str]:
    """Read the tar once: hash checks, PDQ and the image models per sample. Returns the blocked keys found in it."""
    seen_in_tar: set[str] = set()
    blocked_in_tar: set[str] = set()
    in_tar = sum(1 for s in rows.statuses if s == "success")
    with Progress(shard_label("tag", tar_uri), in_tar, unit="images") as progress:
        try:
            for key, files in ((k, sample_files(m)) for k, m in iter_samples(tar_path)):
                progress.advance()
                i = rows.row_of.get(key)
                if i is None:
                    stats.note("tar_key_not_in_parquet")  # a diagnostic: not one of the rows
                    continue
                seen_in_tar.add(key)
                image = _check_sample(i, files, cols, hashlists, has_emb)
                if cols.blocked[i]:
                    blocked_in_tar.add(key)
                elif image is not None and models.wanted:
                    models.add(i, image, cols)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise StageError(f"{tar_uri}: unreadable tar: {type(exc).__name__}: {exc}") from exc
    models.flush(cols)
    for i in range(rows.n):
        if rows.statuses[i] == "success" and rows.keys[i] not in seen_in_tar and cols.status[i] == "no_image":
            cols.status[i] = "missing_from_tar"
    return blocked_in_tar


def _embedding_heads(
    cols: _Columns, emb: np.ndarray, config: TagConfig, clip_config: ClipConfig, watermark_done: bool
) -> None:
    """NSFW, watermark (unless the image detector ran) and aesthetics on rows with an image and an embedding."""
    scored = np.array([s == "tagged" for s in cols.status], dtype=bool)
    if not scored.any():
        return
    from laion_tasks.models.heads import score_embeddings

    x = emb[scored]
    if config.nsfw_method == "nudenet":
        cols.punsafe[scored] = cols.nudenet[scored]
        method = "nudenet"
    elif config.nsfw_weights:
        cols.punsafe[scored] = score_embeddings(_nsfw_head(config.nsfw_weights), x)
        method = "laion_detector"
    else:
        cols.punsafe[scored] = _zero_shot_for(clip_config, config.nsfw_prompts, config.safe_prompts).score(x)
        method = "zero_shot"
    for i in np.flatnonzero(scored):
        cols.nsfw_method[i] = method
    if not watermark_done:
        cols.pwatermark[scored] = _zero_shot_for(clip_config, config.watermark_prompts, config.clean_prompts).score(x)
        for i in np.flatnonzero(scored):
            cols.watermark_method[i] = "zero_shot"
    if config.aesthetic_weights:
        cols.aesthetic[scored] = score_embeddings(_aesthetic_head(config.aesthetic_weights), x)


def _nsfw_method(config: TagConfig) -> str:
    """The ``nsfw_method`` value ``punsafe`` is computed with under this config."""
    if config.nsfw_method == "nudenet":
        return "nudenet"
    return "laion_detector" if config.nsfw_weights else "zero_shot"


def _tag_table(
    rows: _DownloadRows, languages: dict[str, pa.Array], nsfw_text: list[bool], cols: _Columns
) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(rows.keys, pa.string()),
            "uid": pa.array([None if u is None else str(u) for u in rows.uids], pa.string()),
            **languages,
            "punsafe": _float_column(cols.punsafe),
            "nsfw_method": pa.array(cols.nsfw_method, pa.string()),
            "nsfw_text": pa.array(nsfw_text, pa.bool_()),
            "nudenet_unsafe": _float_column(cols.nudenet),
            "pwatermark": _float_column(cols.pwatermark),
            "watermark_method": pa.array(cols.watermark_method, pa.string()),
            "aesthetic_score": _float_column(cols.aesthetic),
            "pdq": pa.array(cols.pdq, pa.string()),
            "hashlist_blocked": pa.array(cols.blocked, pa.bool_()),
            "tag_status": pa.array(cols.status, pa.string()),
        },
        schema=OUTPUT_SCHEMA,
    )


def tag_shard(
    images_parquet_uri: str,
    tar_uri: str,
    clip_parquet_uri: str,
    img_emb_uri: str,
    out_parquet_uri: str,
    config: TagConfig,
    clip_config: ClipConfig,
    hashlists: HashLists | None = None,
) -> ShardStats:
    """Tag every sample of one shard; write ``out_parquet_uri``; strip hash-list matches from the tar.

    ``hashlists``: the operator's lists, loaded once for a batch (:func:`laion_tasks.hashlists.hashlists_for`); None: no lists.
    """
    stats = ShardStats(output_uri=out_parquet_uri)
    rows = _read_download_rows(images_parquet_uri)
    cols = _Columns(rows.n)
    matches_before = Counter(hashlists.matches) if hashlists else Counter()
    sticky = _previously_blocked(out_parquet_uri)

    clip_table = read_parquet(clip_parquet_uri, "clip parquet")
    languages = _clip_languages(rows, clip_table, clip_parquet_uri)
    pattern = keyword_pattern(config.nsfw_keywords)
    nsfw_text = [bool(pattern and c and pattern.search(c)) for c in rows.captions]
    _block_without_image(rows, cols, hashlists, sticky)
    emb, has_emb = _load_embeddings(rows, clip_table, img_emb_uri)
    models = _ImageModels.load(config, clip_config)

    with storage.local_copy(tar_uri) as tar_path:
        blocked_in_tar = _image_pass(tar_path, tar_uri, rows, cols, has_emb, hashlists, models, stats)
        _embedding_heads(cols, emb, config, clip_config, watermark_done=models.watermark is not None)
        # The tags first, then the tar without the blocked samples: a re-run finds the same matches.
        table = _tag_table(rows, languages, nsfw_text, cols)
        stats.bytes_written = storage.write_parquet(out_parquet_uri, table)
        removed = _rewrite_tar_without(tar_path, tar_uri, blocked_in_tar) if blocked_in_tar else 0

    for s in cols.status:
        stats.add(OUTCOMES[s])
    stats.extra.update(
        {
            "aesthetic_available": bool(config.aesthetic_weights),
            "nsfw_method": _nsfw_method(config),
            "watermark_method": "laion_detector" if config.watermark_weights else "zero_shot",
            "hashlist_matches": dict(Counter(hashlists.matches) - matches_before) if hashlists else {},
            "blocked_removed_from_tar": len(blocked_in_tar),
            "tar_members_removed": removed,
            "nsfw_text_hits": int(sum(nsfw_text)),
        }
    )
    if blocked_in_tar or cols.blocked.any():
        log.warning("shard %s: %d samples blocked by hash lists (%s); %d removed from the tar",
                    out_parquet_uri, int(cols.blocked.sum()), stats.extra["hashlist_matches"], len(blocked_in_tar))
    return stats.done()


# -- the stage's declaration ---------------------------------------------------------


def _run_tag(ctx: Context, shard: str) -> ShardStats:
    root, snap = ctx.root, ctx.snapshot
    return tag_shard(
        layout.images_parquet_uri(root, snap, shard),
        layout.images_tar_uri(root, snap, shard),
        layout.clip_parquet_uri(root, snap, shard),
        layout.clip_image_emb_uri(root, snap, shard),
        layout.tags_parquet_uri(root, snap, shard),
        ctx.settings.tag,
        ctx.settings.clip,
        hashlists_for(ctx),  # once per batch and list version (the one in the skip key)
    )


def _download_shards(ctx: Context) -> list[str]:
    from laion_tasks.stages.regroup import download_shard_ids

    return download_shard_ids(ctx)


SPEC = StageSpec(
    name="tag",
    reads=("download", "clip"),
    result_fields=(
        "tag.nsfw_*",  # nsfw_weights, nsfw_prompts, nsfw_keywords
        "tag.safe_prompts",
        "tag.watermark_*",  # watermark_weights, watermark_prompts
        "tag.clean_prompts",
        "tag.aesthetic_weights",
        "tag.nudenet",
        "hashlists.pdq_max_distance",
        # No language-ID knobs: the language is copied from the clip parquet (language ID runs once), so a
        # change of them re-runs clip, and tag follows through clip's run.
        # the CLIP model whose text tower embeds the zero-shot prompts (not device or batch sizes)
        "clip.english.model",
        "clip.english.pretrained",
        "clip.english.checkpoint",
        "clip.seed",
    ),
    output=lambda ctx, shard: layout.tags_parquet_uri(ctx.root, ctx.snapshot, shard),
    run_shard=_run_tag,
    shards=_download_shards,
    plan_name="shards",
    input_uri=lambda ctx, shard: layout.images_parquet_uri(ctx.root, ctx.snapshot, shard),
    section="tag",
    # the hash lists by content, not path: a list edited in place re-runs tag (not download)
    input_files=("hashlists.url", "hashlists.image", "hashlists.pdq"),
)

