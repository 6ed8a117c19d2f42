"""Where fine-tuning finds its pretrained checkpoint, and where pretraining writes."""

from __future__ import annotations

import pytest

from data import settings


def _fake_checkpoint(d):
    d.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "vocab.json", "scaler.json"):
        (d / name).write_text("{}")


@pytest.fixture
def var(tmp_path, monkeypatch):
    monkeypatch.delenv("LABTREND_PRETRAINED", raising=False)
    monkeypatch.setattr(settings, "VAR_DIR", tmp_path / "var")
    return tmp_path / "var"


def test_shipped_checkpoint_is_a_complete_small_checkpoint():
    import json

    d = settings.SHIPPED_PRETRAINED
    assert settings.is_checkpoint(d)
    config = json.loads((d / "config.json").read_text())
    assert (config["d_model"], config["n_layers"]) == (96, 3)  # the 'small' preset
    report = json.loads((d / "pretraining.json").read_text())
    assert report["stage"] == "pretrain" and report["steps"] > 0 and report["val"]["nmae"] < report["val"]["nmae_last_value"]


def test_fine_tuning_starts_from_the_shipped_checkpoint_until_one_is_built_here(var):
    assert settings.pretrained_dir() == settings.SHIPPED_PRETRAINED
    assert settings.pretrained_cache_dir() == var / "pretrained"  # where --stage pretrain writes
    _fake_checkpoint(var / "pretrained")
    assert settings.pretrained_dir() == var / "pretrained"


def test_environment_variable_wins(var, tmp_path, monkeypatch):
    monkeypatch.setenv("LABTREND_PRETRAINED", str(tmp_path / "mine"))
    assert settings.pretrained_dir() == tmp_path / "mine" == settings.pretrained_cache_dir()
