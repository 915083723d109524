"""``laion <stage> ...``: the same stage functions from the shell and inside GPU pods.

Each module in ``laion_tasks/commands`` adds its commands through ``register(app)``,
so stages stay independent of each other.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import typer

import laion_tasks.commands as commands_pkg

app = typer.Typer(no_args_is_help=True, add_completion=False, help="LAION-style dataset pipeline from Common Crawl.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
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
