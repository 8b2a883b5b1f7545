"""Early stopping (opt-in, `early_stop.enabled`): an image leaves the latent phase once
every target probability has crossed 0.5 by `early_stop.margin` on its target's side
and its recon loss has plateaued (changed by at most `early_stop.tolerance`, relative,
over the last `early_stop.window` steps). Checks run every `early_stop.every` steps
from the end of the dynamic-masking window (so the masks have finished growing) and
each one reads the device. The engine then freezes the images that are done and goes
on with a smaller batch; the noise phase runs for every image as usual.

The paper's schedule has no such rule, so this changes the numbers: docs/editing.md says
how to measure the quality-for-steps trade on your own weights.
"""
from __future__ import annotations

import torch

from .rows import EditRequest, target_side
from .schedule import Schedule
from .settings import EarlyStopSettings


class EarlyStop:
    def __init__(self, settings: EarlyStopSettings, schedule: Schedule,
                 requests: list[EditRequest], device: torch.device):
        self.settings = settings
        self.first = max(schedule.classf_start, schedule.dynamic_end if schedule.dynamic else 0)
        self.classifier = schedule.classf
        width = max(len(r.attributes) for r in requests)
        self.side = torch.zeros(len(requests), width, dtype=torch.bool, device=device)
        self.real = torch.zeros(len(requests), width, dtype=torch.bool, device=device)
        for k, r in enumerate(requests):
            for j, t in enumerate(r.targets):
                self.side[k, j], self.real[k, j] = target_side(t), True
        self.history: dict[int, torch.Tensor] = {}      # step -> recon of every image

    def due(self, step: int) -> bool:
        return (self.classifier and step >= self.first
                and (step - self.first) % self.settings.every == 0)

    def done(self, step: int, rows: torch.Tensor, probs: torch.Tensor,
             recon: torch.Tensor) -> torch.Tensor:
        """Which of the working images `rows` (positions in the group) are done, given
        their classifier probabilities [n, A] and recon losses [n] at this step."""
        s = self.settings
        now = torch.full((len(self.side),), float("nan"), device=recon.device)
        self.history[step] = now.index_copy(0, rows, recon.detach().float())
        before = [k for k in self.history if k <= step - s.window]
        if not before:
            return torch.zeros(len(rows), dtype=torch.bool)
        old = self.history[max(before)][rows]
        for k in [k for k in self.history if k < max(before)]:
            del self.history[k]
        side, real = self.side[rows], self.real[rows]
        past = torch.where(side, probs >= 0.5 + s.margin, probs <= 0.5 - s.margin) | ~real
        plateau = (old - recon.detach()).abs() <= s.tolerance * old.abs().clamp(min=1e-12)
        return (past.all(dim=1) & plateau).cpu()
