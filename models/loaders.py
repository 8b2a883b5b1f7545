"""Loaders: checkpoint files in the original MaskFaceGAN formats -> ready networks.

Constructors in this package only build architectures; these functions read files.
Each returns the network in eval mode with gradients off, on the CPU, plus the
file's sha256 (outputs record which weights made them).

    models = load_models(read_spec("weights/models.yaml"), device="cuda")
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from pipeline.store.storage import replaced_atomically
from pipeline.store.uris import redact

from .checkpoints import (CheckpointError, cache_dir, load_strict, local_file, require_mapping,
                          safe_load, sha256_file)
from .classifier import BranchedTiny
from .e4e import E4E_OPTIONS_TYPE, E4EInitializer, Encoder4Editing
from .face_parser import FaceParser
from .judge import Judge, build_judge, strip_data_parallel
from .lpips_masked import TORCHVISION_VGG16_FILE, MaskedLPIPS, lpips_linear_file
from .spec import NETWORKS, REQUIRED, MeanLatent, ModelsSpec, SpecError, WeightRef
from .stylegan2 import Generator, compute_mean_latent

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    module: nn.Module
    sha256: str
    extra: dict


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _open(ref: WeightRef, storage_options) -> tuple[Path, str]:
    path = local_file(ref.uri, ref.sha256, storage_options)
    return path, ref.sha256 or sha256_file(path)


def load_generator(ref: WeightRef, storage_options: Mapping | None = None) -> Loaded:
    """rosinality layout: {'g_ema': state_dict, optional 'latent_avg': [style_dim]}, plus
    'converted_from' (source file, sha256, converter) when `weights convert` wrote it."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    ckpt = require_mapping(safe_load(path, name), name, ["g_ema"])
    sd = require_mapping(ckpt["g_ema"], f"{name} ['g_ema']")
    try:
        config = Generator.config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    g = Generator(**config)
    load_strict(g, sd, name)
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:
        latent_avg = torch.as_tensor(latent_avg).float().reshape(-1)
        if latent_avg.numel() != g.style_dim:
            raise CheckpointError(f"{name}: latent_avg has {latent_avg.numel()} values, "
                                  f"expected {g.style_dim}")
    return Loaded(_freeze(g), sha, {"latent_avg": latent_avg, "config": config,
                                    "converted_from": ckpt.get("converted_from")})


def load_face_parser(ref: WeightRef, working_size: int = 512,
                     storage_options: Mapping | None = None) -> Loaded:
    """The original `state.pt`: DeepLabV3 keys under `model.` plus `loss.weight` (dropped)."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = dict(require_mapping(safe_load(path, name), name))
    if "loss.weight" not in sd:
        raise CheckpointError(f"{name}: no 'loss.weight': not the original face parser "
                              "state.pt layout")
    del sd["loss.weight"]   # the training loss's class weights; not part of the network
    parser = FaceParser(working_size=working_size)
    load_strict(parser, sd, name)
    return Loaded(_freeze(parser), sha, {})


def load_classifier(ref: WeightRef, storage_options: Mapping | None = None) -> Loaded:
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = require_mapping(safe_load(path, name), name)
    try:
        model = BranchedTiny(**BranchedTiny.config_from_state_dict(sd))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    load_strict(model, sd, name)
    return Loaded(_freeze(model), sha, {})


def load_judge(ref: WeightRef, storage_options: Mapping | None = None) -> Loaded:
    """The held-out classifier (models/judge.py): a BranchedTiny or a torchvision
    ResNet-50 state dict, told apart by its keys (`module.` on every key is dropped).
    `extra['format']` says which."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = strip_data_parallel(require_mapping(safe_load(path, name), name))
    try:
        judge = build_judge(sd)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    load_strict(judge.network, sd, name)
    return Loaded(_freeze(judge), sha, {"format": judge.format})


def load_e4e(ref: WeightRef, storage_options: Mapping | None = None) -> Loaded:
    """{'options': argparse.Namespace, 'encoder_state_dict': ..., 'latent_avg': [n_latent, 512]}."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    ckpt = require_mapping(safe_load(path, name, allowed_types=[E4E_OPTIONS_TYPE]), name,
                           ["options", "encoder_state_dict", "latent_avg"])
    size = getattr(ckpt["options"], "stylegan_size", None)
    if not isinstance(size, int):
        raise CheckpointError(f"{name}: options has no integer stylegan_size")
    sd = require_mapping(ckpt["encoder_state_dict"], f"{name} ['encoder_state_dict']")
    try:
        encoder = Encoder4Editing(**Encoder4Editing.config_from_state_dict(sd, size))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    load_strict(encoder, sd, name)
    init = E4EInitializer(encoder)
    avg = ckpt["latent_avg"]
    if not isinstance(avg, torch.Tensor) or avg.shape != init.latent_avg.shape:
        raise CheckpointError(f"{name}: latent_avg must be {list(init.latent_avg.shape)}, got "
                              f"{list(avg.shape) if isinstance(avg, torch.Tensor) else type(avg).__name__}")
    init.latent_avg.copy_(avg)
    return Loaded(_freeze(init), sha, {"stylegan_size": size})


def default_vgg16_path() -> Path:
    """Where torchvision keeps its downloaded VGG16 weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE


def load_lpips(ref: WeightRef | None, storage_options: Mapping | None = None) -> Loaded:
    """VGG16 trunk from `ref` (or torchvision's cache) + the lpips package's v0.1 linear layers.

    Never downloads: a missing trunk is an error naming the file and the fetch command.
    """
    if ref is None:
        path = default_vgg16_path()
        if not path.is_file():
            raise CheckpointError(
                f"LPIPS needs the VGG16 trunk and none is configured: no lpips_trunk in the "
                f"models spec and no {path}. Fetch it with "
                "`maskface weights fetch --only lpips_trunk --dest DIR` and add it to the spec.")
        ref = WeightRef(str(path))
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = require_mapping(safe_load(path, name), name)
    # A full torchvision file also holds the classifier head, which LPIPS does not use.
    trunk = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
    not_features = [k for k in sd if not k.startswith(("features.", "classifier."))]
    if not_features:
        raise CheckpointError(f"{name}: not a torchvision VGG16 state dict: unexpected keys "
                              f"{not_features[:5]}")
    model = MaskedLPIPS()
    load_strict(model.features, trunk, name)
    lin_file = lpips_linear_file()
    lins = require_mapping(safe_load(lin_file), str(lin_file))
    load_strict(model.lins, {k.removeprefix("lin").replace(".model.1", ""): v
                             for k, v in lins.items()}, str(lin_file))
    return Loaded(_freeze(model), sha, {})


def mean_latent(generator: Loaded, options: MeanLatent) -> torch.Tensor:
    """The mean W [style_dim] used as the local-mode start point.

    source 'checkpoint' reads the generator file's own `latent_avg`; 'computed' averages the
    mapping network over `samples` seeded z, cached under (checkpoint sha256, samples, seed).
    """
    if options.source == "checkpoint":
        avg = generator.extra.get("latent_avg")
        if avg is None:
            raise CheckpointError("mean_latent.source is 'checkpoint' but the generator file "
                                  "has no 'latent_avg'; use source: computed")
        return avg.clone()
    path = cache_dir() / "mean_latent" / f"{generator.sha256[:16]}-n{options.samples}-s{options.seed}.pt"
    if path.is_file():
        try:
            cached = safe_load(path)
            if isinstance(cached, torch.Tensor) and cached.shape == (generator.module.style_dim,):
                return cached
        except CheckpointError:
            pass
        log.warning("ignoring unreadable mean-latent cache %s", path)
    log.info("computing the mean latent over %d samples (seed %d)", options.samples, options.seed)
    w = compute_mean_latent(generator.module, options.samples, options.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        torch.save(w, tmp)
    return w


@dataclass
class Models:
    """Every network of one models spec, loaded once (an actor holds one of these)."""
    generator: Generator
    face_parser: FaceParser
    classifier: BranchedTiny
    mean_latent: torch.Tensor
    e4e: E4EInitializer | None
    lpips: MaskedLPIPS | None
    hashes: dict[str, str]
    tiny: bool
    judge: Judge | None = None      # held out: measures edits, never in a loss


def check_spec_names(spec: ModelsSpec, networks: Iterable[str], spec_uri: str = "the models spec") -> None:
    """Fail before anything loads when the spec lacks a network that is needed. The LPIPS
    trunk may instead sit in torchvision's cache on this machine."""
    missing = [n for n in networks if getattr(spec, n) is None
               and not (n == "lpips_trunk" and default_vgg16_path().is_file())]
    if missing:
        names = " and ".join(missing)
        only = " ".join(f"--only {n}" for n in missing)
        raise SpecError(f"{redact(spec_uri)} names no {names}, which these edits need "
                        f"(global edits and e4e_init use e4e; global edits use the LPIPS "
                        f"trunk). Fetch: maskface weights fetch {only} --dest DIR, then add "
                        "the printed entries to the spec.")


def load_models(spec: ModelsSpec, device: str | torch.device = "cpu", parser_size: int = 512,
                networks: Iterable[str] = NETWORKS, storage_options: Mapping | None = None
                ) -> Models:
    """Load exactly `networks` (default: all of NETWORKS;
    pipeline.engine.settings.required_networks gives what a set of edits needs). The
    generator, parser and classifier are always loaded; a requested e4e the spec does not
    name is a SpecError. The judge is optional: loaded when requested and named, else
    `Models.judge` is None."""
    networks = set(networks) | set(REQUIRED)
    unknown = sorted(networks - set(NETWORKS))
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}; known: {', '.join(NETWORKS)}")
    check_spec_names(spec, networks - {"judge"})
    gen = load_generator(spec.generator, storage_options)
    parser = load_face_parser(spec.face_parser, parser_size, storage_options)
    clf = load_classifier(spec.classifier, storage_options)
    hashes = {"generator": gen.sha256, "face_parser": parser.sha256, "classifier": clf.sha256}
    e4e = lpips = None
    if "e4e" in networks and spec.e4e is not None:
        e4e = load_e4e(spec.e4e, storage_options)
        hashes["e4e"] = e4e.sha256
        if e4e.extra["stylegan_size"] != gen.module.size:
            raise CheckpointError(f"{redact(spec.e4e.uri)}: made for a {e4e.extra['stylegan_size']} px "
                                  f"generator, but the generator is {gen.module.size} px")
    if "lpips_trunk" in networks:
        lpips = load_lpips(spec.lpips_trunk, storage_options)
        hashes["lpips_trunk"] = lpips.sha256
    judge = None
    if "judge" in networks and spec.judge is not None:
        judge = load_judge(spec.judge, storage_options)
        hashes["judge"] = judge.sha256
    w = mean_latent(gen, spec.mean_latent)
    device = torch.device(device)
    return Models(generator=gen.module.to(device), face_parser=parser.module.to(device),
                  classifier=clf.module.to(device), mean_latent=w.to(device),
                  e4e=e4e.module.to(device) if e4e else None,
                  lpips=lpips.module.to(device) if lpips else None, hashes=hashes,
                  tiny=spec.tiny, judge=judge.module.to(device) if judge else None)
