"""Which images of a batch are still healthy, tracked on the device.

A numeric blow-up (a loss or the latent turning inf or NaN) fails its own image and no
other: the failed image's loss leaves the batch sum and its gradient is zeroed, so the
others go on exactly as if it were not there. All of that is tensor work on the device:
the step loop never waits for the GPU to say whether something failed. `errors()` reads
the record (one device-to-host copy) and words each failure the same way: phase, step
and the terms that were not finite.
"""
from __future__ import annotations

import torch

PHASES = ("latent", "noise")
TERMS = ("recon", "classf", "seg", "size", "n_loss")


class Health:
    def __init__(self, n: int, device: torch.device):
        self.ok = torch.ones(n, dtype=torch.bool, device=device)
        self.failed_step = torch.full((n,), -1, dtype=torch.long, device=device)
        self.failed_phase = torch.zeros(n, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(n, len(TERMS) + 1, dtype=torch.bool, device=device)
        self._told: set[int] = set()

    def update(self, phase: str, step: int, terms: dict[str, torch.Tensor],
               latent: torch.Tensor | None = None) -> None:
        """Record the images whose terms (or latent) stopped being finite at this step."""
        bad = torch.zeros_like(self.bad_terms)
        for name, value in terms.items():
            bad[:, TERMS.index(name)] = ~torch.isfinite(value.detach())
        if latent is not None:
            bad[:, -1] = ~torch.isfinite(latent.detach()).flatten(1).all(dim=1)
        newly = self.ok & bad.any(dim=1)
        self.failed_step = torch.where(newly, step, self.failed_step)
        self.failed_phase = torch.where(newly, PHASES.index(phase), self.failed_phase)
        self.bad_terms = torch.where(newly[:, None], bad, self.bad_terms)
        self.ok &= ~newly

    def take(self, rows: torch.Tensor) -> "Health":
        part = Health(len(rows), self.ok.device)
        part.ok, part.failed_step = self.ok[rows], self.failed_step[rows]
        part.failed_phase, part.bad_terms = self.failed_phase[rows], self.bad_terms[rows]
        part._told = {i for i, r in enumerate(rows.tolist()) if r in self._told}
        return part

    def put(self, rows: torch.Tensor, part: "Health") -> None:
        """Take back the record of `rows` from the part that optimised them."""
        if part is self:
            return
        self.ok[rows] = part.ok
        self.failed_step[rows] = part.failed_step
        self.failed_phase[rows] = part.failed_phase
        self.bad_terms[rows] = part.bad_terms

    def masked_sum(self, total: torch.Tensor) -> torch.Tensor:
        """The batch loss over the healthy images only (a failed one's NaN stays out)."""
        return torch.where(self.ok, total, torch.zeros_like(total)).sum()

    def zero_failed_grads(self, params: list[torch.Tensor]) -> None:
        """A failed image's rows of each batched parameter stay where they are."""
        for p in params:
            if p.grad is not None:
                p.grad.masked_fill_(~self.ok.view(-1, *[1] * (p.grad.ndim - 1)), 0)

    def errors(self) -> list[str | None]:
        """Each image's failure in words, or None (reads the record from the device)."""
        steps = self.failed_step.tolist()
        phases = self.failed_phase.tolist()
        bad = self.bad_terms.tolist()
        out: list[str | None] = []
        for step, phase, flags in zip(steps, phases, bad):
            if step < 0:
                out.append(None)
                continue
            which = [name for name, flag in zip(TERMS, flags) if flag] or ["latent"]
            out.append(f"numeric blow-up in the {PHASES[phase]} phase at step {step}: "
                       f"{', '.join(which)} not finite")
        return out

    def new_errors(self) -> list[tuple[int, str]]:
        """(image, failure) for failures not returned here before: for one log line each."""
        fresh = [(k, e) for k, e in enumerate(self.errors()) if e is not None and k not in self._told]
        self._told.update(k for k, _ in fresh)
        return fresh
