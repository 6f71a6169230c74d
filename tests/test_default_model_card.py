"""The shipped model card (moescope/data/default_model): README.md is card.json rendered, so every
figure in it is card.json's; and the card states its statistics the way the project writes them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from moescope.train.card import render_card

MODEL = Path(__file__).resolve().parents[1] / "moescope" / "data" / "default_model"


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL / "card.json").read_text(encoding="utf-8"))


def test_shipped_readme_is_the_rendered_card_json(card):
    assert render_card(card) == (MODEL / "README.md").read_text(encoding="utf-8"), (
        "README.md is not card.json rendered: re-measure with "
        "`python -m moescope.train.export --remeasure moescope/data/default_model --corpus runs/corpus`")


def test_shipped_card_uses_the_current_signature_statistics(card):
    sig = card["domain_signatures"]
    assert sig["group_field"] == "doc_id" and sig["cv_repeats"] >= 2
    assert sig["cv_accuracy_ci_low"] <= sig["cv_accuracy_mean"] <= sig["cv_accuracy_ci_high"]
    assert "adds_over_token_id_control_p_value" in sig and len(sig["per_layer_p_value_holm"]) == 8
    readme = (MODEL / "README.md").read_text(encoding="utf-8")
    assert "upper bound" not in readme and "chance (1 / domains)" not in readme
    if sig["permutation_p_value"] <= 1 / (sig["permutations"] + 1) + 1e-12:
        assert f"p ≤ {1 / (sig['permutations'] + 1):.3g}" in readme  # a floor is a bound, not a value


def test_render_states_plainly_whether_routing_adds_over_token_identity(card):
    sig = card["domain_signatures"]
    adds = copy.deepcopy(card)
    adds["domain_signatures"].update(adds_over_token_id_control=0.05, adds_over_token_id_control_ci_low=0.01,
                                     adds_over_token_id_control_ci_high=0.09)
    assert "routing vs the token-id routing control: +5.0 points" in render_card(adds).lower()
    assert "routing adds significantly" in render_card(adds)
    null = copy.deepcopy(card)
    null["domain_signatures"].update(adds_over_token_id_control=0.0, adds_over_token_id_control_ci_low=-0.02,
                                     adds_over_token_id_control_ci_high=0.02)
    assert "does **not** add significantly" in render_card(null)
    assert sig is not None


def test_render_says_so_when_routing_is_not_above_permuted_labels(card):
    null = copy.deepcopy(card)
    null["domain_signatures"].update(permutation_p_value=0.4)
    text = render_card(null)
    assert "does **not** tell the domains apart" in text and "above chance" not in text


def test_remeasure_refuses_a_card_without_training_facts(tmp_path):
    from moescope.errors import MoescopeError
    from moescope.train.export import remeasure

    (tmp_path / "card.json").write_text(json.dumps({"perplexity": {}}))
    with pytest.raises(MoescopeError, match="no 'training' section"):
        remeasure(tmp_path, tmp_path)
