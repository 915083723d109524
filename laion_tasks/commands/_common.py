"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Optional

import typer

from laion_tasks import layout, progress, storage
from laion_tasks.config import Settings, load_settings
from laion_tasks.lineage import Lineage

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (default: $LAION_CONFIG).")

SNAPSHOT_HELP = "Snapshot id, e.g. CC-MAIN-2024-10."

ForceOption = typer.Option(False, "--force/--no-force", help="Run again although lineage has a current run.")


def snapshot_option(required: bool = True, help: str = SNAPSHOT_HELP) -> Any:
    """``--snapshot``/``-s``: every command names its snapshot the same way (never positionally)."""
    return typer.Option(... if required else None, "--snapshot", "-s", help=help)


class CliError(Exception):
    """A command's one-line failure: ``what`` went wrong and ``where`` (an option, a file, a variable).

    ``laion`` prints it as ``error: <what>, in <where>`` and exits with 2.
    """

    def __init__(self, what: str, where: str | None = None) -> None:
        super().__init__(f"{what}, in {where}" if where else what)
        self.what = what
        self.where = where


def settings_from(config: Optional[Path]) -> Settings:
    settings = load_settings(config)
    storage.configure(settings.storage)
    progress.configure(settings.orchestration.progress_interval_s)
    return settings


def settings_for_files(config: Optional[Path], snapshot: str | None, *, may_start: bool = False) -> Settings:
    """Settings of a one-shard command on named files; the snapshot, when given, must be known (it records there)."""
    settings = settings_from(config)
    if snapshot is not None:
        require_snapshot(settings, snapshot, may_start=may_start)
    return settings


def shard_of(uri: str) -> str:
    """The shard id a named Parquet file stands for (its file name)."""
    return uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


def lineage_from(settings: Settings, enabled: bool = True) -> Lineage | None:
    return Lineage(settings.lineage.url) if enabled else None


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# -- which snapshots exist -----------------------------------------------------------


def require_snapshot(settings: Settings, snapshot: str, *, may_start: bool = False) -> None:
    """Refuse a snapshot this installation does not know, before anything is created for it.

    A snapshot is known when lineage has a record of it (written when its first stage ran)
    or storage holds data under ``<root>/<snapshot>/``. With ``may_start`` (the extract
    stage, which plans a crawl's WAT files and so begins a snapshot) a Common Crawl id
    (``CC-MAIN-YYYY-WW``) is enough. Neither check creates a lineage database or a directory,
    so a typo leaves no trace.
    """
    try:
        layout.check_name(snapshot, "snapshot")
    except ValueError as exc:
        raise CliError(str(exc), "--snapshot") from None
    recorded = lineage_snapshot_ids(settings.lineage.url)
    root = layout.snapshot_root(settings.storage.root, snapshot)
    if snapshot in recorded or has_data(root) or (may_start and is_crawl_id(snapshot)):
        return
    reasons = [f"no lineage record in {_display_url(settings.lineage.url)}", f"nothing under {root}"]
    if may_start:
        reasons.append("not a Common Crawl id (CC-MAIN-YYYY-WW)")
    close = difflib.get_close_matches(snapshot, sorted(recorded | set(settings.orchestration.snapshots)), n=1, cutoff=0.6)
    listed = ", ".join(sorted(recorded)[:5]) + (", ..." if len(recorded) > 5 else "")
    hint = f"; did you mean {close[0]}?" if close else f"; lineage has {listed}" if recorded else ""
    raise CliError(f"unknown snapshot {snapshot!r} ({', '.join(reasons)}{hint})", "--snapshot")


def is_crawl_id(snapshot: str) -> bool:
    """``CC-MAIN-YYYY-WW`` with a week from 1 to 53: an id Common Crawl may list WAT files for."""
    from laion_tasks.crawls import CRAWL_ID

    match = CRAWL_ID.match(snapshot)
    return match is not None and 1 <= int(match.group(2)) <= 53


def lineage_snapshot_ids(url: str) -> set[str]:
    """The snapshot ids lineage has records of, read without creating or migrating anything.

    A SQLite file that does not exist holds none (opening it would create it), and neither
    does a database whose schema was never created.
    """
    import sqlalchemy as sa

    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1] if ":///" in url else ""
        if not path or path == ":memory:" or not Path(path).exists():
            return set()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("snapshot"):
                return set()
            return {row[0] for row in conn.execute(sa.text("SELECT id FROM snapshot"))}
    except sa.exc.SQLAlchemyError as exc:
        raise CliError(f"cannot read lineage at {_display_url(url)}: {type(exc).__name__}: {exc}", "lineage.url") from None
    finally:
        engine.dispose()


def has_data(uri: str) -> bool:
    """Something is stored under a directory or prefix (one listing call on S3, not a full walk)."""
    if storage.is_s3(uri):
        loc = storage.parse_s3(uri)
        try:
            page = storage.s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/", MaxKeys=1)
        except Exception as exc:  # noqa: BLE001 - botocore's errors have no common base worth importing here
            raise CliError(f"cannot list {uri}: {type(exc).__name__}: {exc}", "storage.root") from None
        return bool(page.get("KeyCount") or page.get("Contents"))
    path = storage.local_path(uri)
    return path.is_dir() and any(path.iterdir())


def _display_url(url: str) -> str:
    """A database URL without its password."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url
