"""Assemble bench/RESULTS.md from the summary and each benchmark's section in bench/results/.

Each benchmark writes its own section (bench/results/<name>.md) when it runs; this script
only concatenates them under the summary, so RESULTS.md always shows the latest run.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["extract", "download", "clip", "tag", "dedup", "curate", "index", "eval"]


def main() -> None:
    parts = [(HERE / "results" / "_summary.md").read_text().rstrip() + "\n"]
    for name in ORDER + sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER and not p.stem.startswith("_")):
        path = HERE / "results" / f"{name}.md"
        if path.exists():
            parts.append(path.read_text().rstrip() + "\n")
    (HERE / "RESULTS.md").write_text("\n---\n\n".join(parts))


if __name__ == "__main__":
    main()
