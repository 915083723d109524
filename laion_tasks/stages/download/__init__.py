"""Download stage: fetch the images of one shard into a WebDataset tar + a status Parquet.

Split by role, as img2dataset is:

- :mod:`.fetch`: the HTTP client (retries, redirects, SSRF guard, hash lists, opt-outs:
  robots.txt and TDMRep through :mod:`laion_tasks.net`, headers, error statuses);
- :mod:`.optout`: opt-outs embedded in images (XMP, C2PA) and per-origin short-circuits;
- :mod:`.workers`: the worker processes, each with its own event loop (decoding inline or in threads);
- :mod:`.shard`: reading a shard and writing its tar and Parquet (:func:`download_shard`,
  :func:`retry_failed`).

Outcomes in :class:`ShardStats`: ``success`` or ``fail:<status>`` for every other status,
opt-outs and safety blocks included (their status names say so: ``opted_out_*``,
``blocked_ssrf``, ``blocked_hashlist``). Decode/resize/encode
(:mod:`laion_tasks.stages.image_ops`) runs in each worker process, inline on its loop by
default (``download.decode_threads``).


The stage's declaration (:data:`SPEC`) ends this module.
"""

from laion_tasks import layout
from laion_tasks.net.origin_cache import SharedOriginStore
from laion_tasks.stage import Context, ShardStats, StageSpec
from laion_tasks.stages import regroup
from laion_tasks.stages.download.fetch import (
    ERROR_BODY_DRAIN_BYTES,
    KNOWN_DIRECTIVES_WITH_COLON,
    REDIRECT_CODES,
    RETRYABLE_STATUSES,
    ROBOTS_MAX_BYTES,
    SUCCESS,
    Blocklist,
    Fetcher,
    SampleResult,
    is_retryable,
    parse_retry_after,
    user_agent_token,
    x_robots_opt_out,
)
from laion_tasks.stages.download.shard import RESULT_SCHEMA, TAR_MTIME, download_shard, has_retryable, retry_failed
from laion_tasks.stages.download.workers import (
    WORKER_CRASH_ATTEMPTS,
    RunOutcome,
    download_rows,
    per_process_config,
    worker_count,
)

__all__ = [
    "SPEC",
    "ERROR_BODY_DRAIN_BYTES",
    "KNOWN_DIRECTIVES_WITH_COLON",
    "REDIRECT_CODES",
    "RESULT_SCHEMA",
    "RETRYABLE_STATUSES",
    "ROBOTS_MAX_BYTES",
    "SUCCESS",
    "TAR_MTIME",
    "WORKER_CRASH_ATTEMPTS",
    "Blocklist",
    "Fetcher",
    "RunOutcome",
    "SampleResult",
    "download_rows",
    "download_shard",
    "has_retryable",
    "is_retryable",
    "parse_retry_after",
    "per_process_config",
    "retry_failed",
    "user_agent_token",
    "worker_count",
    "x_robots_opt_out",
]


# -- the stage's declaration ---------------------------------------------------------

DOWNLOAD_RESULT_FIELDS = (
    # what is fetched and how failures are decided
    "download.user_agent",
    "download.request_deadline_s",
    "download.connect_timeout_s",
    "download.retries",
    "download.max_redirects",
    "download.max_response_bytes",
    "download.allow_private_networks",
    "download.disallowed_header_directives",
    "download.respect_robots_txt",
    "download.respect_tdm_reservation",
    "download.respect_embedded_optouts",
    "download.embedded_optout_dmi_values",
    "download.respect_usage_prefs",
    "download.usage_pref_refuse",
    "download.usage_pref_reading",
    # what is kept and how it is written
    "download.max_image_pixels",
    "download.max_image_side",
    "download.image_size",
    "download.resize_mode",
    "download.resize_only_if_bigger",
    "download.min_image_size",
    "download.min_image_bytes",
    "download.max_aspect_ratio",
    "download.encode_format",
    "download.encode_quality",
)
"""Not here (execution only, ``stage.EXECUTION_ONLY``): processes, decode_threads, max_concurrency,
max_per_host, backoff_*, opt_out_cache_ttl_s; shard_size shapes the plan, and each shard's checksum
is part of the skip key. Nor the hash lists (``stage.UNKEYED_READS``): blocked URLs are never
fetched and blocked images never written, but a list that grows after a crawl re-runs the tag
stage (its key has the lists' content), which re-checks every row, not the download."""


def _shard_input(ctx: Context, shard: str) -> str:
    return ctx.uri("shard", layout.shard_input_uri(ctx.root, ctx.snapshot, shard))


def _images_parquet(ctx: Context, shard: str) -> str:
    """The commit object (``laion download SHARD TAR PARQUET`` names its own)."""
    return ctx.uri("parquet", layout.images_parquet_uri(ctx.root, ctx.snapshot, shard))


def _run_download(ctx: Context, shard: str) -> ShardStats:
    from laion_tasks.hashlists import hashlists_for

    root, snap = ctx.root, ctx.snapshot
    blocklist = hashlists_for(ctx)  # once per batch, shared with tag in the same context
    # One robots.txt / tdmrep.json answer per origin for every shard and worker of this task (removed at ctx.close()).
    origin_store = ctx.resource("origin_store", SharedOriginStore.create)
    fn = retry_failed if ctx.options.get("retry_failed_downloads") else download_shard
    return fn(
        _shard_input(ctx, shard),
        ctx.uri("tar", layout.images_tar_uri(root, snap, shard)),
        _images_parquet(ctx, shard),
        ctx.settings.download,
        blocklist,
        origin_store,
    )


def _must_retry(ctx: Context, shard: str) -> bool:
    return bool(ctx.options.get("retry_failed_downloads")) and has_retryable(_images_parquet(ctx, shard))


SPEC = StageSpec(
    name="download",
    after=("extract",),
    reads=(),
    result_fields=DOWNLOAD_RESULT_FIELDS,
    output=_images_parquet,
    run_shard=_run_download,
    shards=regroup.download_shard_ids,
    plan=regroup.plan_download_shards,
    plan_name="shards",
    input_uri=_shard_input,
    external_inputs=lambda ctx, shard: "shard:" + regroup.shard_checksum(ctx, shard),
    section="download",
    must_run=_must_retry,
)
