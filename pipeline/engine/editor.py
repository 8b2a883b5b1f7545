"""The MaskFaceGAN editing engine: batched masked latent optimisation, then noise.

    editor = Editor(models, EditConfig.from_overrides({"steps.latent": 200}))
    results = editor.edit(images, [EditRequest(("smiling",), (1.0,)), ...])

One call edits N images [N, 3, S, S] in [0, 1] at the generator's resolution, each
with its own attributes, targets, size, smoothing, blend option, mode and seed. Rows
whose settings differ beyond the per-image ones (local versus global, say) run as
groups, one after another inside the call; results come back in input order. Every
loss is per image and the batch loss is their sum, so an image's result does not
depend on what else is in its batch.

One group, in the paper's order (`Editor._run_group`):
  1. masks from the parser on the input (pipeline/engine/masks.py);
  2. the start point: the mean latent (local) or the e4e encoder's (global);
  3. the latent phase: Adam on W+, the loss terms and events the `Schedule` turns on;
  4. the noise phase: Adam on the noise maps;
  5. the blend: result = input + blend mask * (generated - input);
  6. the metrics of each result: the classifier's 40 probabilities before and after
     (the targets' and the others': pipeline/engine/entanglement.py), the held-out
     judge's on the targets when the models have one (never part of a loss), the
     region and preservation figures, and the hash of the settings that ran.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from models.classifier import ATTRIBUTE_INDEX
from models.face_parser import region_masks
from models.loaders import Models
from pipeline.errors import SetupError

from .early_stop import EarlyStop
from .entanglement import entanglement
from .health import Health
from .losses import (bernoulli_kl, masked_mse, noise_normalize_, noise_regularize, portion,
                     shape_mse, size_kl)
from .masks import (MaskRegions, Masks, blend, edit_region, grow_masks, initial_masks,
                    mask_regions, upsample)
from .rows import EditRequest, on_target
from .runtime import Runtime
from .schedule import ADAM_REINIT, DYNAMIC_UPDATE, NOISE_REDRAW, Schedule, shared_prefix
from .settings import EditConfig, EditSettings, required_networks, settings_sha256

log = logging.getLogger(__name__)

Terms = dict[str, tuple[torch.Tensor, "torch.Tensor | float"]]   # name -> (per image, weight)


@dataclass(eq=False)
class EditResult:
    """One image's outcome. Tensors are on the CPU; images are unclamped (clamp to write)."""
    edited: torch.Tensor | None = None        # [3, S, S] blended result
    generated: torch.Tensor | None = None     # [3, S, S] raw generator output
    latent: torch.Tensor | None = None        # [n_latent, style_dim]
    noises: list[torch.Tensor] | None = None  # each [1, r, r]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # recon/blend/dynamic [1,S,S], shape [1,P,P]
    metrics: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StepInfo:
    """Reported after every step: the loss terms as computed before the update
    (unweighted, per image of the group) and what the schedule did at this step."""
    phase: str                       # "latent" or "noise"
    step: int
    rows: list[int]                  # the group's positions in the call's batch
    losses: dict[str, torch.Tensor]  # term -> [n]
    events: tuple[str, ...] = ()     # see pipeline/engine/schedule.py


class StartPoint(NamedTuple):
    """A start handed to `edit` instead of the usual one (mean latent or e4e, step 0 or
    e4e_start_step, zero noise maps)."""
    latent: torch.Tensor | None = None       # [N, n_latent, style_dim]
    step: int | None = None
    noises: list[torch.Tensor] | None = None  # each [N, 1, r, r]

    def rows(self, rows: list[int]) -> "StartPoint":
        return StartPoint(None if self.latent is None else self.latent[rows], self.step,
                          None if self.noises is None else [m[rows] for m in self.noises])


@dataclass(frozen=True)
class Targets:
    """The per-image numbers of a group, as tensors."""
    attr_idx: torch.Tensor      # [n, A] classifier outputs of each row's attributes (padded)
    attr_w: torch.Tensor        # [n, A] 1 for a real attribute, 0 for padding
    target: torch.Tensor        # [n, A] classifier targets |t - smoothing| (0.5 as padding)
    seg_w: torch.Tensor         # [n] seg loss weight
    update_shape: torch.Tensor  # [n] bool: dynamic masking grows the shape mask
    sizes: torch.Tensor         # [n, 1] size factors (0: no size loss)

    @classmethod
    def build(cls, requests: Sequence[EditRequest], settings: Sequence[EditSettings],
              device: torch.device, dtype: torch.dtype) -> "Targets":
        n, width = len(requests), max(len(r.attributes) for r in requests)
        attr_idx = torch.zeros(n, width, dtype=torch.long, device=device)
        attr_w = torch.zeros(n, width, device=device, dtype=dtype)
        target = torch.zeros(n, width, device=device, dtype=dtype)
        for k, (r, s) in enumerate(zip(requests, settings)):
            smoothing = s.smoothing if r.smoothing is None else r.smoothing
            for j, (a, t) in enumerate(zip(r.attributes, r.targets)):
                attr_idx[k, j], attr_w[k, j] = ATTRIBUTE_INDEX[a], 1.0
                target[k, j] = abs(t - smoothing)
        return cls(
            attr_idx=attr_idx, attr_w=attr_w,
            target=torch.where(attr_w > 0, target, torch.full_like(target, 0.5)),
            seg_w=torch.tensor([s.loss.weights.seg for s in settings], device=device, dtype=dtype),
            update_shape=torch.tensor([s.models.update_shape for s in settings], device=device),
            sizes=torch.tensor([r.size for r in requests], device=device, dtype=dtype).view(n, 1))

    def take(self, rows: torch.Tensor) -> "Targets":
        return Targets(*(t[rows] for t in (self.attr_idx, self.attr_w, self.target, self.seg_w,
                                            self.update_shape, self.sizes)))


@dataclass
class Group:
    """One group of rows sharing a schedule: what its optimisation reads, computed once
    from the inputs, plus which rows are still healthy."""
    x: torch.Tensor                          # [n, 3, S, S] inputs
    requests: list[EditRequest]
    settings: EditSettings                       # per-image values live in `targets`
    rows: list[int]                          # positions in the call's batch
    schedule: Schedule
    regions: list[MaskRegions]
    targets: Targets
    masks: Masks                             # from the input
    region_before: torch.Tensor              # [n, 1] the input's edit-region share
    size_target: torch.Tensor                # [n, 1] size x the input's dynamic-mask share
    lpips_y: list[torch.Tensor] | None       # global mode: the input's LPIPS features
    health: Health                           # which rows are still finite (on the device)

    @property
    def recon_weight(self) -> float:
        w = self.settings.loss.weights
        return w.mse if self.settings.local else w.lpips

    def take(self, rows: torch.Tensor) -> "Group":
        """The part of the group at these positions (early stopping's smaller batch)."""
        keep = rows.tolist()
        return dataclasses.replace(
            self, x=self.x[rows], requests=[self.requests[k] for k in keep],
            rows=[self.rows[k] for k in keep], regions=[self.regions[k] for k in keep],
            targets=self.targets.take(rows), masks=self.masks.take(rows),
            region_before=self.region_before[rows], size_target=self.size_target[rows],
            lpips_y=None if self.lpips_y is None else [f[rows] for f in self.lpips_y],
            health=self.health.take(rows))


@dataclass
class Working:
    """The images still in the latent phase: (a part of) a group and its state."""
    group: Group
    positions: torch.Tensor                  # their positions in the whole group
    latent: torch.Tensor                     # the leaf Adam optimises
    noises: list[torch.Tensor]
    masks: Masks                             # as dynamic masking left them
    optimizer: torch.optim.Optimizer
    drawn: bool                              # the noise maps are a draw (or were handed in)


@dataclass
class LatentOutcome:
    """Where the latent phase left every image of the group."""
    latent: torch.Tensor
    noises: list[torch.Tensor]
    masks: Masks
    drawn: list[bool]
    steps: list[int]                         # latent steps each image ran

    def store(self, work: Working, steps: int) -> None:
        rows = work.positions
        self.latent = self.latent.index_copy(0, rows, work.latent.detach())
        self.noises = [n.index_copy(0, rows, w) for n, w in zip(self.noises, work.noises)]
        self.masks = self.masks.put(rows, work.masks)
        for k in rows.tolist():
            self.drawn[k], self.steps[k] = work.drawn, steps


class Editor:
    """Holds the models and the user's edit configuration; `edit` runs batches."""

    def __init__(self, models: Models, config: EditConfig | None = None,
                 runtime: Runtime = Runtime()):
        self.runtime = runtime
        self.models = runtime.prepare(models)
        self.config = config or EditConfig()

    @property
    def resolution(self) -> int:
        return self.models.generator.size

    def edit(self, images: torch.Tensor, requests: Sequence[EditRequest], *,
             settings: Sequence[EditSettings] | None = None, start: StartPoint = StartPoint(),
             callback: Callable[[StepInfo], None] | None = None) -> list[EditResult]:
        """Edit a batch. `settings`: each row's resolved settings, when the caller has
        them (a job resolves each row once); by default they are resolved here."""
        g = self.models.generator
        n = len(requests)
        if images.ndim != 4 or images.shape[0] != n or images.shape[1:] != (3, g.size, g.size):
            raise ValueError(f"images must be [{n}, 3, {g.size}, {g.size}] to match the "
                             f"requests and the generator, got {list(images.shape)}")
        if settings is None:
            settings = [self.config.resolve(r.attributes, r.mode) for r in requests]
        self.check_models(settings, given_latent=start.latent is not None)
        results: list[EditResult] = [EditResult()] * n
        for rows in self._groups(settings):
            out = self._run_group(images[rows], [requests[i] for i in rows],
                                  [settings[i] for i in rows], rows, start.rows(rows), callback)
            for i, r in zip(rows, out):
                results[i] = r
        return results

    def invert(self, images: torch.Tensor, requests: Sequence[EditRequest], *,
               settings: Sequence[EditSettings] | None = None,
               callback: Callable[[StepInfo], None] | None = None) -> torch.Tensor:
        """The latents [N, n_latent, style_dim] after the steps every local edit of each
        image shares (`schedule.shared_prefix`). An edit started there,
        `edit(..., start=StartPoint(latent=..., step=shared_prefix(settings)))`, computes
        what it computes from scratch. Of each request only the attributes matter (hair-
        shape attributes add the ears to the recon mask)."""
        if settings is None:
            settings = [self.config.resolve(r.attributes, r.mode) for r in requests]
        steps = {shared_prefix(s) for s in settings}
        if len(steps) != 1 or 0 in steps:
            raise ValueError(f"these rows share no single inversion prefix (steps {steps}): "
                             "local edits without e4e_init, with optimizer.reinit on and "
                             "the seg loss starting no earlier than the classifier, do")
        (end,) = steps
        g = self.models.generator
        out = torch.empty(len(requests), g.n_latent, g.style_dim, dtype=g.input.input.dtype)
        for rows in self._groups(settings):
            group = self._prepare(images[rows], [requests[i] for i in rows],
                                  [settings[i] for i in rows], rows, StartPoint())
            group.schedule = dataclasses.replace(group.schedule, latent_steps=end,
                                                 noise_iterations=0)
            with self.runtime.autocast_context(group.x.device):
                latent, noises = self._start_point(group, StartPoint())
                latent = self._latent_phase(group, latent, noises, drawn=False,
                                            callback=callback).latent
            out[rows] = latent.cpu().to(out.dtype)
        return out

    @staticmethod
    def _groups(settings: Sequence[EditSettings]) -> list[list[int]]:
        """Positions of the rows that can share a batch (same settings but per-image ones)."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(s.group_key(), []).append(i)
        return list(groups.values())

    def check_models(self, settings: Sequence[EditSettings], given_latent: bool = False) -> None:
        """A setup error, before any step, when the rows need a network that is not loaded."""
        loaded = {"e4e": self.models.e4e is not None or given_latent,
                  "lpips_trunk": self.models.lpips is not None}
        missing = [n for n in required_networks(settings) if not loaded.get(n, True)]
        if missing:
            raise SetupError(f"these edits need {' and '.join(missing)}, which the loaded "
                             "models lack: name it in the models spec and load it "
                             "(load_models(..., networks=required_networks(settings)))")

    # -- one group: one schedule ------------------------------------------------------------
    def _run_group(self, x: torch.Tensor, requests: list[EditRequest], settings: list[EditSettings],
                   rows: list[int], start: StartPoint, callback) -> list[EditResult]:
        started = time.perf_counter()
        with self.runtime.autocast_context(self.models.generator.input.input.device):
            group = self._prepare(x, requests, settings, rows, start)       # 1. masks
            latent, noises = self._start_point(group, start)                 # 2. start
            outcome = self._latent_phase(                                    # 3. latent phase
                group, latent, noises, drawn=start.noises is not None, callback=callback)
            latent, masks = outcome.latent, outcome.masks
            noises = self._noise_phase(group, latent, outcome.noises, masks,  # 4. noise phase
                                       outcome.drawn, callback)
            with torch.no_grad():
                generated = self.models.generator(latent, noises).to(group.x.dtype)
                edited = blend(group.x, generated, masks.blend)              # 5. blend
                metrics = self._metrics(group, generated, edited, masks)     # 6. metrics
        for m, s, r in zip(metrics, settings, requests):     # each row's own (the group's
            m["settings_sha256"] = settings_sha256(s, r)     # differ in per-image values)
        seconds = (time.perf_counter() - started) / len(requests)
        return self._results(group, outcome, noises, generated, edited, metrics, seconds)

    def _prepare(self, x, requests, settings, rows, start: StartPoint) -> Group:
        s = settings[0]
        g = self.models.generator
        device, dtype = g.input.input.device, g.input.input.dtype
        x = self.runtime.images(x.to(device, dtype))
        regions = [mask_regions(r, s) for r in requests]
        targets = Targets.build(requests, settings, device, dtype)
        schedule = Schedule.for_group(s, [t.loss.weights.seg for t in settings],
                                      [r.size for r in requests], start_step=start.step,
                                      given_latent=start.latent is not None)
        with torch.no_grad():
            probs = self._parse(x, s)
            masks = initial_masks(probs, regions, g.size)
            region_before = portion(edit_region(probs, regions, g.size))
            size_target = targets.sizes * portion(masks.dynamic)
            lpips_y = None if s.local else self._lpips().layer_features(x)
        return Group(x=x, requests=list(requests), settings=s, rows=list(rows),
                     schedule=schedule, regions=regions, targets=targets, masks=masks,
                     region_before=region_before, size_target=size_target, lpips_y=lpips_y,
                     health=Health(len(requests), device))

    def _parse(self, images: torch.Tensor, s: EditSettings) -> torch.Tensor:
        """Parser probabilities at its working size."""
        return self.models.face_parser(images, out_size=s.parser_size,
                                       working_size=s.parser_size).to(images.dtype)

    def _lpips(self):
        if self.models.lpips is None:
            raise SetupError("global edits need the LPIPS trunk, which is not loaded")
        return self.models.lpips

    def _start_point(self, group: Group, start: StartPoint) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m, g = self.models, self.models.generator
        n, (device, dtype) = len(group.requests), (group.x.device, group.x.dtype)
        if start.latent is not None:
            latent = start.latent.to(device, dtype).clone()
        elif group.schedule.from_e4e:
            if m.e4e is None:
                raise SetupError("these edits start from e4e, which is not loaded")
            with torch.no_grad():
                latent = m.e4e(group.x).to(dtype)           # float32 even under autocast
        else:
            latent = m.mean_latent.to(device, dtype).view(1, 1, -1).repeat(n, g.n_latent, 1)
        latent.requires_grad_(True)
        if start.noises is not None:
            noises = [t.to(device, dtype).clone() for t in start.noises]
        else:
            noises = [t.to(dtype) for t in g.make_noise(n)]
        return latent, noises

    # -- 3. the latent phase ----------------------------------------------------------------
    def _latent_phase(self, group: Group, latent: torch.Tensor, noises: list[torch.Tensor], *,
                      drawn: bool, callback) -> LatentOutcome:
        """Adam on W+. `drawn` says whether the noise maps are already a draw (maps handed
        in count as one, so the noise phase keeps them). With early stopping, images
        that are done leave and the rest go on as a smaller batch."""
        s, schedule = group.settings, group.schedule
        n = len(group.requests)
        work = Working(group, torch.arange(n, device=latent.device), latent, noises,
                       group.masks, self._adam([latent], s), drawn)
        outcome = LatentOutcome(latent.detach(), noises, group.masks, [drawn] * n, [0] * n)
        stop = (EarlyStop(s.early_stop, schedule, group.requests, latent.device)
                if s.early_stop.enabled else None)
        for i in schedule.latent_range:
            events = schedule.events(i)
            if ADAM_REINIT in events:
                work.optimizer = self._adam([work.latent], s)
            if NOISE_REDRAW in events:
                work.noises, work.drawn = self._draw_noise(work.group), True
            terms, probs, p = self._latent_terms(work.group, i, work.latent, work.noises,
                                                 work.masks)
            self._update(work.group, work.optimizer, terms, [work.latent], "latent", i,
                         latent=work.latent)
            if DYNAMIC_UPDATE in events:
                assert probs is not None            # the schedule runs the parser then
                work.masks = grow_masks(work.group.masks, work.masks, probs,
                                        work.group.regions, work.group.targets.update_shape)
            self._report(callback, work.group, "latent", i, terms, events,
                         schedule.latent_steps)
            if stop is not None and p is not None and stop.due(i):
                work = self._retire(group, work, stop.done(i, work.positions, p,
                                                            terms["recon"][0]),
                                    outcome, i - schedule.start + 1)
                if not len(work.positions):
                    return outcome
        group.health.put(work.positions, work.group.health)
        outcome.store(work, schedule.latent_iterations)
        return outcome

    @staticmethod
    def _adam(params: list[torch.Tensor], s: EditSettings) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=s.optimizer.lr_latent)

    def _retire(self, group: Group, work: Working, done: torch.Tensor, outcome: LatentOutcome,
                steps: int) -> Working:
        """Store the images that are done; the others go on as a smaller batch, with
        their own rows of Adam's state (Adam is per element, so nothing else changes)."""
        if not done.any():
            return work
        group.health.put(work.positions, work.group.health)
        finished = torch.nonzero(done).flatten().to(work.latent.device)
        part = dataclasses.replace(work, positions=work.positions[finished],
                                   latent=work.latent[finished], noises=[m[finished] for m in work.noises],
                                   masks=work.masks.take(finished))
        outcome.store(part, steps)
        keep = torch.nonzero(~done).flatten().to(work.latent.device)
        latent = work.latent[keep].detach().clone().requires_grad_(True)
        optimizer = self._adam([latent], group.settings)
        state = work.optimizer.state.get(work.latent)
        if state:
            optimizer.state[latent] = {k: v[keep].clone() if v.ndim else v.clone()
                                       for k, v in state.items()}
        return Working(work.group.take(keep), work.positions[keep], latent,
                       [m[keep] for m in work.noises], work.masks.take(keep), optimizer,
                       work.drawn)

    def _latent_terms(self, group: Group, i: int, latent, noises, masks: Masks
                      ) -> tuple[Terms, torch.Tensor | None, torch.Tensor | None]:
        """The loss terms of latent step i, the parser's probabilities when it ran, and
        the classifier's probabilities of the row's attributes when it ran."""
        m, s, schedule, t = self.models, group.settings, group.schedule, group.targets
        generated = m.generator(latent, noises).to(latent.dtype)    # losses in float32
        terms: Terms = {"recon": (self._recon(group, generated, masks), group.recon_weight)}
        p = None
        if schedule.classifier_on(i):
            p = torch.sigmoid(m.classifier(generated).to(generated.dtype)).gather(1, t.attr_idx)
            terms["classf"] = (bernoulli_kl(p, t.target, t.attr_w), s.loss.weights.classf)
        probs = None
        if schedule.seg_on(i) or schedule.size_on(i):
            probs = self._parse(generated, s)
        elif schedule.dynamic_on(i):
            with torch.no_grad():
                probs = self._parse(generated, s)
        if probs is not None and schedule.seg_on(i):
            region = region_masks(probs, [r.shape for r in group.regions])
            terms["seg"] = (shape_mse(region, masks.shape), t.seg_w)
        if probs is not None and schedule.size_on(i):
            now = portion(edit_region(probs, group.regions, generated.shape[-1]))
            # size-0 rows: zero KL (see size_kl) and zero weight, as in the original
            weight = (t.sizes.view(-1) > 0).to(generated.dtype) * s.loss.weights.size
            terms["size"] = (size_kl(now, group.size_target, t.sizes), weight)
        return terms, probs, None if p is None else p.detach()

    def _recon(self, group: Group, generated: torch.Tensor, masks: Masks) -> torch.Tensor:
        """Masked MSE in local mode, masked LPIPS in global mode."""
        if group.settings.local:
            return masked_mse(group.x, generated, masks.recon)
        return self._lpips()(generated, group.x, masks.recon,
                             y_features=group.lpips_y).to(generated.dtype)

    # -- 4. the noise phase -----------------------------------------------------------------
    def _noise_phase(self, group: Group, latent: torch.Tensor, noises: list[torch.Tensor],
                     masks: Masks, drawn: list[bool], callback) -> list[torch.Tensor]:
        """Adam on the noise maps, the latent fixed: regularised, normalised maps that
        keep the masked reconstruction."""
        s, iterations = group.settings, group.schedule.noise_iterations
        if iterations == 0:
            return noises
        if not all(drawn):   # the original would normalise all-zero maps into NaN here
            keep = torch.tensor(drawn, device=latent.device).view(-1, 1, 1, 1)
            noises = [torch.where(keep, m, fresh) for m, fresh in
                      zip(noises, self._draw_noise(group))]
        noises = [t.detach().clone().requires_grad_(True) for t in noises]
        optimizer = torch.optim.Adam(noises, lr=s.optimizer.lr_noise)
        for j in range(iterations):
            generated = self.models.generator(latent, noises).to(latent.dtype)
            n_loss = noise_regularize(noises)
            noise_normalize_(noises)
            # Masked MSE in both modes, at the mode's recon weight: in global mode that is
            # the LPIPS weight, a quirk of the original kept for parity.
            terms: Terms = {"n_loss": (n_loss, s.loss.weights.n_loss),
                            "recon": (masked_mse(group.x, generated, masks.recon),
                                      group.recon_weight)}
            self._update(group, optimizer, terms, noises, "noise", j)
            self._report(callback, group, "noise", j, terms, (), iterations)
        return [t.detach() for t in noises]

    def _draw_noise(self, group: Group) -> list[torch.Tensor]:
        """N(0, 1) maps, each image from its own seed, so a batch changes nothing."""
        g = self.models.generator
        per_image = [g.make_noise(1, "randn", torch.Generator().manual_seed(r.seed))
                     for r in group.requests]
        return [torch.cat(maps).to(group.x.dtype) for maps in zip(*per_image)]

    # -- one optimisation step, shared by both phases ----------------------------------------
    def _update(self, group: Group, optimizer, terms: Terms, params: list[torch.Tensor],
                phase: str, step: int, latent: torch.Tensor | None = None) -> None:
        """Backpropagate the images still healthy and step. No host-device sync: a new
        failure is recorded on the device and read when the group is reported."""
        total = sum(w * v for v, w in terms.values())
        assert isinstance(total, torch.Tensor)
        group.health.update(phase, step, {k: v for k, (v, _) in terms.items()}, latent)
        group.health.masked_sum(total).backward()
        group.health.zero_failed_grads(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.runtime.check_every and step % self.runtime.check_every == 0:
            for k, error in group.health.new_errors():                 # a device read
                log.warning("image %d: %s", group.rows[k], error)

    @staticmethod
    def _report(callback, group: Group, phase: str, step: int, terms: Terms,
                events: tuple[str, ...], total: int) -> None:
        """The callback gets the terms as device tensors (reading them is its choice); the
        log line every `steps.log` steps is the loop's only read from the device."""
        if callback is not None:
            callback(StepInfo(phase, step, list(group.rows),
                              {k: v.detach().reshape(-1) for k, (v, _) in terms.items()},
                              tuple(events)))
        if step % group.settings.steps.log == 0:
            summary = ", ".join(f"{k} {v.detach().mean().item():.4g}" for k, (v, _) in terms.items())
            log.info("%s step %d/%d: %s", phase, step, total, summary)
            for k, error in group.health.new_errors():
                log.warning("image %d: %s", group.rows[k], error)

    # -- 6. metrics and results ---------------------------------------------------------------
    def _metrics(self, group: Group, generated, edited, masks: Masks) -> list[dict]:
        m, x, t = self.models, group.x, group.targets
        result = edited.clamp(0, 1)          # what gets written
        all_in = torch.sigmoid(m.classifier(x).to(x.dtype))          # [n, 40]
        all_out = torch.sigmoid(m.classifier(result).to(x.dtype))
        p_in, p_out = all_in.gather(1, t.attr_idx), all_out.gather(1, t.attr_idx)
        attributes = [r.attributes for r in group.requests]
        drift, flips = entanglement(all_in.float().cpu(), all_out.float().cpu(), attributes)
        judged = self._judge(x, result, t)
        # the probabilities are resized before the classes are summed (as the original)
        probs_after = upsample(self._parse(result, group.settings), x.shape[-1])
        region_after = portion(region_masks(probs_after, [r.edit for r in group.regions]))
        keep = 1 - masks.blend                                     # [n,1,S,S]
        diff = result - x
        l1 = (keep * diff.abs()).sum(dim=(1, 2, 3)) / (3 * keep.sum(dim=(1, 2, 3)))
        outside = (masks.blend < 0.01).to(x.dtype)
        n_out = 3 * outside.sum(dim=(1, 2, 3))
        mse_out = (outside * diff ** 2).sum(dim=(1, 2, 3)) / n_out.clamp(min=1)
        recon_mse = (masks.recon * (generated - x) ** 2).sum(dim=(1, 2, 3)) / (
            3 * masks.recon.sum(dim=(1, 2, 3))).clamp(min=1e-12)
        out = []
        for k, r in enumerate(group.requests):
            has_out = n_out[k].item() > 0
            mse = mse_out[k].item() if has_out else None
            out.append({
                "prob_input": {a: p_in[k, j].item() for j, a in enumerate(r.attributes)},
                "prob_result": {a: p_out[k, j].item() for j, a in enumerate(r.attributes)},
                "prob_all_input": all_in[k].float().tolist(),
                "prob_all_result": all_out[k].float().tolist(),
                "entanglement": drift[k], "unintended_flips": flips[k],
                **self._judge_columns(judged, k, r),
                "preservation_l1": l1[k].item(),
                "outside_pixels": int(n_out[k].item() // 3),
                "outside_mse": mse,
                "outside_psnr": (10 * math.log10(1 / mse) if mse else
                                 (math.inf if has_out else None)),
                "recon_mse": recon_mse[k].item(),
                "region_portion_before": group.region_before[k].item(),
                "region_portion_after": region_after[k].item(),
            })
        return out

    def _judge(self, x: torch.Tensor, result: torch.Tensor, t: Targets
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The judge's probabilities of each row's attributes on the input and the result
        ([n, A] each), or None without a judge. The judge is never part of a loss: it
        runs here, once the edit is done."""
        judge = self.models.judge
        if judge is None:
            return None
        return tuple(torch.sigmoid(judge(img).to(x.dtype)).gather(1, t.attr_idx)   # type: ignore[return-value]
                     for img in (x, result))

    @staticmethod
    def _judge_columns(judged, k: int, r: EditRequest) -> dict:
        if judged is None:
            return {"judge_prob_input": None, "judge_prob_result": None,
                    "judge_on_target": None}
        before, after = judged
        return {"judge_prob_input": {a: before[k, j].item() for j, a in enumerate(r.attributes)},
                "judge_prob_result": {a: after[k, j].item() for j, a in enumerate(r.attributes)},
                "judge_on_target": all(bool(on_target(after[k, j].item(), target))
                                       for j, target in enumerate(r.targets))}

    def _results(self, group: Group, outcome: LatentOutcome, noises, generated, edited,
                 metrics: list[dict], seconds: float) -> list[EditResult]:
        latent, masks = outcome.latent, outcome.masks
        results = []
        for k, error in enumerate(group.health.errors()):
            if error is None and not (torch.isfinite(edited[k]).all() and
                                      torch.isfinite(latent[k]).all()):
                error = "numeric blow-up: the final image or latent is not finite"
            if error is not None:
                results.append(EditResult(error=error))
                continue
            metrics[k].update(steps=outcome.steps[k] + group.schedule.noise_iterations,
                              seconds=seconds,
                              mode=group.settings.mode)
            results.append(EditResult(
                edited=edited[k].cpu(), generated=generated[k].cpu(), latent=latent[k].cpu(),
                noises=[t[k].cpu() for t in noises],
                masks={name: t[k].cpu() for name, t in masks.as_dict().items()},
                metrics=metrics[k]))
        return results
