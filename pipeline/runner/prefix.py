"""The shared inversion prefix, per image: computed once, kept in the output, reused.

Every local edit of an image begins with the same recon-only steps (see
`schedule.shared_prefix`). The job therefore runs them once per (image, recon mask) and
branches each edit from there. The latent at the branch point is stored under the
output as `prefixes/<key>.npy`, the key being a hash of everything the prefix depends
on: the decoded input pixels, the recon mask's classes, the generator, parser and mean
latent, and the settings the prefix steps read. A later job with more attributes for
the same images, into the same output, starts at the branch point; a changed setting
or network gives another key, so a stale prefix is never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict

import torch

from pipeline.engine.editor import Editor, StartPoint
from pipeline.engine.masks import mask_regions
from pipeline.engine.rows import EditRequest
from pipeline.engine.schedule import shared_prefix
from pipeline.engine.settings import EditSettings
from pipeline.errors import StorageError

from pipeline.output.layout import Output

log = logging.getLogger(__name__)

VERSION = 1            # bump when what a prefix computes changes
MEMORY_ENTRIES = 4096  # prefixes an actor keeps in memory (~37 KB each at 1024 px)


def prefix_key(image: torch.Tensor, request: EditRequest, settings: EditSettings, editor: Editor,
               autocast: str | None) -> str:
    """What a prefix depends on, hashed."""
    m = editor.models
    h = hashlib.sha256()
    pixels = image.detach().float().cpu().contiguous().numpy()
    h.update(json.dumps([VERSION, list(pixels.shape)]).encode() + pixels.tobytes())
    h.update(m.mean_latent.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps({
        "recon": mask_regions(request, settings).recon, "steps": shared_prefix(settings),
        "lr": settings.optimizer.lr_latent, "mse": settings.loss.weights.mse,
        "parser_size": settings.parser_size, "generator": m.hashes.get("generator"),
        "face_parser": m.hashes.get("face_parser"), "autocast": autocast,
    }, sort_keys=True).encode())
    return h.hexdigest()[:32]


class PrefixCache:
    """Prefix latents by key: in this actor's memory, then under the output."""

    def __init__(self, output: Output):
        self.output = output
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        array = self.output.get_npy(f"prefixes/{key}.npy")
        if array is None:
            return None
        return self._remember(key, torch.from_numpy(array))

    def put(self, key: str, latent: torch.Tensor) -> None:
        try:
            self.output.put_npy(f"prefixes/{key}.npy", latent.float().numpy())
        except StorageError as e:           # the edits go on; a later job computes it again
            log.warning("prefix %s not kept in the output: %s", key, e)
        self._remember(key, latent)

    def _remember(self, key: str, latent: torch.Tensor) -> torch.Tensor:
        self.memory[key] = latent
        while len(self.memory) > MEMORY_ENTRIES:
            self.memory.popitem(last=False)
        return latent


def branch_points(editor: Editor, cache: PrefixCache, images: list[torch.Tensor],
                  requests: list[EditRequest], settings: list[EditSettings], chunk: int,
                  autocast: str | None) -> tuple[list[torch.Tensor], list[str]]:
    """The prefix latent of each row (all rows must share a prefix) and where it came
    from ('cached' or 'computed'); each missing prefix runs once, `chunk` at a time."""
    keys = [prefix_key(i, r, s, editor, autocast) for i, r, s in zip(images, requests, settings)]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    missing = [keys.index(k) for k, v in found.items() if v is None]
    for start in range(0, len(missing), chunk):
        rows = missing[start:start + chunk]
        latents = editor.invert(torch.stack([images[k] for k in rows]),
                                [requests[k] for k in rows], settings=[settings[k] for k in rows])
        for k, latent in zip(rows, latents):
            if torch.isfinite(latent).all():          # a blown-up prefix is not kept
                cache.put(keys[k], latent)
            found[keys[k]] = latent
    log.info("prefixes: %d cached, %d computed", len(found) - len(missing), len(missing))
    source = {k: ("computed" if keys.index(k) in missing else "cached") for k in found}
    return [found[k] for k in keys], [source[k] for k in keys]  # type: ignore[misc]


def start_for(latents: list[torch.Tensor], settings: list[EditSettings]) -> StartPoint:
    """The StartPoint of rows branching from these prefixes (one step count for all)."""
    (steps,) = {shared_prefix(s) for s in settings}
    return StartPoint(latent=torch.stack(latents), step=steps)
