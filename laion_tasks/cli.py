"""``laion <stage> ...``: the same stage functions from the shell and inside GPU pods.

Each module in ``laion_tasks/commands`` adds its commands through ``register(app)``,
so stages stay independent of each other.

A person reads one line per failure: configuration, validation and stage errors print
``error: <what>, in <where>`` on stderr and exit with 2 (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.25 vendors its own click: its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # older typer runs on click itself
    import click  # type: ignore[no-redef]

import laion_tasks.commands as commands_pkg

HELP_ORDER = (
    # the main door, then the single-step tools in pipeline order, then the audit and setup tools
    "run",
    "list-wats", "extract", "regroup", "download", "clip", "clip-shard", "langid", "tag", "dedup",
    "curate", "card", "index", "serve", "train", "eval",
    "funnel", "shards", "verify", "serve-lineage", "config",
)  # fmt: skip
"""``laion --help`` order; a command not listed here comes after these, by name."""


def one_line(text: str) -> str:
    """A message folded onto one line (a batch error lists its shards on several)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


class LaionGroup(TyperGroup):
    """Commands in pipeline order, and every expected failure as one ``error:`` line (exit 2)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(HELP_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: (rank.get(name, len(rank)), name))

    def invoke(self, ctx: click.Context) -> Any:
        from pydantic import ValidationError

        from laion_tasks.commands._common import CliError
        from laion_tasks.config import ConfigError
        from laion_tasks.stage import StageError
        from laion_tasks.storage import StorageError

        try:
            return super().invoke(ctx)
        except click.exceptions.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `laion eval` alone: its help, as asked
                raise
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _fail(one_line(exc.format_message()).rstrip("."), f"{command} (see {command} --help)")
        except (CliError, ConfigError) as exc:
            _fail(exc.what, exc.where, exc, ctx)
        except BrokenPipeError:  # `laion ... | head`: click's own handling exits quietly
            raise
        except (StageError, StorageError, ValidationError, ValueError, OSError) as exc:
            _fail(one_line(str(exc)) or type(exc).__name__, None, exc, ctx)


def _fail(what: str, where: str | None, exc: BaseException | None = None, ctx: click.Context | None = None) -> None:
    """Print the one line and exit 2; with ``--verbose`` re-raise, so the traceback shows too."""
    if exc is not None and ctx is not None and ctx.params.get("verbose"):
        raise exc
    click.echo(f"error: {what}, in {where}" if where else f"error: {what}", err=True)
    raise typer.Exit(2)


app = typer.Typer(
    cls=LaionGroup, no_args_is_help=True, add_completion=False, help="LAION-style dataset pipeline from Common Crawl."
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, and tracebacks with errors.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
        continue
    module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
    module.register(app)


if __name__ == "__main__":
    app()
