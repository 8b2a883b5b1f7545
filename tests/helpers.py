"""Shared test helpers: key listings of the original checkpoints, and the deterministic
reference checkpoints the fidelity cases were recorded with (rebuilt from their rule)."""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
LISTINGS = DATA / "checkpoint-keys"
FIDELITY = DATA / "fidelity"

# A few steps of every phase and term: the job and stage tests' edit settings.
SHORT = {"steps.latent": 3, "steps.noise": 1, "loss.start_steps.classf": 1,
         "loss.start_steps.seg": 1, "dynamic_masking_iters": 1, "parser_size": 32,
         "e4e_start_step": 1}


def read_listing(name: str) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) rows of one listing, in file order."""
    rows = []
    for line in (LISTINGS / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()], dtype))
    return rows


def shapes_of(state_dict) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def _randn(key: str, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))


def reference_generator_state(rows) -> dict:
    """The fidelity cases' generator: each tensor a seeded draw or a fixed value, by key."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = taps[:, None] * taps[None, :] / 64 * 4
    sd = {}
    for key, shape, _ in rows:
        if key.endswith(".kernel"):
            v = blur.clone()
        elif key.startswith("style.") and key.endswith(".weight"):
            v = _randn(key, shape) / 0.01
        elif key.endswith("modulation.bias"):
            v = torch.ones(shape)
        elif key.endswith("noise.weight"):
            v = torch.full(shape, 0.1)
        elif key.endswith("activate.bias"):
            v = 0.1 * _randn(key, shape)
        elif key.endswith(".bias"):
            v = torch.zeros(shape)
        else:
            v = _randn(key, shape)
        sd[key] = v
    return sd


def reference_cnn_state(rows, fixed: dict, small_head: str) -> dict:
    """Classifier/parser rule: identity batch norm, zero biases, He-normal weights."""
    keys = {k for k, _, _ in rows}
    sd = {}
    for key, shape, dtype in rows:
        prefix, _, leaf = key.rpartition(".")
        if key in fixed:
            v = fixed[key].clone()
        elif dtype == "int64":
            v = torch.zeros(shape, dtype=torch.int64)
        elif f"{prefix}.running_mean" in keys:
            v = torch.ones(shape) if leaf in ("weight", "running_var") else torch.zeros(shape)
        elif leaf == "bias":
            v = torch.zeros(shape)
        elif len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            v = _randn(key, shape) * ((2.0 if len(shape) == 4 else 1.0) / fan_in) ** 0.5
            if key.startswith(small_head):
                v = v * 0.01
        else:
            v = _randn(key, shape)
        sd[key] = v
    return sd


def write_reference_checkpoints(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"generator": out / "stylegan2.pt", "classifier": out / "classifier.pt",
             "face_parser": out / "face_parser.pt"}
    torch.save({"g_ema": reference_generator_state(read_listing("stylegan2_g_ema_64_cm1.tsv"))},
               paths["generator"])
    mean = torch.tensor([0.5061, 0.4254, 0.3828]).view(1, 3, 1, 1)
    std = torch.tensor([0.2661, 0.2453, 0.2413]).view(1, 3, 1, 1)
    torch.save(reference_cnn_state(read_listing("attribute_classifier_state.tsv"),
                                   {"celeba_mean": mean, "celeba_std": std}, "fc_layers.15-16."),
               paths["classifier"])
    torch.save(reference_cnn_state(read_listing("face_parser_state.tsv"),
                                   {"loss.weight": torch.ones(9)}, "model.classifier.4."),
               paths["face_parser"])
    return paths


def write_photos(folder: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    """p0.png ... random RGB photos, plus broken.png, a file that is no image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"p{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder
