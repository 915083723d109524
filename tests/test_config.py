from pathlib import Path

import pytest

from laion_tasks.config import ConfigError, Settings, load_settings


def test_defaults_reproduce_laion_thresholds() -> None:
    settings = Settings()
    assert settings.clip.english.threshold == 0.28
    assert settings.clip.multilingual.threshold == 0.26
    assert settings.clip.multilingual.model == "xlm-roberta-base-ViT-B-32"
    assert settings.extract.min_alt_length == 5
    assert settings.download.shard_size == 10_000


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("download:\n  shard_size: 50\n  image_size: 128\nstorage:\n  root: /tmp/x\n")
    env = {"LAION_DOWNLOAD__SHARD_SIZE": "70", "LAION_CLIP__ENGLISH__THRESHOLD": "0.3", "OTHER": "1"}
    settings = load_settings(cfg, environ=env, overrides={"download": {"image_size": 64}})
    assert settings.download.shard_size == 70
    assert settings.download.image_size == 64
    assert settings.clip.english.threshold == 0.3
    assert settings.storage.root == "/tmp/x"


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("download:\n  shard_sise: 50\n")
    with pytest.raises(ConfigError, match="shard_sise") as caught:
        load_settings(cfg, environ={})
    assert (caught.value.what, caught.value.where) == ("unknown key download.shard_sise (did you mean download.shard_size?)", str(cfg))
    with pytest.raises(ConfigError, match="LAION_CLIP__ENGLISH__THRESHOLD"):
        load_settings(environ={"LAION_CLIP__ENGLISH__THRESHOLD": "high"})


def test_digest_is_stable_and_section_scoped() -> None:
    a = Settings()
    b = load_settings(environ={"LAION_DOWNLOAD__SHARD_SIZE": "5"})
    assert a.digest("extract") == b.digest("extract")
    assert a.digest("download") != b.digest("download")
    assert a.digest() == Settings().digest()
    moved = load_settings(environ={"LAION_STORAGE__ROOT": "s3://elsewhere"})
    assert moved.digest() == a.digest(), "moving data must not invalidate finished work"


def test_config_reference_is_current() -> None:
    """docs/CONFIG.md is generated from the config; regenerate it when a knob changes."""
    from laion_tasks.config_reference import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
    assert doc.read_text() == render(), "run: .venv/bin/python -m laion_tasks.config_reference > docs/CONFIG.md"


def test_rerun_table_is_current() -> None:
    """docs/RERUN.md is generated from the stage declarations, so it cannot drift from the skip keys."""
    from laion_tasks.rerun_table import dependents, render

    doc = Path(__file__).resolve().parents[1] / "docs" / "RERUN.md"
    assert doc.read_text() == render(), "run: .venv/bin/python -m laion_tasks.rerun_table > docs/RERUN.md"
    from laion_tasks import runner
    from laion_tasks.stage import STAGE_MODULES

    specs = [runner.spec(n) for n in STAGE_MODULES]
    # a tag prompt re-runs tag and what reads it, never download or clip
    assert dependents(specs, {"tag"}) == ["tag", "dedup_partition", "dedup_bucket", "dedup", "curate", "index", "train", "eval"]


@pytest.mark.parametrize("old, new", [("tag: {langid_method: fasttext}", "langid.method"),
                                      ("tag: {language_threshold: 0.5}", "langid.threshold"),
                                      ("tag: {url_hashlist: /l.txt}", "hashlists.url")])
def test_a_moved_key_names_its_new_place(tmp_path: Path, old: str, new: str) -> None:
    """Knobs live with their owner (langid, hashlists); an old config fails in one line naming the new key."""
    from laion_tasks.config import ConfigError, load_settings

    path = tmp_path / "old.yaml"
    path.write_text(old + "\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert f"moved to {new}" in str(err.value) and str(path) in str(err.value)
