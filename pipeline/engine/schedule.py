"""When each loss term runs and each event happens in one group's optimisation.

A `Schedule` holds no weights and no state: it is built once per group from the
resolved settings, before step 0, and asked per step. The engine's loops, the progress
bar of `maskface edit` and the benchmark all read it; nothing else restates it.

With the paper's defaults (local mode, 1000 latent steps, 500 noise steps):

    step   0 ........ 499 | 500 ........ 699 | 700 ........ 999 | noise 0 ... 500
    recon  on               on                 on                 recon + n_loss
    classf                  on (Adam re-init at 500)
    seg/size                on                 on                 (hair rows / size > 0)
    masks                   grow after each step
    noise                                      redrawn at 700
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .settings import EditSettings

# Events, in the order they happen within a step.
E4E_INIT = "e4e_init"                # the latent came from the e4e encoder (first step)
ADAM_REINIT = "adam_reinit"          # Adam re-created before this step's update
NOISE_REDRAW = "noise_redraw"        # noise maps redrawn before this step's forward
DYNAMIC_UPDATE = "dynamic_update"    # masks grown after this step's update


@dataclass(frozen=True)
class Schedule:
    """One group's optimisation, step by step: build it with `for_group`, then ask it per
    step (`terms`, `events`, `classifier_on`, ...) and for totals (`total_iterations`)."""
    start: int                  # first latent step run (0, e4e_start_step, or as given)
    latent_steps: int           # the latent loop runs start .. latent_steps - 1
    classf_start: int           # classifier term from this step (when `classf` is on)
    seg_start: int              # seg and size terms from this step (when on)
    dynamic_end: int            # dynamic masking runs seg_start .. dynamic_end - 1
    classf: bool                # the classifier term has a weight
    seg: bool                   # some row of the group has a seg weight
    size: bool                  # some row of the group has a size target
    dynamic: bool               # dynamic masking is on (local mode)
    reinit: bool                # Adam is re-created at classf_start
    noise_iterations: int       # noise phase: steps.noise + 1 iterations, or 0
    from_e4e: bool              # the start point is the e4e encoder's latent

    @classmethod
    def for_group(cls, settings: EditSettings, seg_weights: Sequence[float] = (),
                  sizes: Sequence[float] = (), *, start_step: int | None = None,
                  given_latent: bool = False) -> "Schedule":
        """`seg_weights` and `sizes`: the group's per-image values. `start_step` and
        `given_latent` describe a start point handed to the engine (fidelity tests, and
        edits resumed from a saved latent)."""
        from_e4e = settings.e4e_init and not given_latent
        if start_step is None:
            start_step = settings.e4e_start_step if from_e4e else 0
        seg_start = settings.loss.start_steps.seg
        noise = settings.steps.noise
        return cls(
            start=start_step, latent_steps=settings.steps.latent,
            classf_start=settings.loss.start_steps.classf, seg_start=seg_start,
            dynamic_end=seg_start + settings.dynamic_masking_iters,
            classf=settings.loss.weights.classf > 0, seg=any(w > 0 for w in seg_weights),
            size=any(z > 0 for z in sizes), dynamic=settings.local and settings.dynamic_masking,
            reinit=settings.optimizer.reinit,
            # `steps.noise: 0` skips the phase; otherwise it runs steps.noise + 1
            # iterations, as the original's inclusive loop does.
            noise_iterations=noise + 1 if noise > 0 else 0, from_e4e=from_e4e)

    # -- the latent phase ------------------------------------------------------------------
    @property
    def latent_range(self) -> range:
        return range(self.start, self.latent_steps)

    def classifier_on(self, step: int) -> bool:
        return self.classf and step >= self.classf_start

    def seg_on(self, step: int) -> bool:
        return self.seg and step >= self.seg_start

    def size_on(self, step: int) -> bool:
        return self.size and step >= self.seg_start

    def dynamic_on(self, step: int) -> bool:
        return self.dynamic and self.seg_start <= step < self.dynamic_end

    def parser_on(self, step: int) -> bool:
        """The parser runs on the generated image (with gradients only for seg/size)."""
        return self.seg_on(step) or self.size_on(step) or self.dynamic_on(step)

    def terms(self, step: int) -> tuple[str, ...]:
        """The loss terms of a latent step, in the order they are reported."""
        on = (("classf", self.classifier_on(step)), ("seg", self.seg_on(step)),
              ("size", self.size_on(step)))
        return ("recon",) + tuple(name for name, yes in on if yes)

    def events(self, step: int) -> tuple[str, ...]:
        happens = ((E4E_INIT, self.from_e4e and step == self.start),
                   (ADAM_REINIT, self.reinit and step == self.classf_start),
                   (NOISE_REDRAW, self.noise_iterations > 0 and step == self.dynamic_end),
                   (DYNAMIC_UPDATE, self.dynamic_on(step)))
        return tuple(name for name, yes in happens if yes)

    # -- totals ----------------------------------------------------------------------------
    @property
    def latent_iterations(self) -> int:
        return len(self.latent_range)

    @property
    def total_iterations(self) -> int:
        """Every optimisation step the group runs: what a progress bar counts."""
        return self.latent_iterations + self.noise_iterations


def shared_prefix(settings: EditSettings) -> int:
    """How many first steps every local edit of an image shares, so that they can run once
    per image and each edit branch from there (0: none).

    Before the classifier and the seg/size terms start, a local edit without e4e only
    inverts: masked recon from the mean latent with zero noise maps, against a recon
    mask that depends on the image alone (plus the ears for hair-shape attributes).
    Nothing else of the edit matters yet. The prefix ends at the classifier start, where
    Adam is re-created (optimizer.reinit), so no optimiser state crosses the branch
    point; when seg starts first, or reinit is off, Adam's state would cross it, and
    there is no shared prefix.
    """
    classf, seg = settings.loss.start_steps.classf, settings.loss.start_steps.seg
    if not settings.local or settings.e4e_init or not settings.optimizer.reinit or seg < classf:
        return 0
    return min(classf, settings.steps.latent)
