"""The export's label rule alone (pipeline/results/export.py); the files themselves, loaded by
pandas, pyarrow and `datasets`, are tests/test_report.py's."""
import pandas as pd

from pipeline.results.export import label_names, labels_after


def row(**kw):
    base = {"status": "ok", "attributes": ["smiling"], "targets": [1.0], "prob_result": [0.8],
            "attr_smiling": 0, "attr_male": 1, "attr_bangs": None}
    return {**base, **kw}


def test_an_edit_on_target_sets_its_label_the_others_pass_through():
    names = label_names(pd.DataFrame([row()]))
    assert names == ["smiling", "male", "bangs"]
    assert labels_after(row(), names) == ({"smiling": 1, "male": 1, "bangs": None}, True)


def test_an_edit_short_of_its_target_has_no_label_and_a_failed_row_none():
    names = ["smiling", "male", "bangs"]
    labels, reached = labels_after(row(prob_result=[0.3]), names)
    assert labels == {"smiling": None, "male": 1, "bangs": None} and reached is False
    assert labels_after(row(status="error"), names) == (None, None)
    # an edit without a label column of its own still gets one
    assert label_names(pd.DataFrame([row(attributes=["big_nose"])]))[-1] == "big_nose"
