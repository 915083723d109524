"""Download stage: fetch the images of one shard into a WebDataset tar + a status Parquet.

Split by role, as img2dataset is:

- :mod:`.fetch`: the HTTP client (retries, redirects, SSRF guard, hash lists, opt-outs:
  robots.txt and TDMRep through :mod:`laion_tasks.net`, headers, error statuses);
- :mod:`.optout`: opt-outs embedded in images (XMP, C2PA) and per-origin short-circuits;
- :mod:`.workers`: the worker processes, each with its own event loop and decode threads;
- :mod:`.shard`: reading a shard and writing its tar and Parquet (:func:`download_shard`,
  :func:`retry_failed`).

Outcomes in :class:`ShardStats`: ``success`` or ``fail:<status>`` for every other status,
opt-outs and safety blocks included (their status names say so: ``opted_out_*``,
``blocked_ssrf``, ``blocked_hashlist``). Decode/resize/encode
(:mod:`laion_tasks.stages.image_ops`) runs in each worker's thread pool, so its loop never
blocks on pixels.
"""

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
from laion_tasks.stages.download.shard import RESULT_SCHEMA, TAR_MTIME, download_shard, retry_failed
from laion_tasks.stages.download.workers import (
    WORKER_CRASH_ATTEMPTS,
    RunOutcome,
    download_rows,
    per_process_config,
    worker_count,
)

__all__ = [
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
    "is_retryable",
    "parse_retry_after",
    "per_process_config",
    "retry_failed",
    "user_agent_token",
    "worker_count",
    "x_robots_opt_out",
]
