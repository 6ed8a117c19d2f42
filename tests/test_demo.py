"""The demo's held-out patients: spread over the ids, and a model is reused only if trained without them."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from labtrend.cli import _demo_holdout, _model_excludes


def test_holdout_is_spread_over_the_ids_and_deterministic():
    pats = pd.DataFrame({"patient_id": [f"{10000000 + 37 * i}" for i in range(100)]})
    h = _demo_holdout(pats, 10)
    assert len(h) == len(set(h)) == 10 and h == sorted(h)
    ids = sorted(pats["patient_id"])
    positions = [ids.index(p) for p in h]
    assert min(positions) < 10 and max(positions) >= 90  # from the whole range, not the first ten
    assert _demo_holdout(pats.sample(frac=1, random_state=1), 10) == h
    assert _demo_holdout(pats, 0) == [] and _demo_holdout(pats.head(3), 10) == sorted(pats["patient_id"].head(3))


def test_a_model_is_reused_only_when_trained_without_exactly_the_holdout(tmp_path):
    holdout = ["a", "b"]
    assert not _model_excludes(tmp_path, holdout)  # no model at all
    (tmp_path / "config.json").write_text("{}")
    sha = hashlib.sha256("\n".join(holdout).encode()).hexdigest()
    (tmp_path / "patients.json").write_text(json.dumps({"excluded_sha256": sha}))
    assert _model_excludes(tmp_path, holdout)
    assert not _model_excludes(tmp_path, ["a"])
    (tmp_path / "patients.json").write_text(json.dumps({"excluded_sha256": None}))  # trained on everyone
    assert not _model_excludes(tmp_path, holdout) and _model_excludes(tmp_path, [])


def test_demo_model_gets_the_committed_card_with_a_note_and_keeps_its_own(tmp_path):
    from labtrend.cli import _demo_model_card

    assert _demo_model_card(tmp_path)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert "held-out patients" in card["meta"]["note"] and card["methods"]
    readme = (tmp_path / "README.md").read_text()
    assert "held-out patients" in readme and "|" in readme
    (tmp_path / "model_card.json").write_text('{"mine": true}')
    assert not _demo_model_card(tmp_path)  # a card of the model's own is never replaced
    assert json.loads((tmp_path / "model_card.json").read_text()) == {"mine": True}


def test_demo_card_of_another_architecture_says_its_figures_are_not_this_models(tmp_path):
    """A committed card measured on a model of another size (an earlier recipe) is copied with a note saying so."""
    from labtrend.cli import _card_parameters, _demo_model_card, settings

    results = settings.PROJECT_ROOT / "benchmarks" / "results"
    src = next(p for p in (results / "model_card_mimic" / "model_card.json", results / "model_card_mimic_fold0.json")
               if p.is_file())
    measured = _card_parameters(json.loads(src.read_text()))
    assert measured
    (tmp_path / "run.json").write_text(json.dumps({"report": {"n_parameters": measured + 1}}))
    assert _demo_model_card(tmp_path)
    note = json.loads((tmp_path / "model_card.json").read_text())["meta"]["note"]
    assert "EARLIER" in note and "not this model's" in note and "labtrend evaluate" in note
    assert "EARLIER" in (tmp_path / "README.md").read_text()
