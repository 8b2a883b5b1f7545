"""The shared-prefix key and cache (pipeline/runner/prefix.py). That an edit branched from a
prefix equals the edit from scratch is tests/test_engine.py's; that a job computes each
prefix once and a later job reuses it is tests/test_stage.py's."""
import logging

import numpy as np
import pytest
import torch

from pipeline.engine.editor import Editor
from pipeline.engine.rows import EditRequest
from pipeline.engine.settings import EditConfig
from pipeline.runner import prefix
from pipeline.output.layout import Output
from pipeline.runner.prefix import PrefixCache, prefix_key

STEPS = {"steps.latent": 4, "loss.start_steps.classf": 2, "loss.start_steps.seg": 2,
         "parser_size": 64}


@pytest.fixture(scope="module")
def editor(tiny_models):
    return Editor(tiny_models, EditConfig.from_overrides(STEPS))


def key(editor, image, attribute="smiling", autocast=None, **overrides):
    request = EditRequest((attribute,), (1.0,))
    settings = EditConfig.from_overrides({**STEPS, **overrides}).resolve(request.attributes)
    return prefix_key(image, request, settings, editor, autocast)


def test_a_prefix_key_follows_what_the_prefix_depends_on_and_nothing_else(editor):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = key(editor, image)
    # what the first steps never read: the attribute (same recon mask), its later terms
    assert key(editor, image, "big_nose") == base
    assert key(editor, image, **{"loss.weights.classf": 9.0, "steps.noise": 7}) == base
    # what they do read
    touched = image.clone()
    touched[0, 10, 10] += 1 / 255
    changed = [key(editor, touched), key(editor, image, "wavy_hair"),       # + the ears
               key(editor, image, **{"optimizer.lr_latent": 0.02}),
               key(editor, image, **{"loss.weights.mse": 1.0}),
               key(editor, image, **{"loss.start_steps.classf": 3, "loss.start_steps.seg": 3}),
               key(editor, image, autocast="bf16")]
    assert len({base, *changed}) == 1 + len(changed)


def test_the_cache_keeps_prefixes_in_the_output_and_drops_what_it_cannot_read(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prefix, "MEMORY_ENTRIES", 2)
    out = Output(str(tmp_path / "out"))
    cache = PrefixCache(out)
    latents = {f"k{i}": torch.full((4, 8), float(i)) for i in range(3)}
    for k, v in latents.items():
        cache.put(k, v)
    assert list(cache.memory) == ["k1", "k2"]                 # the oldest left memory...
    assert sorted(p.name for p in (tmp_path / "out" / "prefixes").iterdir()) == [
        "k0.npy", "k1.npy", "k2.npy"]
    again = PrefixCache(Output(str(tmp_path / "out")))       # ...a later job finds them all
    for k, v in latents.items():
        torch.testing.assert_close(again.get(k), v)
    assert again.get("never") is None
    (tmp_path / "out" / "prefixes" / "cut.npy").write_bytes(
        np.lib.format.magic(1, 0) + b"\x10\x00{'descr")         # a torn write
    with caplog.at_level(logging.WARNING, logger="pipeline.output.layout"):
        assert again.get("cut") is None                        # computed again, not used
    assert "prefixes/cut.npy" in caplog.text
