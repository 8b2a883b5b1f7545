"""Shared test helpers: key listings of the original checkpoints, the deterministic
reference checkpoints the fidelity cases were recorded with (rebuilt from their rule),
metrics rows taken out of an output (a killed job's), and a pickle that would run code
when loaded (PlantsAMarker)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
LISTINGS = DATA / "checkpoint-keys"
FIDELITY = DATA / "fidelity"                  # local mode, latent phase
FIDELITY_GLOBAL = DATA / "fidelity-global"    # global mode (e4e start, masked LPIPS)
FIDELITY_NOISE = DATA / "fidelity-noise"      # latent phase, then the noise phase

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


# torchvision's VGG16 `features`: conv index -> (out, in) channels (3x3 kernels)
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128),
               12: (256, 256), 14: (256, 256), 17: (512, 256), 19: (512, 512),
               21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


def _he(key: str, shape) -> torch.Tensor:
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return _randn(key, shape) * (2.0 / fan_in) ** 0.5


def reference_e4e_state(rows, stylegan_size: int = 64) -> dict:
    """The e4e `encoder_state_dict` rule of the global and noise cases (case.json
    `checkpoints["e4e.pt"]`): the 1024 px listing without the styles a smaller
    generator lacks; identity batch norm (0.2 on each residual branch's last one),
    PReLU 0.25, He-normal convs, style linears randn * 0.25, other biases 0.1 * randn."""
    styles = 2 * (stylegan_size.bit_length() - 1) - 2
    keys = {k for k, _, _ in rows}
    sd = {}
    for key, shape, dtype in rows:
        prefix, _, leaf = key.rpartition(".")
        parts = key.split(".")
        if parts[0] == "styles" and int(parts[1]) >= styles:
            continue
        if dtype == "int64":
            v = torch.zeros(shape, dtype=torch.int64)
        elif f"{prefix}.running_mean" in keys:
            if leaf == "weight":
                last = re.fullmatch(r"body\.\d+\.res_layer\.4", prefix) is not None
                v = torch.full(shape, 0.2) if last else torch.ones(shape)
            else:
                v = torch.ones(shape) if leaf == "running_var" else torch.zeros(shape)
        elif re.fullmatch(r"input_layer\.2\.weight|body\.\d+\.res_layer\.2\.weight", key):
            v = torch.full(shape, 0.25)                            # PReLU
        elif len(shape) == 4:
            v = _he(key, shape)
        elif re.fullmatch(r"styles\.\d+\.linear\.weight", key):
            v = _randn(key, shape) * 0.25
        elif leaf == "bias":
            v = 0.1 * _randn(key, shape)
        else:
            raise ValueError(f"the e4e rule does not cover {key} {shape}")
        sd[key] = v
    return sd


def reference_e4e_checkpoint(latent_mean: torch.Tensor, stylegan_size: int = 64) -> dict:
    """The original's e4e `state.pt` layout around `reference_e4e_state`."""
    sd = reference_e4e_state(read_listing("e4e_encoder_state_dict_1024.tsv"), stylegan_size)
    styles = 2 * (stylegan_size.bit_length() - 1) - 2
    return {"options": argparse.Namespace(stylegan_size=stylegan_size),
            "encoder_state_dict": sd,
            "latent_avg": latent_mean.float().reshape(1, -1).repeat(styles, 1)}


def reference_vgg16_features_state() -> dict:
    """The LPIPS trunk rule: torchvision VGG16 `features` keys, weight then bias per conv;
    He-normal weights, biases 0.1 * randn."""
    sd = {}
    for index, (out, inp) in VGG16_CONVS.items():
        weight, bias = f"features.{index}.weight", f"features.{index}.bias"
        sd[weight] = _he(weight, [out, inp, 3, 3])
        sd[bias] = 0.1 * _randn(bias, [out])
    return sd


def write_global_checkpoints(out: Path, latent_mean: torch.Tensor) -> dict[str, Path]:
    """e4e.pt and vgg16_features.pth (the names matter: torch.save records the file's
    stem inside the archive, so the bytes and the sha256 depend on it)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"e4e": out / "e4e.pt", "lpips_trunk": out / "vgg16_features.pth"}
    torch.save(reference_e4e_checkpoint(latent_mean), paths["e4e"])
    torch.save(reference_vgg16_features_state(), paths["lpips_trunk"])
    return paths


def faces_near_mean(models, n: int, seed: int) -> torch.Tensor:
    """`n` images the tiny generator can make: random W+ codes near the mean latent."""
    g = models.generator
    torch.manual_seed(seed)
    w = models.mean_latent.view(1, 1, -1) + 0.3 * torch.randn(n, g.n_latent, g.style_dim)
    with torch.no_grad():
        return g(w, g.make_noise(n)).clamp(0, 1)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def case_hashes(case: dict) -> dict[str, str]:
    """File name -> the sha256 a case states for it (`checkpoints`); the LPIPS linear
    layers' entry is a sentence, whose sha256 names the lpips package's `vgg.pth`."""
    out = {}
    for name, entry in case["checkpoints"].items():
        if isinstance(entry, dict):
            out[name] = entry["sha256"]
        else:
            (sha,) = re.findall(r"\b[0-9a-f]{64}\b", entry)
            out["vgg.pth"] = sha
    return out


def check_case_hashes(case_file: Path, files: dict[str, Path]) -> None:
    """Every checkpoint a case names, by file name in `files`, has the case's sha256."""
    case = json.loads(case_file.read_text())
    for name, want in case_hashes(case).items():
        if name not in files:
            raise AssertionError(f"{case_file}: names checkpoint {name}, which was not rebuilt")
        got = sha256_of(files[name])
        if got != want:
            raise AssertionError(f"{files[name]}: sha256 {got}, but {case_file} was recorded "
                                 f"with {name} of sha256 {want}: the rebuild rule and the "
                                 "case disagree, so no number of this case means anything")


def write_photos(folder: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    """p0.png ... random RGB photos, plus broken.png, a file that is no image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"p{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def drop_metrics_rows(out, ids) -> None:
    """Take `ids`' metrics rows out of an output, as if their batches had never finished
    (a killed job): each metrics file holding one is rewritten without it (removed when
    nothing is left). Their images and latents stay."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.output.metrics import metrics_paths
    for path in metrics_paths(out):
        with out.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keep = pc.invert(pc.is_in(table["id"], value_set=pa.array(sorted(ids), pa.string())))
        if pc.all(keep).as_py():
            continue
        if pc.any(keep).as_py():
            with out.fs.open(path, "wb") as f:
                pq.write_table(table.filter(keep), f)
        else:
            out.fs.rm(path)


class PlantsAMarker:
    """A malicious pickle: loading it runs `touch path` (through os.system, or through
    eval with via="eval"). A loader that refuses it leaves no file at `path`."""

    def __init__(self, path, via: str = "system"):
        if via not in ("system", "eval"):
            raise ValueError(f"via must be system or eval, got {via!r}")
        self.path, self.via = path, via

    def __reduce__(self):
        command = f"touch {self.path}"
        if self.via == "eval":
            return eval, (f"__import__('os').system({command!r})",)
        return os.system, (command,)
