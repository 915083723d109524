"""Each stage's own section: its result knobs and its execution knobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

if TYPE_CHECKING:
    pass

from laion_tasks.config.shared import Section


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
    nsfw_method: Literal["auto", "nudenet"] = "auto"
    """Where ``punsafe`` comes from: auto = the NSFW head when ``nsfw_weights`` is set, else CLIP zero-shot with the
    prompts; nudenet = NudeNet's detector score (it runs, CPU), for a CLIP whose text tower never read NSFW words,
    such as the demo's world model."""
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
    """Passed verbatim to open_clip_train.main (e.g. ["--grad-checkpointing"]), plus ``--channels-last`` and
    ``--fused-adamw``, which laion_tasks.train_entry handles (faster conv towers and optimizer steps)."""
    compare_subsets: list[str] = []
    """More subsets trained and evaluated beside ``subset`` with the same settings; the card gets one zero-shot table."""
    samples_seen: int | None = Field(None, ge=1)
    """Samples each subset trains on (over all epochs; a small subset is repeated), so compared subsets see the
    same number; None: one pass over each subset per epoch."""
