"""Loaders: checkpoint files in the original MaskFaceGAN formats -> ready networks.

Constructors in this package only build architectures; these functions read files.
Each returns the network in eval mode with gradients off, on the CPU, plus the
file's sha256 (outputs record which weights made them).

    models = load_models(read_spec("weights/models.yaml"), device="cuda")

With `check_only=True` a loader runs every check it makes on a file, in the same code,
but loads the file's tensors as shapes (`safe_load(..., shapes_only=True)`: the meta
device, each tensor's bytes checked to be in the file, none read) and builds the
network on the meta device (no memory, no random init, no weights copied). That is what
`models/check.py`'s `preflight` runs before a job starts: it refuses exactly what the
loaders would refuse.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch
from torch import nn

from pipeline.store.storage import replaced_atomically
from pipeline.store.uris import redact

from .checkpoints import (CheckpointError, cache_dir, check_fits, local_file, require_mapping,
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
    module: nn.Module           # on the meta device when loaded with check_only
    sha256: str
    extra: dict
    file: str = ""              # the checkpoint's URI, redacted (for logs)


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _building(check_only: bool) -> ContextManager:
    """Where a network is built: on the meta device for a check (a 1024 px generator's
    or DeepLabV3's random init would cost a second and its memory, for shapes only)."""
    return torch.device("meta") if check_only else contextlib.nullcontext()


def _fill(module: nn.Module, state_dict: Mapping, name: str, check_only: bool) -> None:
    """The state dict's keys and shapes checked against the module's; loaded into it
    unless only checking."""
    check_fits(module, state_dict, name)
    if not check_only:
        module.load_state_dict(state_dict, strict=True)


def _open(ref: WeightRef, storage_options) -> tuple[Path, str]:
    path = local_file(ref.uri, ref.sha256, storage_options)
    return path, ref.sha256 or sha256_file(path)


def load_generator(ref: WeightRef, storage_options: Mapping | None = None, *,
                   check_only: bool = False) -> Loaded:
    """rosinality layout: {'g_ema': state_dict, optional 'latent_avg': [style_dim]}, plus
    'converted_from' (source file, sha256, converter) when `weights convert` wrote it."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    ckpt = require_mapping(safe_load(path, name, shapes_only=check_only), name, ["g_ema"])
    sd = require_mapping(ckpt["g_ema"], f"{name} ['g_ema']")
    try:
        config = Generator.config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    with _building(check_only):
        g = Generator(**config)
    _fill(g, sd, name, check_only)
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is not None:
        latent_avg = torch.as_tensor(latent_avg).float().reshape(-1)
        if latent_avg.numel() != g.style_dim:
            raise CheckpointError(f"{name}: latent_avg has {latent_avg.numel()} values, "
                                  f"expected {g.style_dim}")
    return Loaded(_freeze(g), sha, {"latent_avg": latent_avg, "config": config,
                                    "converted_from": ckpt.get("converted_from")}, name)


def load_face_parser(ref: WeightRef, working_size: int = 512,
                     storage_options: Mapping | None = None, *, check_only: bool = False
                     ) -> Loaded:
    """The original `state.pt`: DeepLabV3 keys under `model.` plus `loss.weight` (dropped)."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = dict(require_mapping(safe_load(path, name, shapes_only=check_only), name))
    if "loss.weight" not in sd:
        raise CheckpointError(f"{name}: no 'loss.weight': not the original face parser "
                              "state.pt layout")
    del sd["loss.weight"]   # the training loss's class weights; not part of the network
    with _building(check_only):
        parser = FaceParser(working_size=working_size)
    _fill(parser, sd, name, check_only)
    return Loaded(_freeze(parser), sha, {}, name)


def load_classifier(ref: WeightRef, storage_options: Mapping | None = None, *,
                    check_only: bool = False) -> Loaded:
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = require_mapping(safe_load(path, name, shapes_only=check_only), name)
    try:
        with _building(check_only):
            model = BranchedTiny(**BranchedTiny.config_from_state_dict(sd))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _fill(model, sd, name, check_only)
    return Loaded(_freeze(model), sha, {}, name)


def load_judge(ref: WeightRef, storage_options: Mapping | None = None, *,
               check_only: bool = False) -> Loaded:
    """The held-out classifier (models/judge.py): a BranchedTiny or a torchvision
    ResNet-50 state dict, told apart by its keys (`module.` on every key is dropped).
    `extra['format']` says which."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    sd = strip_data_parallel(require_mapping(safe_load(path, name, shapes_only=check_only), name))
    try:
        with _building(check_only):
            judge = build_judge(sd)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _fill(judge.network, sd, name, check_only)
    return Loaded(_freeze(judge), sha, {"format": judge.format}, name)


def load_e4e(ref: WeightRef, storage_options: Mapping | None = None, *,
             check_only: bool = False) -> Loaded:
    """{'options': argparse.Namespace, 'encoder_state_dict': ..., 'latent_avg': [n_latent, 512]}."""
    path, sha = _open(ref, storage_options)
    name = redact(ref.uri)
    ckpt = require_mapping(safe_load(path, name, allowed_types=[E4E_OPTIONS_TYPE],
                                     shapes_only=check_only), name,
                           ["options", "encoder_state_dict", "latent_avg"])
    size = getattr(ckpt["options"], "stylegan_size", None)
    if not isinstance(size, int):
        raise CheckpointError(f"{name}: options has no integer stylegan_size")
    sd = require_mapping(ckpt["encoder_state_dict"], f"{name} ['encoder_state_dict']")
    try:
        with _building(check_only):
            encoder = Encoder4Editing(**Encoder4Editing.config_from_state_dict(sd, size))
            init = E4EInitializer(encoder)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _fill(encoder, sd, name, check_only)
    avg = ckpt["latent_avg"]
    if not isinstance(avg, torch.Tensor) or avg.shape != init.latent_avg.shape:
        raise CheckpointError(f"{name}: latent_avg must be {list(init.latent_avg.shape)}, got "
                              f"{list(avg.shape) if isinstance(avg, torch.Tensor) else type(avg).__name__}")
    if not check_only:
        init.latent_avg.copy_(avg)
    return Loaded(_freeze(init), sha, {"stylegan_size": size}, name)


def default_vgg16_path() -> Path:
    """Where torchvision keeps its downloaded VGG16 weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE


def load_lpips(ref: WeightRef | None, storage_options: Mapping | None = None, *,
               check_only: bool = False) -> Loaded:
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
    sd = require_mapping(safe_load(path, name, shapes_only=check_only), name)
    # A full torchvision file also holds the classifier head, which LPIPS does not use.
    trunk = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}
    not_features = [k for k in sd if not k.startswith(("features.", "classifier."))]
    if not_features:
        raise CheckpointError(f"{name}: not a torchvision VGG16 state dict: unexpected keys "
                              f"{not_features[:5]}")
    with _building(check_only):
        model = MaskedLPIPS()
    _fill(model.features, trunk, name, check_only)
    lin_file = lpips_linear_file()
    lins = require_mapping(safe_load(lin_file, shapes_only=check_only), str(lin_file))
    _fill(model.lins, {k.removeprefix("lin").replace(".model.1", ""): v
                       for k, v in lins.items()}, str(lin_file), check_only)
    return Loaded(_freeze(model), sha, {}, name)


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


def network_loads(spec: ModelsSpec, networks: Iterable[str] = NETWORKS,
                  storage_options: Mapping | None = None, parser_size: int = 512,
                  check_only: bool = False) -> dict[str, Callable[[], Loaded]]:
    """Each network `networks` asks of `spec`, as the call that loads it, in loading
    order: the one list that `load_models` and the preflight (`check_only`) both follow,
    so a preflight checks exactly the files a job's actors will load. The generator,
    parser and classifier are always there; an unknown name is a ValueError, a needed
    network the spec lacks a SpecError; the judge is there only when requested and named."""
    wanted = set(networks) | set(REQUIRED)
    unknown = sorted(wanted - set(NETWORKS))
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}; known: {', '.join(NETWORKS)}")
    check_spec_names(spec, wanted - {"judge"})
    so, only = storage_options, check_only
    loads: dict[str, Callable[[], Loaded]] = {
        "generator": lambda: load_generator(spec.generator, so, check_only=only),
        "face_parser": lambda: load_face_parser(spec.face_parser, parser_size, so,
                                                check_only=only),
        "classifier": lambda: load_classifier(spec.classifier, so, check_only=only)}
    if "e4e" in wanted and (e4e := spec.e4e) is not None:
        loads["e4e"] = lambda: load_e4e(e4e, so, check_only=only)
    if "lpips_trunk" in wanted:
        loads["lpips_trunk"] = lambda: load_lpips(spec.lpips_trunk, so, check_only=only)
    if "judge" in wanted and (judge := spec.judge) is not None:
        loads["judge"] = lambda: load_judge(judge, so, check_only=only)
    return loads


def check_together(spec: ModelsSpec, loaded: Mapping[str, Loaded]) -> None:
    """What no file shows alone, checked once the files it needs are loaded: e4e made
    for the generator's size; a `latent_avg` in the generator file when the spec's mean
    latent comes from it."""
    gen, e4e = loaded.get("generator"), loaded.get("e4e")
    if gen is not None and spec.mean_latent.source == "checkpoint" \
            and gen.extra.get("latent_avg") is None:
        raise CheckpointError(f"{gen.file}: no 'latent_avg', which mean_latent.source: "
                              "checkpoint reads; use source: computed")
    if gen is not None and e4e is not None and e4e.extra["stylegan_size"] != gen.module.size:
        raise CheckpointError(f"{e4e.file}: made for a {e4e.extra['stylegan_size']} px "
                              f"generator, but the generator is {gen.module.size} px")


def load_models(spec: ModelsSpec, device: str | torch.device = "cpu", parser_size: int = 512,
                networks: Iterable[str] = NETWORKS, storage_options: Mapping | None = None
                ) -> Models:
    """Load exactly `networks` (default: all of NETWORKS;
    pipeline.engine.settings.required_networks gives what a set of edits needs), as
    `network_loads` lists them. `Models.e4e`, `.lpips` and `.judge` are None when not
    loaded."""
    loaded: dict[str, Loaded] = {}
    for name, load in network_loads(spec, networks, storage_options, parser_size).items():
        loaded[name] = load()
        check_together(spec, loaded)
    w = mean_latent(loaded["generator"], spec.mean_latent)
    device = torch.device(device)

    def on_device(name: str) -> Any:      # each network's own type
        return loaded[name].module.to(device) if name in loaded else None

    return Models(generator=on_device("generator"), face_parser=on_device("face_parser"),
                  classifier=on_device("classifier"), mean_latent=w.to(device),
                  e4e=on_device("e4e"), lpips=on_device("lpips_trunk"),
                  hashes={name: one.sha256 for name, one in loaded.items()},
                  tiny=spec.tiny, judge=on_device("judge"))
