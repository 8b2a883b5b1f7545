"""Small random-weight checkpoints in the exact file formats of the real ones.

Tests and the demo run on these when real weights are absent. Everything made from
them is marked as such (`tiny: true` in the models spec, and in every output).
Key names match the originals; widths are narrow where the architecture allows
(generator, classifier, e4e, the judge). The face parser and the VGG16 trunk have
fixed torchvision widths and are full size (~160 MB and ~60 MB).

The tiny judge is in the `branched` format (models/judge.py): another narrow
BranchedTiny, drawn after every other network, so its weights differ from the
classifier's. `resnet50_judge_state` gives the other format's exact keys, for tests.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torchvision.models import resnet50

from .checkpoints import sha256_file
from .classifier import BranchedTiny
from .e4e import Encoder4Editing
from .face_parser import FaceParser
from .lpips_masked import MaskedLPIPS
from .spec import MeanLatent, ModelsSpec, WeightRef, write_spec
from .stylegan2 import Generator, compute_mean_latent

log = logging.getLogger(__name__)

FILES = {"generator": "stylegan2.pt", "face_parser": "face_parser.pt",
         "classifier": "classifier.pt", "e4e": "e4e.pt", "lpips_trunk": "vgg16_features.pth",
         "judge": "judge.pt"}
TINY_NOTE = "random weights from `maskface weights make-tiny`: outputs are not real edits"


def tiny_channels(size: int) -> dict[int, int]:
    return {2 ** i: 64 if 2 ** i <= 16 else 32 if 2 ** i <= 64 else 16
            for i in range(2, size.bit_length())}


def tiny_generator(size: int = 64, style_dim: int = 64) -> Generator:
    g = Generator(size, style_dim=style_dim, channels=tiny_channels(size))
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.1)                  # non-zero, so the noise maps matter
            elif name.endswith("activate.bias"):
                p.normal_(0, 0.1)
    return g


def tiny_classifier() -> BranchedTiny:
    """Narrow BranchedTiny with He-normal weights, so its logits respond to the image.

    PyTorch's default init shrinks the signal through 15 layers until every logit is
    its bias; the editing engine's classifier term would then have nothing to steer.
    """
    c = BranchedTiny(width=8, fc_width=16)
    with torch.no_grad():
        for name, p in c.named_parameters():
            if p.ndim >= 2:
                gain = 0.2 if name.startswith("fc_layers.15-16") else 1.0   # logits near N(0, 1)
                p.normal_(0, gain * (2 / p[0].numel()) ** 0.5)
    return c


def resnet50_judge_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight `torchvision.models.resnet50(num_classes=40)` state dict: a
    `resnet50` judge file's exact keys and shapes (~95 MB; not written by make_tiny)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return resnet50(num_classes=40).state_dict()


def make_tiny(dest: str | Path, resolution: int = 64, seed: int = 0,
              style_dim: int = 64) -> Path:
    """Write a complete tiny checkpoint set plus `models.yaml` into `dest`; return the spec path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = tiny_generator(resolution, style_dim)
        latent_avg = compute_mean_latent(g, n=2_000, seed=seed)
        torch.save({"g_ema": g.state_dict(), "latent_avg": latent_avg}, dest / FILES["generator"])

        parser_sd = dict(FaceParser(working_size=resolution).state_dict())
        parser_sd["loss.weight"] = torch.ones(9)
        torch.save(parser_sd, dest / FILES["face_parser"])

        torch.save(tiny_classifier().state_dict(), dest / FILES["classifier"])

        enc = Encoder4Editing(stylegan_size=resolution, widths=(16, 16, 32, 32),
                              style_dim=style_dim)
        torch.save({"options": argparse.Namespace(stylegan_size=resolution,
                                                  encoder_type="Encoder4Editing"),
                    "encoder_state_dict": enc.state_dict(),
                    "latent_avg": latent_avg.repeat(enc.style_count, 1)},
                   dest / FILES["e4e"])

        trunk = MaskedLPIPS().features.state_dict()
        torch.save({f"features.{k}": v for k, v in trunk.items()}, dest / FILES["lpips_trunk"])

        # drawn last, so every other file is what it was before the judge existed
        torch.save(tiny_classifier().state_dict(), dest / FILES["judge"])

    refs = {name: WeightRef(file, sha256_file(dest / file)) for name, file in FILES.items()}
    spec = ModelsSpec(**refs, mean_latent=MeanLatent(samples=2_000, seed=seed), tiny=True)
    path = dest / "models.yaml"
    write_spec(spec, str(path), header=f"tiny models spec ({resolution} px): {TINY_NOTE}")
    log.info("wrote a tiny %d px checkpoint set to %s", resolution, dest)
    return path
