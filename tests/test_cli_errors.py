"""What a person sees when they get something wrong: one ``error:`` line on stderr, exit 2.

Each case runs the installed ``laion`` entry point in a subprocess, as a user would, with
a temporary config, storage root and lineage database. An unknown snapshot must leave no
trace: no lineage database, no snapshot directory.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAION = str(Path(sys.executable).with_name("laion"))
CRAWL = "CC-MAIN-2024-10"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "laion.yaml"
    config.write_text(
        f"storage:\n  root: {tmp_path / 'data'}\nlineage:\n  url: sqlite:///{tmp_path / 'lineage.db'}\n"
        f"orchestration:\n  snapshots: [{CRAWL}]\n{extra}"
    )
    return config


def laion(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``laion`` in ``tmp_path`` with only our LAION_* variables (none from the calling shell)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAION_")}
    base.setdefault("LAION_CONFIG", str(tmp_path / "laion.yaml"))
    base.update(env or {})
    return subprocess.run([LAION, *args], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=300)


def the_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line, an ``error:`` line, and the exit code is 2."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_laion_config_names_a_missing_file(tmp_path: Path) -> None:
    line = the_error_line(laion(tmp_path, "config", env={"LAION_CONFIG": str(tmp_path / "nowhere.yaml")}))
    assert line == f"error: config file {tmp_path / 'nowhere.yaml'} does not exist, in LAION_CONFIG"
    line = the_error_line(laion(tmp_path, "config", "--config", "elsewhere.yaml"))
    assert line == "error: config file does not exist, in elsewhere.yaml"


def test_mistyped_key_names_the_file_and_the_closest_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "clip:\n  englsh:\n    model: ViT-B-32\n")
    line = the_error_line(laion(tmp_path, "config"))
    assert line == f"error: unknown key clip.englsh (did you mean clip.english?), in {config}"


def test_mistyped_key_in_an_env_var_names_the_variable(tmp_path: Path) -> None:
    write_config(tmp_path)
    line = the_error_line(laion(tmp_path, "config", env={"LAION_DOWNLOAD__SHARD_SISE": "5"}))
    assert line == "error: unknown key download.shard_sise (did you mean download.shard_size?), in LAION_DOWNLOAD__SHARD_SISE"


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    config = tmp_path / "laion.yaml"
    config.write_text("storage:\n  root: /tmp/x\nclip: [english\n  model: : x\n")
    line = the_error_line(laion(tmp_path, "config"))
    assert line.startswith("error: YAML syntax error at line ") and line.endswith(f", in {config}"), line


@pytest.mark.parametrize(
    "args",
    [("run", "extract", "--snapshot", "NOPE"), ("funnel", "--snapshot", "NOPE"), ("run", "curate", "--snapshot", "NOPE")],
    ids=["run-extract", "funnel", "run-curate"],
)
def test_unknown_snapshot_is_one_line_and_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    write_config(tmp_path)
    line = the_error_line(laion(tmp_path, *args))
    assert line.startswith("error: unknown snapshot 'NOPE' (no lineage record in sqlite:///") and line.endswith(", in --snapshot")
    assert not (tmp_path / "lineage.db").exists()
    assert not (tmp_path / "data").exists()


def test_a_near_miss_suggests_the_recorded_snapshot(tmp_path: Path) -> None:
    from laion_tasks.lineage import Lineage

    write_config(tmp_path)
    Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").ensure_snapshot("CC-MAIN-2023-50", str(tmp_path / "data"))
    line = the_error_line(laion(tmp_path, "shards", "--snapshot", "CC-MAIN-2023-5O"))
    assert "did you mean CC-MAIN-2023-50?" in line
    ok = laion(tmp_path, "funnel", "--snapshot", "CC-MAIN-2023-50")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr  # lineage touched, and Alembic says nothing


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    write_config(tmp_path)
    line = the_error_line(laion(tmp_path, "funnel"))
    assert "Missing option '--snapshot'" in line and line.endswith("in laion funnel (see laion funnel --help)")


def _crawl(tmp_path: Path, broken_first: bool = True) -> Path:
    """A wat.paths.gz of three WAT files; the first one listed does not exist."""
    from laion_tasks.fixtures.wat import FixturePage, write_wat

    names = [f"crawl-data/{CRAWL}/wat/{CRAWL}-{i:05d}.warc.wat.gz" for i in range(3)]
    for i, name in enumerate(names[1:] if broken_first else names, start=1 if broken_first else 0):
        page = FixturePage(url=f"http://example.com/{i}.html", date="2024-02-20T10:00:00Z",
                           images=[(f"/img/{i}.jpg", f"A picture number {i} of a red circle")])
        (tmp_path / "cc" / name).parent.mkdir(parents=True, exist_ok=True)
        write_wat(tmp_path / "cc" / name, [page])
    paths = tmp_path / "wat.paths.gz"
    paths.write_bytes(gzip.compress("".join(f"{n}\n" for n in names).encode()))
    return paths


def test_run_goes_on_past_a_failed_batch_and_reports_every_failure(tmp_path: Path) -> None:
    """Each WAT file is its own batch: the missing first one fails, the other two still run;
    download (which reads extract's candidates) is reported as not run; the report names the failure."""
    write_config(tmp_path, f"extract:\n  cc_base_url: {tmp_path / 'cc'}\n")
    paths = _crawl(tmp_path)
    env = {"LAION_ORCHESTRATION__MAX_MAPPED_TASKS": "3"}
    result = laion(tmp_path, "run", "extract", "download", "--snapshot", CRAWL, "--wat-paths-uri", str(paths), env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert f"extract failed on 1 of 3 shard(s): {CRAWL}-00000-" in errors[0] and "not run: download" in errors[0]
    report = json.loads(result.stdout)
    assert [(b["done"], len(b["failed"])) for b in report["extract"]] == [(0, 1), (1, 0), (1, 0)]
    [(failed, error)] = report["extract"][0]["errors"].items()
    assert failed.startswith(f"{CRAWL}-00000-") and "FileNotFoundError" in error
    assert report["download"] == {"not_run": "after the failed stage(s) extract"}

    from laion_tasks.lineage import Lineage

    runs = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs(CRAWL)
    assert sorted((r["stage"], r["status"]) for r in runs) == [("extract", "done"), ("extract", "done"), ("extract", "failed")]


def test_help_lists_run_first_and_every_snapshot_the_same_way() -> None:
    import typer

    from laion_tasks.cli import HELP_ORDER, app

    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    names = group.list_commands(ctx)  # type: ignore[attr-defined]
    assert names[0] == "run"
    listed = [n for n in HELP_ORDER if n in names]
    assert names[: len(listed)] == listed
    assert names.index("extract") < names.index("download") < names.index("tag") < names.index("curate") < names.index("funnel")

    def commands(cmd, path):  # type: ignore[no-untyped-def]
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield path, cmd
            return
        for name, sub in subs.items():
            yield from commands(sub, f"{path} {name}")

    with_snapshot = 0
    for path, cmd in commands(group, "laion"):
        for param in cmd.params:
            if param.name == "snapshot":
                with_snapshot += 1
                assert param.param_type_name == "option" and param.opts == ["--snapshot", "-s"], path
    assert with_snapshot >= 12
