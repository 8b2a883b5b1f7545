"""The edit-row vocabulary: each rule alone, a whole row, and the request built from it."""
import math

import numpy as np
import pytest

from models.classifier import ATTRIBUTES
from pipeline.engine.rows import (MANIFEST_COLUMNS, EditRequest, default_seed, is_null,
                                  passthrough_columns, row_problems, safe_stem, unique_stems)


@pytest.mark.parametrize("row", [
    {"attributes": ["smiling"], "targets": [1.0]},
    {"attributes": np.array(["black_hair", "wavy_hair"]), "targets": np.array([1.0, 0.0]),
     "size": 1.2, "smoothing": 0.0, "seed": 7, "mode": "local", "blend": "no_skin"},
    {"attributes": ("male",), "targets": (0,), "size": None, "smoothing": float("nan"),
     "seed": 3.0, "mode": None, "blend": None},
])
def test_good_rows_have_no_problems(row):
    assert row_problems(row) == []


@pytest.mark.parametrize("change,message", [
    ({"attributes": []}, "attributes must be a non-empty list"),
    ({"attributes": "smiling"}, "attributes must be a non-empty list"),
    ({"attributes": ["smilling"]}, "unknown attribute(s) ['smilling']; did you mean 'smiling'?"),
    ({"attributes": ["smiling", "smiling"], "targets": [1.0, 1.0]}, "listed twice"),
    ({"attributes": list(ATTRIBUTES) + ["smiling"]}, "41 attributes listed; there are only 40"),
    ({"targets": [1.0, 0.0]}, "1 attributes but 2 targets"),
    ({"targets": [1.5]}, "targets must be numbers in [0, 1], got [1.5]"),
    ({"targets": [True]}, "targets must be numbers"),
    ({"targets": "1"}, "targets must be a list of numbers"),
    ({"size": -1.0}, "size must be a number >= 0"),
    ({"size": math.inf}, "size must be a number >= 0"),
    ({"smoothing": 1.0}, "smoothing must be in [0, 1)"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"mode": "both"}, "mode must be one of auto, local, global"),
    ({"blend": "skin"}, "blend must be one of include_skin, no_skin"),
])
def test_each_bad_value_is_named(change, message):
    row = {"attributes": ["smiling"], "targets": [1.0], **change}
    problems = row_problems(row)
    assert len(problems) == 1 and message in problems[0], problems


def test_a_request_checks_every_rule_and_normalises_types():
    r = EditRequest(["smiling", "male"], [1, 0.0], size=1, seed=np.int64(4))
    assert r.attributes == ("smiling", "male") and r.targets == (1.0, 0.0)
    assert isinstance(r.size, float) and type(r.seed) is int
    with pytest.raises(ValueError, match="size must be.*; blend must be"):
        EditRequest(("smiling",), (1.0,), size=-1, blend="x")


def test_a_request_from_a_manifest_row_reads_nulls_as_unset():
    row = {"attributes": np.array(["smiling"]), "targets": np.array([0.0]), "size": 0.0,
           "smoothing": float("nan"), "blend": None, "mode": "auto", "seed": 9, "id": "a"}
    r = EditRequest.from_row(row)
    assert r == EditRequest(("smiling",), (0.0,), mode="auto", seed=9)
    assert r.smoothing is None and r.blend is None


def test_nulls_seeds_columns_and_names():
    assert is_null(None) and is_null(float("nan")) and not is_null(0.0) and not is_null("")
    assert default_seed("a") == default_seed("a") != default_seed("b")
    assert 0 <= default_seed("x") < 2 ** 31
    assert passthrough_columns(["id", "label", *MANIFEST_COLUMNS, "attr_male"]) == ["label", "attr_male"]
    assert safe_stem("s3://b/dir/My photo.v2.jpg?sig=1") == "My_photo.v2"
    assert safe_stem(".hidden.png") == "hidden" and safe_stem("/") == "image"
    assert unique_stems(["a/x.png", "b/x.jpg", "x-1.png", "c/x.gif"]) == ["x", "x-1", "x-1-1", "x-2"]
