"""The evidence each edit carries beyond the classifier it optimised: entanglement (the
other attributes' drift and flips), the held-out judge (never in a loss), and the hash of
the settings that ran. Through the real engine on the tiny models, with classifiers
written by hand where a figure must be known exactly."""
import dataclasses
import hashlib
import json

import pytest
import torch
from helpers import faces_near_mean
from torch import nn

from models.celeba import ATTRIBUTE_INDEX, ATTRIBUTES
from models.tiny import tiny_classifier
from pipeline.engine.editor import Editor
from pipeline.engine.entanglement import IMPLIED, entanglement, other_attributes
from pipeline.engine.rows import EditRequest
from pipeline.engine.settings import EditConfig, settings_sha256

FEW_STEPS = {"steps.latent": 4, "steps.noise": 1, "loss.start_steps.classf": 1,
             "loss.start_steps.seg": 1, "dynamic_masking_iters": 2, "parser_size": 64}


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def face(models):
    return faces_near_mean(models, 1, seed=1)


class HandClassifier(nn.Module):
    """40 logits written by hand: the target's follows the image's brightness (so the
    edit has something to steer); every other is fixed at -2, except `moved`'s, which is
    +6 on `reference` and falls steeply as an image departs from it."""

    def __init__(self, target: str, reference: torch.Tensor, moved: str | None = None):
        super().__init__()
        self.target, self.moved = ATTRIBUTE_INDEX[target], moved
        self.register_buffer("reference", reference.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        columns = [torch.full((images.shape[0],), -2.0) for _ in ATTRIBUTES]
        columns[self.target] = 20 * (images.mean(dim=(1, 2, 3)) - 0.5)
        if self.moved is not None:
            departure = (images - self.reference).abs().mean(dim=(1, 2, 3))
            columns[ATTRIBUTE_INDEX[self.moved]] = 6 - 1e4 * departure
        return torch.stack(columns, dim=1)


def edit(models, face, request=EditRequest(("smiling",), (1.0,))):
    return Editor(models, EditConfig.from_overrides(FEW_STEPS)).edit(face, [request])[0]


# ---- entanglement --------------------------------------------------------------------------
def test_an_edit_that_moves_only_its_target_has_no_entanglement(models, face):
    hand = dataclasses.replace(models, classifier=HandClassifier("smiling", face))
    result = edit(hand, face)
    m = result.metrics
    assert len(m["prob_all_input"]) == len(m["prob_all_result"]) == 40
    moved = abs(m["prob_all_result"][ATTRIBUTE_INDEX["smiling"]] -
                m["prob_all_input"][ATTRIBUTE_INDEX["smiling"]])
    assert moved > 0                                   # the target did move
    assert m["entanglement"] == 0.0 and m["unintended_flips"] == []


def test_an_edit_that_flips_another_attribute_lists_it(models, face):
    hand = dataclasses.replace(models, classifier=HandClassifier("smiling", face, "male"))
    m = edit(hand, face).metrics
    assert m["prob_all_input"][ATTRIBUTE_INDEX["male"]] > 0.99          # +6 on the input
    assert m["prob_all_result"][ATTRIBUTE_INDEX["male"]] < 0.01         # the result departed
    assert m["unintended_flips"] == ["male"]
    drop = m["prob_all_input"][ATTRIBUTE_INDEX["male"]] - m["prob_all_result"][
        ATTRIBUTE_INDEX["male"]]
    assert m["entanglement"] == pytest.approx(drop / 39, rel=1e-5)      # one of 39 others


def test_what_a_target_implies_by_definition_is_left_out():
    assert "blond_hair" in IMPLIED["black_hair"] and "no_beard" in IMPLIED["goatee"]
    assert "male" not in IMPLIED.get("no_beard", ()) and "young" not in IMPLIED
    others = other_attributes(["black_hair"])
    assert len(others) == 36 and not {"black_hair", "blond_hair", "brown_hair",
                                      "gray_hair"} & set(others)
    before, after = torch.full((2, 40), 0.2), torch.full((2, 40), 0.2)
    after[:, ATTRIBUTE_INDEX["black_hair"]] = after[:, ATTRIBUTE_INDEX["blond_hair"]] = 0.9
    after[1, ATTRIBUTE_INDEX["male"]] = 0.7
    drift, flips = entanglement(before, after, [["black_hair"], ["black_hair"]])
    assert drift[0] == 0.0 and flips[0] == []          # blond hair moved by definition
    assert flips[1] == ["male"] and drift[1] == pytest.approx(0.5 / 36)


# ---- the judge -----------------------------------------------------------------------------
def test_the_judge_scores_the_edit_and_changes_nothing_of_it(models, face):
    torch.manual_seed(7)
    judge = tiny_classifier().eval().requires_grad_(False)
    request = EditRequest(("smiling", "wearing_lipstick"), (1.0, 0.0))
    alone = edit(dataclasses.replace(models, judge=None), face, request)
    judged = edit(dataclasses.replace(models, judge=judge), face, request)
    assert torch.equal(alone.latent, judged.latent)                   # bit for bit
    assert torch.equal(alone.edited, judged.edited)
    assert all(torch.equal(a, b) for a, b in zip(alone.noises, judged.noises))
    assert alone.metrics["judge_prob_result"] is None and alone.metrics["judge_on_target"] is None
    m = judged.metrics
    with torch.no_grad():
        p = torch.sigmoid(judge(judged.edited.clamp(0, 1)[None]))[0]
    lipstick = ATTRIBUTE_INDEX["wearing_lipstick"]
    assert list(m["judge_prob_result"]) == ["smiling", "wearing_lipstick"]
    assert m["judge_prob_result"]["wearing_lipstick"] == pytest.approx(p[lipstick].item(),
                                                                       abs=1e-5)
    want = (p[ATTRIBUTE_INDEX["smiling"]] >= 0.5) and (p[lipstick] < 0.5)
    assert m["judge_on_target"] == bool(want)
    assert {k: v for k, v in m.items() if not k.startswith(("judge_", "seconds"))} == \
        {k: v for k, v in alone.metrics.items() if not k.startswith(("judge_", "seconds"))}


# ---- provenance ----------------------------------------------------------------------------
def test_the_settings_hash_is_the_documented_canonical_json():
    settings = EditConfig.from_overrides({"steps.latent": 200}).resolve(["smiling"])
    canonical = json.dumps(settings.as_dict(), sort_keys=True, separators=(",", ":"))
    assert settings_sha256(settings) == hashlib.sha256(canonical.encode()).hexdigest()
    same = EditConfig.from_overrides({"steps.latent": 200}).resolve(["smiling"])
    assert settings_sha256(same) == settings_sha256(settings)
    other = EditConfig.from_overrides({"steps.latent": 201}).resolve(["smiling"])
    assert settings_sha256(other) != settings_sha256(settings)
    own = EditRequest(("smiling",), (1.0,), smoothing=0.2)         # a row's own smoothing
    assert settings_sha256(settings, own) != settings_sha256(settings)
    default = EditRequest(("smiling",), (1.0,))                     # none of its own
    assert settings_sha256(settings, default) == settings_sha256(settings)


def test_each_edit_records_the_hash_of_what_it_ran(models, face):
    m = edit(models, face).metrics
    settings = EditConfig.from_overrides(FEW_STEPS).resolve(["smiling"])
    assert m["settings_sha256"] == settings_sha256(settings)


def test_rows_batched_together_keep_their_own_settings_hash(models, face):
    """smiling and black_hair share a batch (they differ only in per-image settings, the
    seg weight): each row still records the hash of its own settings."""
    config = EditConfig.from_overrides(FEW_STEPS)
    requests = [EditRequest(("smiling",), (1.0,)), EditRequest(("black_hair",), (1.0,))]
    settings = [config.resolve(r.attributes) for r in requests]
    assert settings[0] != settings[1] and settings[0].group_key() == settings[1].group_key()
    results = Editor(models, config).edit(face.repeat(2, 1, 1, 1), requests, settings=settings)
    assert [r.metrics["settings_sha256"] for r in results] == [
        settings_sha256(s) for s in settings]
