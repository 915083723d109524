"""Extract stage: one Common Crawl WAT file -> one Parquet shard of (image URL, alt text) candidates.

Every ``IMG@/src`` link in ``Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links``
is accounted for: it is either ``kept`` or dropped with a reason (``drop:no_alt``,
``drop:alt_too_short``, ...). Records that cannot be read are counted as ``bad:<reason>``
and logged with their byte offset; the file's other records are still extracted. A file
that cannot be opened or holds no WARC records raises :class:`StageError`.

Speed: fastwarc skips non-metadata records natively, and a record's JSON is parsed only
when its bytes contain ``"IMG@/src"``. Records without that marker cannot yield an image
link, so they are counted (``records_without_img_links``) without being parsed; their JSON
validity is therefore not checked, which costs nothing in output. The records that are
parsed go through a typed msgspec decoder that materialises only the path to ``Links``
(and ``path``/``url``/``alt`` of each link), about twice as fast as building the whole
document; any record it rejects is parsed again with orjson, whose error classification
(``bad:<reason>``) is then the one reported, so both paths give the same results.
"""

from __future__ import annotations

import gzip
import logging
import random
import zlib

from laion_tasks import layout, storage
from laion_tasks.config import ExtractConfig
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec
from laion_tasks.stages.extract.links import CRAWL_ID_RE
from laion_tasks.stages.extract.records import _Extractor, _scan, _write_parquet
from laion_tasks.stages.extract.warc import _StreamReader

log = logging.getLogger(__name__)


def extract_wat(wat_uri: str, output_uri: str, config: ExtractConfig) -> ShardStats:
    """Extract the image-text candidates of one WAT file into one Parquet shard.

    Returns counts of ``kept`` links, ``drop:<reason>`` per filtered link and
    ``bad:<reason>`` per unreadable record; ``extra`` has record counts. Raises
    :class:`StageError` when the file cannot be read at all.
    """
    stats = ShardStats(output_uri=output_uri)
    extractor = _Extractor(wat_uri, config)
    try:
        with storage.open_read(wat_uri) as raw:
            reader = _StreamReader(raw)
            stream_end = _scan(extractor, reader)
    except storage.StorageError as exc:
        raise StageError(f"extract {wat_uri}: cannot read: {exc}") from exc
    for outcome, n in [*extractor.drops.items(), *extractor.outcomes.items()]:
        if n:
            stats.add(outcome, n)
    _write_parquet(extractor, output_uri, stats)
    stats.extra = {**extractor.info, "stream_end": stream_end, "input_bytes": reader.raw_pos}
    bad = {k: v for k, v in stats.counts.items() if k.startswith("bad:")}
    summary = (
        f"extract {wat_uri}: {extractor.info['metadata_records']} metadata records, "
        f"{extractor.info['img_links']} IMG links, {stats.counts.get('kept', 0)} kept -> {output_uri}"
    )
    if bad:
        log.warning("%s; bad records: %s", summary, ", ".join(f"{k[4:]}={v}" for k, v in sorted(bad.items())))
    else:
        log.info(summary)
    return stats.done()


def wat_paths_uri(crawl_id: str, config: ExtractConfig) -> str:
    """Where Common Crawl lists a crawl's WAT files."""
    return f"{config.cc_base_url.rstrip('/')}/crawl-data/{crawl_id}/wat.paths.gz"


def validate_crawl_id(crawl_id: str) -> str:
    match = CRAWL_ID_RE.match(crawl_id)
    if not match or not 1 <= int(match.group(2)) <= 53:
        raise ValueError(f"crawl id {crawl_id!r} is not of the form CC-MAIN-YYYY-WW (for example CC-MAIN-2024-10)")
    return crawl_id


def list_wat_files(crawl_id: str, config: ExtractConfig, paths_uri: str | None = None) -> list[str]:
    """The WAT file URIs of a crawl, from its ``wat.paths.gz`` (or ``paths_uri``).

    Relative paths are prefixed with ``config.cc_base_url``. ``config.sample_wat_files``
    takes a deterministic sample (``sample_seed``) kept in the listing's order; then
    ``config.max_wat_files`` keeps the first N.
    """
    validate_crawl_id(crawl_id)
    uri = paths_uri or wat_paths_uri(crawl_id, config)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise StageError(f"list WAT files of {crawl_id}: cannot read {uri}: {exc}") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise StageError(f"list WAT files of {crawl_id}: {uri} is not a valid gzip file: {exc}") from exc
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise StageError(f"list WAT files of {crawl_id}: {uri} is not a text listing: {exc}") from exc
    paths = [line for line in lines if line]
    if not paths:
        raise StageError(f"list WAT files of {crawl_id}: {uri} lists no WAT files")
    base = config.cc_base_url.rstrip("/")
    uris = [p if "://" in p else f"{base}/{p.lstrip('/')}" for p in paths]
    if config.sample_wat_files is not None and config.sample_wat_files < len(uris):
        chosen = sorted(random.Random(config.sample_seed).sample(range(len(uris)), config.sample_wat_files))
        uris = [uris[i] for i in chosen]
    if config.max_wat_files is not None:
        uris = uris[: config.max_wat_files]
    log.info("%s: %d WAT files from %s (%d listed)", crawl_id, len(uris), uri, len(paths))
    return uris


# -- the stage's declaration ---------------------------------------------------------


def _wat_uris(ctx: Context) -> dict[str, str]:
    """wat id -> WAT URI, from the plan's manifest (in crawl order); ``laion extract WAT OUT``: that one file."""
    named = ctx.uri("wat", "")
    if named:
        return {layout.wat_id(named): named}

    def load() -> dict[str, str]:
        uri = layout.wat_manifest_uri(ctx.root, ctx.snapshot)
        wats = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        return {layout.wat_id(w): w for w in wats if w}

    return ctx.resource("wat_manifest", load)


def _candidates(ctx: Context, wat: str) -> str:
    return ctx.uri("candidates", layout.candidates_uri(ctx.root, ctx.snapshot, wat))


def _plan_extract(ctx: Context) -> list[str]:
    """List the crawl's WAT files (``max_wat_files`` / ``sample_wat_files`` apply here) into the manifest."""
    wats = list_wat_files(ctx.snapshot, ctx.settings.extract, paths_uri=ctx.options.get("wat_paths_uri"))
    storage.write_text(layout.wat_manifest_uri(ctx.root, ctx.snapshot), "".join(f"{w}\n" for w in wats))
    ctx.forget("wat_manifest")
    return list(_wat_uris(ctx))


SPEC = StageSpec(
    name="extract",
    reads=(),
    # max_wat_files, sample_* and cc_base_url choose the WAT files (the plan); each file's URI is its input identity
    result_fields=("extract.min_alt_length", "extract.max_alt_length", "extract.max_url_length", "extract.allowed_schemes"),
    output=_candidates,
    run_shard=lambda ctx, wat: extract_wat(_wat_uris(ctx)[wat], _candidates(ctx, wat), ctx.settings.extract),
    shards=lambda ctx: list(_wat_uris(ctx)),
    plan=_plan_extract,
    plan_name="wat",
    input_uri=lambda ctx, wat: _wat_uris(ctx)[wat],
    external_inputs=lambda ctx, wat: "wat:" + _wat_uris(ctx)[wat],
)

