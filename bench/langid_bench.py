"""Language ID on short texts: ours (fastText lid.176.ftz) vs CLD3 (gcld3, what LAION used).

    .venv/bin/python bench/langid_bench.py

Data: ../shared/data/langid/lingua-py/language-testdata/{single-words,word-pairs,sentences}
(75 languages, test-only licence: read in place, never copied). Each side runs in its own
process pinned to one core; strings/s is per core and counts only the detector calls
(ours: ``detect_languages`` on the whole list, which includes whitespace cleanup),
measured as process CPU time so that other load on the shared machine does not count.
Accuracy is top-1 over all 75 languages (a language a detector does not know counts as
wrong for it) and over the languages both detectors support.

Codes are mapped to the test set's ISO 639-1: CLD3 ``iw``->``he``, ``fil``->``tl``,
``no``->``nb``, ``xx-Latn`` -> ``xx`` (romanised output still names the language);
fastText ``no``->``nb``. The gcld3 venv is /work/peers/gcld3 (see ../shared/PEERS.md;
it needs ``apt-get install -y protobuf-compiler libprotobuf-dev`` before pip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "langid" / "lingua-py" / "language-testdata"
PEER_VENV = Path("/work/peers/gcld3")
SETS = ("single-words", "word-pairs", "sentences")
RESULTS = ROOT / "bench" / "results" / "tag.md"

# Languages each detector can output (test-set codes after mapping).
LID176_MISSING = {"lg", "mi", "sn", "st", "tn", "ts", "xh", "zu"}
CLD3_MISSING = {"lg", "tn", "ts", "nn"}


def map_cld3(code: str) -> str:
    code = code.split("-")[0]
    return {"iw": "he", "fil": "tl", "no": "nb", "jw": "jv"}.get(code, code)


def map_fasttext(code: str) -> str:
    return {"no": "nb"}.get(code, code)


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "gcld3"], check=True)
    return python


def load(set_name: str) -> dict[str, list[str]]:
    out = {}
    for path in sorted((DATA / set_name).glob("*.txt")):
        out[path.stem] = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def run_ours(files: list[Path]) -> tuple[dict[str, list[str]], dict[str, float]]:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from laion_tasks.langid import detect_languages

    detect_languages(["warm up"])
    preds, secs = {}, {}
    for path in files:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        start = time.process_time()
        dets = detect_languages(lines)
        secs[str(path)] = time.process_time() - start
        preds[str(path)] = [d.language for d in dets]
    return preds, secs


def main() -> None:
    if not DATA.exists():
        sys.exit(f"{DATA} is missing (../shared/data)")
    files = [p for s in SETS for p in sorted((DATA / s).glob("*.txt"))]
    if os.environ.get("LANGID_BENCH_CHILD") == "ours":
        preds, secs = run_ours(files)
        print(json.dumps({"predictions": preds, "seconds": secs}))
        return
    ours = json.loads(subprocess.run([sys.executable, __file__], env={**os.environ, "LANGID_BENCH_CHILD": "ours"},
                                     check=True, capture_output=True, text=True).stdout)
    peer = json.loads(subprocess.run([str(ensure_peer()), str(ROOT / "bench" / "peers" / "gcld3_predict.py"),
                                      *map(str, files)], check=True, capture_output=True, text=True).stdout)
    both_supported = lambda lang: lang not in LID176_MISSING and lang not in CLD3_MISSING  # noqa: E731
    rows = []
    for set_name in SETS:
        stats = {}
        for name, result, mapper in (("ours", ours, map_fasttext), ("cld3", peer, map_cld3)):
            n = correct = n_common = correct_common = 0
            seconds = 0.0
            for path in sorted((DATA / set_name).glob("*.txt")):
                lang = path.stem
                preds = [mapper(p) for p in result["predictions"][str(path)]]
                hits = sum(p == lang for p in preds)
                n += len(preds)
                correct += hits
                if both_supported(lang):
                    n_common += len(preds)
                    correct_common += hits
                seconds += result["seconds"][str(path)]
            stats[name] = (correct / n, correct_common / n_common, n / seconds, n)
        rows.append((set_name, stats))
    lines = [
        "## Language ID on short texts: fastText lid.176.ftz (ours) vs CLD3 (gcld3 3.0.13)",
        "",
        "`.venv/bin/python bench/langid_bench.py`. Data: lingua-py language-testdata, 75 languages "
        "(read in place from ../shared/data, not redistributed). Each detector in its own process pinned to one core, speed = strings per CPU-second of that process; "
        "2-core shared VM (CPU), other helpers' processes were running, so speeds are indicative. "
        "Accuracy: top-1, all 75 languages (languages a detector cannot output count as misses: lid.176 lacks "
        f"{', '.join(sorted(LID176_MISSING))}; CLD3 lacks {', '.join(sorted(CLD3_MISSING))}), and over the "
        f"{75 - len(LID176_MISSING | CLD3_MISSING)} languages both support. Code mapping: CLD3 iw->he, fil->tl, "
        "no->nb, xx-Latn->xx; fastText no->nb. CLD3 settings as LAION: min_num_bytes=0, max_num_bytes=1000.",
        "",
        "| set | strings | acc. ours (all 75) | acc. CLD3 (all 75) | acc. ours (common) | acc. CLD3 (common) "
        "| strings/s/core ours | strings/s/core CLD3 | speed ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for set_name, s in rows:
        o, c = s["ours"], s["cld3"]
        lines.append(
            f"| {set_name} | {o[3]:,} | {o[0]:.1%} | {c[0]:.1%} | {o[1]:.1%} | {c[1]:.1%} | {o[2]:,.0f} | {c[2]:,.0f} "
            f"| {o[2] / c[2]:.1f}x |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(RESULTS, "## Language ID", section)


def write_section(path: Path, header_prefix: str, section: str) -> None:
    """Replace (or append) the section starting with ``header_prefix`` in a results file."""
    text = path.read_text() if path.exists() else "# Tag stage benchmarks\n\n"
    parts = text.split("\n## ")
    head, rest = parts[0], ["## " + p for p in parts[1:]]
    rest = [p for p in rest if not p.startswith(header_prefix)] + [section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(p.rstrip("\n") + "\n" for p in rest))


if __name__ == "__main__":
    main()
