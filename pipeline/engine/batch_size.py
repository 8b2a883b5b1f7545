"""The largest batch a GPU holds: probed once per actor, before any row runs.

On a CPU, running out of memory kills the process instead of raising, so there is no
probe: callers use the job's batch size as given.
"""
from __future__ import annotations

from typing import Callable

import torch

from models.loaders import Models

from .editor import Editor, StartPoint
from .rows import EditRequest
from .runtime import Runtime
from .settings import EditConfig

# An edit with every loss term of its mode on: a hair attribute (the seg loss) and a
# size target (the size loss); global adds e4e's start and masked LPIPS.
EVERY_TERM = {"local": EditRequest(("black_hair",), (1.0,), size=1.2),
              "global": EditRequest(("male",), (1.0,), size=1.2)}
# Two steps from step 0 with the classifier, seg, size and dynamic masking all on: the
# heaviest step an edit has, twice (the second holds Adam's state too).
HEAVIEST_STEPS = {"steps.latent": 2, "steps.noise": 0, "loss.start_steps.classf": 0,
                  "loss.start_steps.seg": 0, "steps.log": 10 ** 9}


def largest_batch(fits: Callable[[int], object], cap: int) -> int:
    """The largest batch size up to `cap` for which `fits(size)` runs without CUDA running
    out of memory: doubling from 1, then the step between the last fit and the first
    failure."""
    good, bad, size = 0, cap + 1, 1
    while size < bad:
        try:
            fits(size)
            good = size
        except torch.cuda.OutOfMemoryError:
            bad = size
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        size = min(size * 2, cap) if bad > cap and size < cap else (good + bad) // 2
        if size <= good:
            break
    if good == 0:
        raise RuntimeError("not even one image fits in GPU memory")
    return good


def auto_batch_size(models: Models, runtime: Runtime, mode: str, cap: int,
                    parser_size: int) -> int:
    """The largest batch (up to `cap`) whose heaviest step fits in this GPU's memory:
    two steps of an edit with every term on (EVERY_TERM), through the real engine."""
    config = EditConfig.from_overrides({**HEAVIEST_STEPS, "parser_size": parser_size})
    editor = Editor(models, config, runtime)
    g = models.generator
    device = g.input.input.device

    def fits(n: int) -> None:
        images = torch.rand(n, 3, g.size, g.size, device=device)
        latent = models.mean_latent.view(1, 1, -1).repeat(n, g.n_latent, 1)
        editor.edit(images, [EVERY_TERM[mode]] * n, start=StartPoint(latent=latent, step=0))
    return largest_batch(fits, cap)
