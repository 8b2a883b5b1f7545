"""The MaskFaceGAN editing engine: batched masked latent optimisation, then noise.

    editor = Editor(models, EditConfig.from_overrides({"steps.latent": 200}))
    results = editor.edit(images, [EditRequest(("smiling",), (1.0,)), ...])

One call edits N images [N, 3, S, S] in [0, 1] at the generator's resolution, each
with its own attributes, targets, size, smoothing, blend option, mode and seed. Rows
whose settings need a different schedule (local versus global, or other group-level
settings) are split into groups and run one group after another inside the same call;
results come back in input order. Every loss is per image and the batch loss is their
sum, so an image's result does not depend on what else is in its batch.

What one image goes through (numbers from the original code, see the README):
  masks from the parser on the input -> latent phase (Adam on W+; recon from the
  start, classifier and seg/size from their start steps, dynamic masking in its
  window, noise redrawn at its end) -> noise phase (Adam on the noise maps) ->
  result = blend * generated + (1 - blend) * input.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from models.classifier import ATTRIBUTE_INDEX
from models.face_parser import region_masks
from models.loaders import Models

from . import attributes as attr_table
from .config import EditConfig
from .losses import bernoulli_kl, masked_mse, noise_normalize_, noise_regularize, portion

log = logging.getLogger(__name__)

PER_IMAGE_KEYS = ("loss.weights.seg", "models.update_shape")


@dataclass(frozen=True)
class EditRequest:
    """What to do to one image. Targets are in [0, 1]; the classifier aims at
    |target - smoothing|. `seed` draws this image's noise maps when they are redrawn."""
    attributes: tuple[str, ...]
    targets: tuple[float, ...]
    size: float = 0.0
    smoothing: float | None = None
    blend: str | None = None
    mode: str | None = None
    seed: int = 0

    def __post_init__(self):
        attrs, targets = tuple(self.attributes), tuple(float(t) for t in self.targets)
        object.__setattr__(self, "attributes", attrs)
        object.__setattr__(self, "targets", targets)
        if not attrs:
            raise ValueError("no attribute to edit")
        for a in attrs:
            attr_table.check_attribute(a)
        if len(set(attrs)) != len(attrs):
            raise ValueError(f"an attribute is listed twice: {list(attrs)}")
        if len(targets) != len(attrs):
            raise ValueError(f"{len(attrs)} attributes but {len(targets)} targets")
        for a, t in zip(attrs, targets):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"target of {a} must be in [0, 1], got {t}")
        if not (math.isfinite(self.size) and self.size >= 0):
            raise ValueError(f"size must be a finite number >= 0, got {self.size}")
        if self.smoothing is not None and not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.blend not in (None, "include_skin", "no_skin"):
            raise ValueError(f"blend must be include_skin or no_skin, got {self.blend!r}")
        if self.mode not in (None, "auto", "local", "global"):
            raise ValueError(f"mode must be auto, local or global, got {self.mode!r}")


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
    events: tuple[str, ...] = ()     # adam_reinit, noise_redraw, dynamic_update, e4e_init


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The original's `interpolate`: area when shrinking, bilinear when enlarging."""
    if x.shape[-1] == size:
        return x
    mode = "area" if size < x.shape[-1] else "bilinear"
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs)


class Editor:
    """Holds the models and the user's edit configuration; `edit` runs batches."""

    def __init__(self, models: Models, config: EditConfig | None = None):
        self.models = models
        self.config = config or EditConfig.from_overrides()

    @property
    def resolution(self) -> int:
        return self.models.generator.size

    def edit(self, images: torch.Tensor, requests: Sequence[EditRequest], *,
             init_latent: torch.Tensor | None = None, start_step: int | None = None,
             init_noises: list[torch.Tensor] | None = None,
             callback: Callable[[StepInfo], None] | None = None) -> list[EditResult]:
        """Edit a batch. `init_latent` [N, n_latent, style_dim], `start_step` and
        `init_noises` (each [N, 1, r, r]) replace the usual start (mean latent or e4e,
        step 0 or e4e_start_step, zero noise)."""
        g = self.models.generator
        n = len(requests)
        if images.ndim != 4 or images.shape[0] != n or images.shape[1:] != (3, g.size, g.size):
            raise ValueError(f"images must be [{n}, 3, {g.size}, {g.size}] to match the "
                             f"requests and the generator, got {list(images.shape)}")
        settings = [self.config.resolve(r.attributes, r.mode) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            key = tuple((k, v) for k, v in s.values if k not in PER_IMAGE_KEYS)
            groups.setdefault(key, []).append(i)
        results: list[EditResult | None] = [None] * n
        for rows in groups.values():
            sub = lambda t: None if t is None else t[rows]  # noqa: E731
            out = self._run_group(
                images[rows], [requests[i] for i in rows], [settings[i] for i in rows], rows,
                init_latent=sub(init_latent), start_step=start_step,
                init_noises=None if init_noises is None else [m[rows] for m in init_noises],
                callback=callback)
            for i, r in zip(rows, out):
                results[i] = r
        return results  # type: ignore[return-value]

    # -- one group: one schedule -------------------------------------------------------
    def _run_group(self, x, requests, settings, rows, *, init_latent, start_step, init_noises,
                   callback) -> list[EditResult]:
        started = time.perf_counter()
        m, cfg = self.models, settings[0]
        g, parser = m.generator, m.face_parser
        device = g.input.input.device
        dtype = g.input.input.dtype
        x = x.to(device, dtype)
        n = len(requests)
        local = cfg["mode"] == "local"
        errors: list[str | None] = [None] * n

        need = []
        if cfg["e4e_init"] and init_latent is None and m.e4e is None:
            need.append("e4e")
        if not local and m.lpips is None:
            need.append("lpips_trunk")
        if need:
            msg = f"{cfg['mode']} edits need {' and '.join(need)} in the models spec"
            return [EditResult(error=msg) for _ in requests]

        # ---- per-image tables: regions, weights, targets --------------------------
        edit_regions = [attr_table.regions(r.attributes) for r in requests]
        hair_shape = [attr_table.has_hair_shape(r.attributes) for r in requests]
        ears = [("ears",) if h else () for h in hair_shape]
        if local:
            recon_regions = [("skin",) + e for e in ears]
            blend_regions = [(("skin",) if (r.blend or cfg["blend"]) == "include_skin" else ())
                             + reg + e for r, reg, e in zip(requests, edit_regions, ears)]
        else:
            recon_regions = blend_regions = [attr_table.GLOBAL_REGIONS] * n
        shape_regions = [reg + e for reg, e in zip(edit_regions, ears)]
        seg_w = torch.tensor([s["loss.weights.seg"] for s in settings], device=device, dtype=dtype)
        update_shape = torch.tensor([s["models.update_shape"] for s in settings], device=device)
        sizes = torch.tensor([r.size for r in requests], device=device, dtype=dtype).view(n, 1)
        n_attr = max(len(r.attributes) for r in requests)
        attr_idx = torch.zeros(n, n_attr, dtype=torch.long, device=device)
        attr_w = torch.zeros(n, n_attr, device=device, dtype=dtype)
        target = torch.zeros(n, n_attr, device=device, dtype=dtype)
        for k, r in enumerate(requests):
            smoothing = cfg["smoothing"] if r.smoothing is None else r.smoothing
            for j, (a, t) in enumerate(zip(r.attributes, r.targets)):
                attr_idx[k, j], attr_w[k, j] = ATTRIBUTE_INDEX[a], 1.0
                target[k, j] = abs(t - smoothing)
        target = torch.where(attr_w > 0, target, torch.full_like(target, 0.5))

        # ---- masks from the input -------------------------------------------------
        ws = cfg["parser_size"]
        parse = lambda img: parser(img, out_size=ws, working_size=ws)  # noqa: E731
        with torch.no_grad():
            probs_in = parse(x)
            at_res = lambda p: F.interpolate(p, size=(g.size, g.size), mode="bilinear",  # noqa: E731
                                             align_corners=False)
            masks0 = {
                "recon": at_res(region_masks(probs_in, recon_regions)),
                "blend": at_res(region_masks(probs_in, blend_regions)),
                "dynamic": at_res(region_masks(probs_in, recon_regions if not local
                                               else edit_regions)),
                "shape": region_masks(probs_in, shape_regions),
            }
            region_before = portion(at_res(region_masks(probs_in, edit_regions)))
            target_portion = sizes * portion(masks0["dynamic"])
            lpips_y = m.lpips.layer_features(x) if not local else None
        masks = {k: v.clone() for k, v in masks0.items()}

        # ---- start point ------------------------------------------------------------
        events0: list[str] = []
        if init_latent is not None:
            latent = init_latent.to(device, dtype).clone()
            start = start_step or 0
        elif cfg["e4e_init"]:
            with torch.no_grad():
                latent = m.e4e(x)
            start = cfg["e4e_start_step"] if start_step is None else start_step
            events0.append("e4e_init")
        else:
            latent = m.mean_latent.to(device, dtype).view(1, 1, -1).repeat(n, g.n_latent, 1)
            start = start_step or 0
        latent.requires_grad_(True)
        if init_noises is not None:
            noises = [t.to(device, dtype).clone() for t in init_noises]
        else:
            noises = g.make_noise(n)
            noises = [t.to(dtype) for t in noises]
        redrawn = init_noises is not None

        steps, noise_steps = cfg["steps.latent"], cfg["steps.noise"]
        classf_start, seg_start = cfg["loss.start_steps.classf"], cfg["loss.start_steps.seg"]
        dyn_end = seg_start + cfg["dynamic_masking_iters"]
        w_recon = cfg["loss.weights.mse"] if local else cfg["loss.weights.lpips"]
        w_classf, w_size = cfg["loss.weights.classf"], cfg["loss.weights.size"]
        optimizer = torch.optim.Adam([latent], lr=cfg["optimizer.lr_latent"])
        steps_run = 0

        # ---- latent phase -------------------------------------------------------------
        for i in range(start, steps):
            events = list(events0) if i == start else []
            if cfg["optimizer.reinit"] and i == classf_start:
                optimizer = torch.optim.Adam([latent], lr=cfg["optimizer.lr_latent"])
                events.append("adam_reinit")
            if i == dyn_end and noise_steps > 0:
                noises = self._draw_noise(requests, dtype)
                redrawn = True
                events.append("noise_redraw")
            generated = g(latent, noises)
            terms: dict[str, tuple[torch.Tensor, torch.Tensor | float]] = {}
            if local:
                terms["recon"] = (masked_mse(x, generated, masks["recon"]), w_recon)
            else:
                terms["recon"] = (m.lpips(generated, x, masks["recon"], y_features=lpips_y),
                                  w_recon)
            if w_classf > 0 and i >= classf_start:
                p = torch.sigmoid(m.classifier(generated)).gather(1, attr_idx)
                terms["classf"] = (bernoulli_kl(p, target, attr_w), w_classf)
            seg_on = i >= seg_start and bool((seg_w > 0).any())
            size_on = i >= seg_start and bool((sizes > 0).any())
            dynamic_on = local and cfg["dynamic_masking"] and seg_start <= i < dyn_end
            probs = None
            if seg_on or size_on:
                probs = parse(generated)
            elif dynamic_on:
                with torch.no_grad():
                    probs = parse(generated)
            if seg_on:
                seg = ((region_masks(probs, shape_regions) - masks["shape"]) ** 2).mean(dim=(1, 2, 3))
                terms["seg"] = (seg, seg_w)
            if size_on:
                now = portion(at_res(region_masks(probs, edit_regions)))
                size_kl = bernoulli_kl(now, torch.where(sizes > 0, target_portion, now.detach()))
                terms["size"] = (size_kl, (sizes.view(-1) > 0).to(dtype) * w_size)
            total = sum(w * v for v, w in terms.values())
            errors = self._check(errors, total, latent, "latent", i, terms)
            self._backward(total, errors, [latent])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dynamic_on:
                with torch.no_grad():
                    d = at_res(region_masks(probs.detach(), edit_regions))
                    masks["recon"] = (masks0["recon"] - d).clamp_(0, 1)
                    masks["dynamic"] = (masks0["dynamic"] + d).clamp_(0, 1)
                    grown = (masks0["shape"] + _resize(d, ws)).clamp_(0, 1)
                    masks["shape"] = torch.where(update_shape.view(-1, 1, 1, 1), grown,
                                                 masks["shape"].clamp(0, 1))
                    masks["blend"] = masks["blend"].clamp(0, 1)   # the original clamps every mask
                events.append("dynamic_update")
            steps_run += 1
            self._report(callback, "latent", i, rows, terms, events, cfg, steps)

        # ---- noise phase --------------------------------------------------------------
        latent = latent.detach()
        if noise_steps > 0:
            if not redrawn:   # the original would normalise all-zero maps into NaN here
                noises = self._draw_noise(requests, dtype)
            noises = [t.detach().clone().requires_grad_(True) for t in noises]
            optimizer = torch.optim.Adam(noises, lr=cfg["optimizer.lr_noise"])
            w_noise = cfg["loss.weights.n_loss"]
            for j in range(noise_steps + 1):
                generated = g(latent, noises)
                n_loss = noise_regularize(noises)
                noise_normalize_(noises)
                terms = {"n_loss": (n_loss, w_noise),
                         "recon": (masked_mse(x, generated, masks["recon"]), w_recon)}
                total = sum(w * v for v, w in terms.values())
                errors = self._check(errors, total, None, "noise", j, terms)
                self._backward(total, errors, noises)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps_run += 1
                self._report(callback, "noise", j, rows, terms, (), cfg, noise_steps + 1)
            noises = [t.detach() for t in noises]

        # ---- result and metrics ---------------------------------------------------------
        with torch.no_grad():
            generated = g(latent, noises)
            blend = masks["blend"]
            edited = x + blend * (generated - x)   # = blend * generated + (1 - blend) * x
            metrics = self._metrics(x, generated, edited, masks, requests, attr_idx,
                                    edit_regions, region_before, parse)
        seconds = (time.perf_counter() - started) / n
        results = []
        for k in range(n):
            if errors[k] is None and not (torch.isfinite(edited[k]).all() and
                                          torch.isfinite(latent[k]).all()):
                errors[k] = "numeric blow-up: the final image or latent is not finite"
            if errors[k] is not None:
                results.append(EditResult(error=errors[k]))
                continue
            metrics[k].update(steps=steps_run, seconds=seconds, mode=cfg["mode"])
            results.append(EditResult(
                edited=edited[k].cpu(), generated=generated[k].cpu(), latent=latent[k].cpu(),
                noises=[t[k].cpu() for t in noises],
                masks={name: t[k].cpu() for name, t in masks.items()},
                metrics=metrics[k]))
        return results

    def _draw_noise(self, requests, dtype) -> list[torch.Tensor]:
        """N(0, 1) maps, each image from its own seed, so a batch changes nothing."""
        per_image = [self.models.generator.make_noise(
            1, "randn", torch.Generator().manual_seed(int(r.seed))) for r in requests]
        return [torch.cat(maps).to(dtype) for maps in zip(*per_image)]

    @staticmethod
    def _backward(total, errors, params):
        """Backpropagate the images still healthy; a failed image's rows stay where they are."""
        ok = torch.tensor([e is None for e in errors], device=total.device)
        if not ok.any():
            return
        torch.where(ok, total, torch.zeros_like(total)).sum().backward()
        for p in params:
            if p.grad is not None and not ok.all():
                p.grad[~ok] = 0

    @staticmethod
    def _check(errors, total, latent, phase, step, terms):
        """Mark images whose loss (or latent) stopped being finite; they fail, others go on."""
        bad = ~torch.isfinite(total.detach())
        if latent is not None:
            bad |= ~torch.isfinite(latent.detach()).flatten(1).all(dim=1)
        for k in torch.nonzero(bad).flatten().tolist():
            if errors[k] is None:
                which = [name for name, (v, _) in terms.items()
                         if not torch.isfinite(v.detach()[k])]
                errors[k] = (f"numeric blow-up in the {phase} phase at step {step}: "
                             f"{', '.join(which) or 'latent'} not finite")
                log.warning("image %d: %s", k, errors[k])
        return errors

    @staticmethod
    def _report(callback, phase, step, rows, terms, events, cfg, total):
        if callback is not None:
            callback(StepInfo(phase, step, list(rows),
                              {k: v.detach().reshape(-1).cpu() for k, (v, _) in terms.items()},
                              tuple(events)))
        if step % cfg["steps.log"] == 0:
            summary = ", ".join(f"{k} {v.detach().mean().item():.4g}" for k, (v, _) in terms.items())
            log.info("%s step %d/%d: %s", phase, step, total, summary)

    def _metrics(self, x, generated, edited, masks, requests, attr_idx, edit_regions,
                 region_before, parse) -> list[dict]:
        m = self.models
        result = edited.clamp(0, 1)          # what gets written
        p_in = torch.sigmoid(m.classifier(x)).gather(1, attr_idx)
        p_out = torch.sigmoid(m.classifier(result)).gather(1, attr_idx)
        probs_out = F.interpolate(parse(result), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        region_after = portion(region_masks(probs_out, edit_regions))
        keep = 1 - masks["blend"]                                   # [n,1,S,S]
        diff = result - x
        l1 = (keep * diff.abs()).sum(dim=(1, 2, 3)) / (3 * keep.sum(dim=(1, 2, 3)))
        outside = (masks["blend"] < 0.01).to(x.dtype)
        n_out = 3 * outside.sum(dim=(1, 2, 3))
        mse_out = (outside * diff ** 2).sum(dim=(1, 2, 3)) / n_out.clamp(min=1)
        recon = masks["recon"]
        recon_mse = (recon * (generated - x) ** 2).sum(dim=(1, 2, 3)) / (
            3 * recon.sum(dim=(1, 2, 3))).clamp(min=1e-12)
        out = []
        for k, r in enumerate(requests):
            has_out = n_out[k].item() > 0
            mse = mse_out[k].item() if has_out else None
            out.append({
                "prob_input": {a: p_in[k, j].item() for j, a in enumerate(r.attributes)},
                "prob_result": {a: p_out[k, j].item() for j, a in enumerate(r.attributes)},
                "preservation_l1": l1[k].item(),
                "outside_pixels": int(n_out[k].item() // 3),
                "outside_mse": mse,
                "outside_psnr": (10 * math.log10(1 / mse) if mse else
                                 (math.inf if has_out else None)),
                "recon_mse": recon_mse[k].item(),
                "region_portion_before": region_before[k].item(),
                "region_portion_after": region_after[k].item(),
            })
        return out
