"""Language ID: the fastText + lingua hybrid, its ISO 639-1 codes, LAION's routing, and accuracy on real data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from laion_tasks.config import LangIdConfig, Settings
from laion_tasks.langid import LANGID_FIELDS, Detection, LangIdOptions, detect_languages, language_group

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "langid" / "lingua-py" / "language-testdata"


def test_routing_is_laions_three_way_split() -> None:
    assert language_group(Detection("en", 0.9, "fasttext"), 0.5) == "en"
    assert language_group(Detection("de", 0.9, "lingua"), 0.5) == "multi"
    assert language_group(Detection("de", 0.4, "lingua"), 0.5) == "nolang"
    assert language_group(Detection("", 0.0), 0.5) == "nolang"


def test_clear_text_stays_with_fasttext_and_routes() -> None:
    texts = ["The quick brown fox jumps over the lazy dog near the river bank",
             "Der Hund schläft im Garten unter dem großen Baum", "", "   ", "12345 678"]
    dets = detect_languages(texts)
    assert [d.language for d in dets[:2]] == ["en", "de"]
    assert [d.source for d in dets[:2]] == ["fasttext", "fasttext"]
    assert [language_group(d, 0.5) for d in dets[:2]] == ["en", "multi"]
    assert dets[2] == dets[3] == Detection("", 0.0)  # empty: no model asked
    assert language_group(dets[4], 0.5) == "nolang"  # digits only: no language


def test_unsure_and_macro_codes_defer_to_lingua_with_iso_639_1_codes() -> None:
    # lid.176 answers "no" (Norwegian), a macrolanguage, for this Bokmål; lingua splits it into nb / nn.
    text = "Dette er en bok om norsk historie og kultur"
    fast = detect_languages([text], LangIdOptions(method="fasttext"))[0]
    assert fast.language == "no"
    for refine in (True, False):
        hybrid = detect_languages([text], LangIdOptions(refine_confusable=refine))[0]
        assert hybrid.source == "lingua" and hybrid.language in {"nb", "nn"}
    # A confident answer inside a family lid.176 confuses is refined within that family only.
    malay = "Saya suka makan nasi lemak pada waktu pagi bersama keluarga saya"
    refined = detect_languages([malay])[0]
    assert refined.source == "lingua" and refined.language in {"id", "ms"}
    assert detect_languages([malay], LangIdOptions(refine_confusable=False))[0].source == "fasttext"
    # Whatever decides, every code is a two-letter ISO 639-1 code.
    mixed = ["hola", "Kickee Pants Print", "ceb", "Привет мир", "日本語のテキスト", "Cześć, jak się masz?"]
    for d in detect_languages(mixed):
        assert len(d.language) == 2 and d.language.islower(), d
    # Below the accept confidence lingua decides; at 0 fastText always stands.
    assert all(d.source == "fasttext" for d in detect_languages(
        mixed, LangIdOptions(accept_confidence=0.0, refine_confusable=False)) if d.language not in {"no", "sh"})
    assert {d.source for d in detect_languages(mixed, LangIdOptions(method="lingua"))} == {"lingua"}


def test_config_builds_the_options_and_every_knob_reaches_the_clip_digest() -> None:
    from laion_tasks.stages.clip import SPEC

    def clip_config_digest(settings: Settings) -> str:
        return SPEC.config_digest(settings, "000000")

    options = LangIdConfig(lingua_accuracy="high", threshold=0.6).options()
    assert options.lingua_accuracy == "high" and options.threshold == 0.6 and options.method == "hybrid"
    assert LANGID_FIELDS == ("langid.*",)
    base = clip_config_digest(Settings())
    for name, value in (("method", "fasttext"), ("accept_confidence", 0.5), ("lingua_accuracy", "high"),
                        ("lingua_max_chars", 0), ("refine_confusable", False), ("lingua_languages", "all"),
                        ("threshold", 0.6), ("model_path", "/m/lid.176.bin")):
        assert clip_config_digest(Settings.model_validate({"langid": {name: value}})) != base, name


@pytest.mark.skipif(not TESTDATA.exists(), reason="../shared/data/langid (lingua test data) is not present")
def test_hybrid_is_more_accurate_than_fasttext_alone_on_a_labelled_sample() -> None:
    """40 word pairs per language for 20 languages (fixed seed); the bench has the full 75-language figures."""
    rng = random.Random(0)
    texts, labels = [], []
    langs = ["af", "bs", "da", "de", "en", "es", "fi", "fr", "hr", "id", "it", "ms", "nb", "nl", "pl", "pt", "ru",
             "sv", "tr", "zu"]
    for lang in langs:
        lines = [x for x in (TESTDATA / "word-pairs" / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if x]
        for line in rng.sample(lines, 40):
            texts.append(line)
            labels.append(lang)

    def accuracy(options: LangIdOptions) -> float:
        found = detect_languages(texts, options)
        return sum(d.language.replace("no", "nb") == lab for d, lab in zip(found, labels)) / len(labels)

    hybrid, fast = accuracy(LangIdOptions()), accuracy(LangIdOptions(method="fasttext"))
    assert hybrid >= fast + 0.05, (hybrid, fast)
    assert hybrid >= 0.65, hybrid
