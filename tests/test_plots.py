"""The report's plots (pipeline/results/plots.py): when each is drawn."""
import base64
import io

import pandas as pd
from PIL import Image

from pipeline.results.plots import (entanglement_histograms, identity_histogram, steps_vary,
                                    target_probability_histograms)


def test_steps_vary_only_between_rows_with_the_same_settings():
    same = pd.DataFrame({"attributes": [["smiling"], ["smiling"], ["male"]],
                         "mode": ["local", "local", "global"], "steps": [1501, 1501, 2001]})
    assert not steps_vary(same)                     # local and global differ by design
    stopped = same.assign(steps=[1501, 900, 2001])
    assert steps_vary(stopped)                      # early stopping
    assert not steps_vary(same.iloc[:0])


def test_the_identity_histogram_is_an_embedded_png_or_nothing():
    assert identity_histogram(pd.Series([0.2, 0.4, 0.7])).startswith("data:image/png;base64,")
    assert identity_histogram(pd.Series([], dtype=float)) is None


def test_per_attribute_histograms_have_a_panel_per_attribute_or_are_nothing():
    outcomes = pd.DataFrame({"attribute": ["smiling", "smiling", "male", "young", "bald"],
                             "p_target_after": [0.9, 0.4, 0.7, 0.2, 0.6],
                             "entanglement": [0.01, 0.03, None, 0.2, 0.0]})
    for uri in (target_probability_histograms(outcomes), entanglement_histograms(outcomes)):
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert image.width > 2 * image.height          # one row of panels, four at most
    assert entanglement_histograms(outcomes.assign(entanglement=None)) is None
    assert target_probability_histograms(outcomes.iloc[:0]) is None
