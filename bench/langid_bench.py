"""Language ID on short texts: ours (fastText lid.176.ftz + lingua hybrid) vs CLD3 (gcld3, what LAION used).

    .venv/bin/python bench/langid_bench.py

Data (read in place, never copied; test-only licence):
- accuracy: ../shared/data/langid/lingua-py/language-testdata/{single-words,word-pairs,sentences}, 75 languages;
- speed on real alt text: the 10,000 TEXT values of ../shared/data/alt_text/img2dataset_test_10000.parquet
  (median 48 characters), which also shows how often the hybrid defers to lingua and the en/multi/nolang shares.

Each detector runs in its own process pinned to one core; strings/s is per core and counts only the detector calls
(ours: ``detect_languages`` on the whole list, whitespace cleanup included), measured as process CPU time so that
other load on the shared machine counts less. Accuracy is top-1 over all 75 languages (a language a detector does
not know counts as wrong for it) and over the languages that lid.176 and CLD3 both support.

Codes are mapped to the test set's ISO 639-1: CLD3 ``iw``->``he``, ``fil``->``tl``, ``no``->``nb``,
``xx-Latn`` -> ``xx``; fastText ``no``->``nb`` (the hybrid never outputs ``no``: lingua splits it into nb/nn).
The gcld3 venv is /work/peers/gcld3 (see ../shared/PEERS.md; it needs
``apt-get install -y protobuf-compiler libprotobuf-dev`` before pip).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
DATA = SHARED / "langid" / "lingua-py" / "language-testdata"
ALT_TEXT = SHARED / "alt_text" / "img2dataset_test_10000.parquet"
PEER_VENV = Path("/work/peers/gcld3")
SETS = ("single-words", "word-pairs", "sentences")
RESULTS = ROOT / "bench" / "results" / "langid.json"
ALT = "alt-text"

# Languages each detector can output (test-set codes after mapping). lingua knows all 75.
LID176_MISSING = {"lg", "mi", "sn", "st", "tn", "ts", "xh", "zu"}
CLD3_MISSING = {"lg", "tn", "ts", "nn"}
# Ours: the shipped default (hybrid) and fastText alone (what the project used before).
CONFIGS = {"hybrid": {}, "hybrid_all": {"lingua_languages": "all"}, "fasttext": {"method": "fasttext"}}


def map_cld3(code: str) -> str:
    code = code.split("-")[0]
    return {"iw": "he", "fil": "tl", "no": "nb", "jw": "jv"}.get(code, code)


def map_ours(code: str) -> str:
    return {"no": "nb"}.get(code, code)


def ensure_peer() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "gcld3"], check=True)
    return python


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def alt_text_file(tmp: Path) -> Path:
    """The alt texts, whitespace collapsed (CLD3 reads one per line), empty ones dropped."""
    import pyarrow.parquet as pq

    texts = [re.sub(r"\s+", " ", t or "").strip() for t in pq.read_table(ALT_TEXT, columns=["TEXT"])["TEXT"].to_pylist()]
    path = tmp / "alt_text.txt"
    path.write_text("\n".join(t for t in texts if t) + "\n", encoding="utf-8")
    return path


def run_ours(files: list[Path]) -> dict[str, dict]:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from laion_tasks.config import TagConfig
    from laion_tasks.langid import detect_languages, language_group

    out: dict[str, dict] = {}
    for name, knobs in CONFIGS.items():
        config = TagConfig(**{f"langid_{k}": v for k, v in knobs.items()})
        options = config.langid()
        detect_languages(["warm up", "x"] * 10, options)
        preds, secs, sources, groups = {}, {}, {}, {}
        for path in files:
            lines = read_lines(path)
            start = time.process_time()
            dets = detect_languages(lines, options)
            secs[str(path)] = time.process_time() - start
            preds[str(path)] = [d.language for d in dets]
            sources[str(path)] = dict(Counter(d.source for d in dets))
            groups[str(path)] = dict(Counter(language_group(d, options.threshold) for d in dets))
        out[name] = {"predictions": preds, "seconds": secs, "sources": sources, "groups": groups}
    # lingua loads each language's model lazily: its first use (above, untimed warm-up aside) pays the load.
    # Time the hybrid once more with every model loaded, as a long-running worker sees it.
    options = TagConfig().langid()
    for path in files:
        lines = read_lines(path)
        start = time.process_time()
        detect_languages(lines, options)
        out["hybrid"]["seconds"][str(path)] = min(out["hybrid"]["seconds"][str(path)], time.process_time() - start)
    import resource

    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def accuracy_rows(set_name: str, result: dict, mapper) -> dict:  # type: ignore[no-untyped-def]
    both = lambda lang: lang not in LID176_MISSING and lang not in CLD3_MISSING  # noqa: E731
    n = correct = n_common = correct_common = 0
    seconds = 0.0
    per_lang = {}
    for path in sorted((DATA / set_name).glob("*.txt")):
        lang = path.stem
        preds = [mapper(p) for p in result["predictions"][str(path)]]
        hits = sum(p == lang for p in preds)
        per_lang[lang] = hits / len(preds)
        n += len(preds)
        correct += hits
        if both(lang):
            n_common += len(preds)
            correct_common += hits
        seconds += result["seconds"][str(path)]
    return {"acc": correct / n, "acc_common": correct_common / n_common, "rate": n / seconds, "n": n,
            "per_lang": per_lang}


def main() -> None:
    if not DATA.exists() or not ALT_TEXT.exists():
        sys.exit(f"{DATA} or {ALT_TEXT} is missing (../shared/data)")
    files = [p for s in SETS for p in sorted((DATA / s).glob("*.txt"))]
    if os.environ.get("LANGID_BENCH_CHILD") == "ours":
        files.append(Path(os.environ["LANGID_BENCH_ALT"]))
        print(json.dumps(run_ours(files)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        alt = alt_text_file(Path(tmp))
        env = {**os.environ, "LANGID_BENCH_CHILD": "ours", "LANGID_BENCH_ALT": str(alt)}
        ours = json.loads(subprocess.run([sys.executable, __file__], env=env, check=True, capture_output=True,
                                         text=True).stdout)
        peer = json.loads(subprocess.run([str(ensure_peer()), str(ROOT / "bench" / "peers" / "gcld3_predict.py"),
                                          *map(str, files), str(alt)], check=True, capture_output=True,
                                         text=True).stdout)
        alt_lines = read_lines(alt)
        alt_key = str(alt)
        run = report(ours, peer, alt_key, len(alt_lines))
        run["alt_text"]["median_chars"] = sorted(map(len, alt_lines))[len(alt_lines) // 2]
    sys.path.insert(0, str(ROOT / "bench"))
    from collect_results import machine_info, save_run

    run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": ".venv/bin/python bench/langid_bench.py", "machine": machine_info(), **run}
    print(json.dumps({k: v for k, v in run.items() if k != "sets"}, indent=1))
    save_run("langid", run, title="Language ID on short texts: hybrid fastText lid.176.ftz + lingua (ours) vs CLD3 "
                                  "(gcld3 3.0.13)")
    print(f"recorded in {RESULTS}")


def report(ours: dict, peer: dict, alt_key: str, n_alt: int) -> dict:
    """The run's figures as the JSON record holds them (bench/README.md; rendered by collect_results.py)."""
    names = {"hybrid": ours["hybrid"], "hybrid_all": ours["hybrid_all"], "fasttext": ours["fasttext"], "cld3": peer}
    mappers = {"hybrid": map_ours, "hybrid_all": map_ours, "fasttext": map_ours, "cld3": map_cld3}

    def lingua_share(keys: list[str]) -> float:
        src: Counter = Counter()
        for key in keys:
            src.update(ours["hybrid"]["sources"][key])
        return src["lingua"] / max(1, sum(src.values()))

    sets = {}
    for s in SETS:
        stats = {name: accuracy_rows(s, res, mappers[name]) for name, res in names.items()}
        sets[s] = {"n": stats["hybrid"]["n"],
                   "deferred_to_lingua": lingua_share([str(p) for p in sorted((DATA / s).glob("*.txt"))]),
                   "detectors": stats}
    worst = {s: [[lang, acc, sets[s]["detectors"]["cld3"]["per_lang"][lang]] for lang, acc in
                 sorted(sets[s]["detectors"]["hybrid"]["per_lang"].items(), key=lambda kv: kv[1])[:8]]
             for s in ("word-pairs", "sentences")}
    groups = {name: {g: res["groups"][alt_key].get(g, 0) / n_alt for g in ("en", "multi", "nolang")}
              for name, res in names.items() if "groups" in res}
    common = 75 - len(LID176_MISSING | CLD3_MISSING)
    setup = (
        "Each detector in its own process pinned to one core; speed = strings per CPU-second of that process "
        "(detector calls only). Accuracy: top-1, over all 75 languages (a language a detector cannot output counts "
        f"as a miss: lid.176 lacks {', '.join(sorted(LID176_MISSING))}; CLD3 lacks {', '.join(sorted(CLD3_MISSING))}) "
        f"and over the {common} languages both lid.176 and CLD3 support (\"common\"). Code mapping: CLD3 iw->he, "
        "fil->tl, no->nb, xx-Latn->xx; fastText no->nb. CLD3 settings as LAION: min_num_bytes=0, max_num_bytes=1000. "
        "Ours: `tag.langid_method=hybrid` with the defaults; 'hybrid, all 75' is the same with lingua choosing among "
        "all 75 languages (`tag.langid_lingua_languages=all`); 'fastText alone' is lid.176.ftz alone on lower-cased "
        "text."
    )
    return {
        "setup": setup,
        "test_set": {"name": "lingua-py language-testdata", "languages": 75, "common_languages": common,
                     "origin": "Leipzig Wortschatz corpora, the source of lingua's own models", "independent": False,
                     "tuned_on": "samples of this test set chose the hybrid's families and thresholds"},
        "sets": sets,
        "alt_text": {"name": "img2dataset test_10000", "n": n_alt,
                     "rate": {name: n_alt / res["seconds"][alt_key] for name, res in names.items()},
                     "deferred_to_lingua": lingua_share([alt_key]), "groups": groups},
        "worst": worst,
        "rss_mb": ours["rss_mb"],
    }


if __name__ == "__main__":
    main()
