"""`maskface weights check`: load every network a models spec names and run one forward;
and a job's preflight: every checkpoint file the job needs checked before any actor starts.

    results = list(check_networks(read_spec("weights/models.yaml")))
    failed = [r.name for r in results if r.error]      # r.line(): one line for a terminal

    hashes = preflight(plan.models_spec, plan.networks, job.storage_options)

The generator runs first, from the mean latent; the other networks run on its image, so
a spec whose networks load but do not fit together (a parser of another size, say)
fails here, not in a job.

`preflight` exists because a bad file found by the actors is found late and badly: each
actor dies in its constructor, Ray takes that for lost workers and retries for minutes,
and the file's one clear line ends up inside a dozen tracebacks. The preflight runs the
loaders' own checks (`check_only`: tensors and networks as shapes on the meta device),
so in seconds and in little memory it refuses exactly the files the actors would refuse,
with that one line; remote files land in the node cache the actors then reuse.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch

from pipeline.store.uris import redact

from .checkpoints import CheckpointError
from .loaders import (Loaded, check_together, load_classifier, load_e4e, load_face_parser,
                      load_generator, load_judge, load_lpips, mean_latent, network_loads)
from .spec import ModelsSpec, SpecError

log = logging.getLogger(__name__)


@dataclass
class NetworkCheck:
    name: str
    error: str | None = None          # why it failed; None: it loaded and ran
    sha256: str = ""
    parameters: int = 0
    out_shape: tuple[int, ...] = ()
    note: str = ""                    # the mean latent, the converter, an LPIPS distance
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        if not self.ok:
            return f"{self.name:12s} FAILED  {self.error}"
        return (f"{self.name:12s} ok  sha256 {self.sha256[:16]}  params {self.parameters:,}  "
                f"out {list(self.out_shape)}{self.note}  ({self.seconds:.1f} s)")


Forward = Callable[[], "tuple[Loaded, tuple[int, ...], str]"]


def _run(name: str, forward: Forward) -> NetworkCheck:
    start = time.perf_counter()
    try:
        loaded, shape, note = forward()
    except (CheckpointError, SpecError, ValueError, RuntimeError) as e:
        return NetworkCheck(name, error=str(e))
    return NetworkCheck(name, sha256=loaded.sha256,
                        parameters=sum(p.numel() for p in loaded.module.parameters()),
                        out_shape=tuple(shape), note=note,
                        seconds=time.perf_counter() - start)


def _generator_note(g: Loaded, spec: ModelsSpec, w: torch.Tensor) -> str:
    made = g.extra.get("converted_from")
    origin = (f"  converted from {made.get('file')} (sha256 {str(made.get('sha256'))[:16]}) "
              f"by {made.get('converter')}" if isinstance(made, dict) else "")
    return f"  mean latent ({spec.mean_latent.source}) norm {w.norm():.3f}{origin}"


def check_networks(spec: ModelsSpec, parser_size: int = 512) -> Iterator[NetworkCheck]:
    """Each network of `spec`, loaded strictly and run once, in order (e4e and the judge
    only when the spec names them)."""
    image: list[torch.Tensor] = []

    def generator():
        g = load_generator(spec.generator)
        w = mean_latent(g, spec.mean_latent)
        gm = g.module
        with torch.no_grad():
            image.append(gm(w.view(1, 1, -1).repeat(1, gm.n_latent, 1), gm.make_noise(1)))
        return g, image[0].shape, _generator_note(g, spec, w)

    def on_image(load: Callable[[], Loaded]) -> Forward:
        def forward():
            if not image:
                raise RuntimeError("needs the generator's image, which failed")
            net = load()
            with torch.no_grad():
                return net, net.module(image[0]).shape, ""
        return forward

    def lpips():
        if not image:
            raise RuntimeError("needs the generator's image, which failed")
        m = load_lpips(spec.lpips_trunk)
        with torch.no_grad():
            d = m.module(image[0], image[0].flip(-1), torch.ones_like(image[0][:, :1]))
        return m, d.shape, f"  lpips(image, mirrored) {d.item():.4f}"

    def judge():
        net, shape, _ = on_image(lambda: load_judge(spec.judge))()
        return net, shape, f"  format {net.extra['format']}"

    yield _run("generator", generator)
    yield _run("face_parser", on_image(lambda: load_face_parser(spec.face_parser,
                                                                working_size=parser_size)))
    yield _run("classifier", on_image(lambda: load_classifier(spec.classifier)))
    if spec.e4e is not None:
        yield _run("e4e", on_image(lambda: load_e4e(spec.e4e)))
    yield _run("lpips", lpips)
    if spec.judge is not None:
        yield _run("judge", judge)


def preflight(models_spec: ModelsSpec, networks: Iterable[str],
              storage_options: Mapping | None = None) -> dict[str, str]:
    """Check every checkpoint file that loading `networks` of `models_spec` reads (the
    list `load_models` follows: the generator, parser and classifier always, the judge
    when named), in the actors' order: present, readable, safe under
    `weights_only=True`, in its format, with exactly its network's keys and shapes, and
    its sha256 the spec's where the spec pins one. Returns each network's file sha256.

    Raises CheckpointError (a SetupError) at the first bad file: one line naming it and
    the reason; SpecError when the spec names no file for a needed network; ValueError
    for an unknown network name. Nothing in a file is executed, and no weights are
    read into memory (except from files in PyTorch's legacy format, read as the
    loaders read them). Remote files are copied into the node cache, where actors on this node
    find them. One log line per network, with its time."""
    loaded: dict[str, Loaded] = {}
    for name, load in network_loads(models_spec, networks, storage_options,
                                    check_only=True).items():
        start = time.perf_counter()
        loaded[name] = _refusing(name, load, models_spec)
        check_together(models_spec, loaded)
        log.info("checkpoint ok: %s %s (sha256 %s, %.2f s)", name, loaded[name].file,
                 loaded[name].sha256[:16], time.perf_counter() - start)
    return {name: one.sha256 for name, one in loaded.items()}


def _refusing(name: str, load: Callable[[], Loaded], spec: ModelsSpec) -> Loaded:
    """`load()`, with any failure the loaders do not name (a library's own exception on
    a crafted file) turned into a CheckpointError naming the file: the actors would die
    of it all the same, and the job must get one line, not a traceback."""
    try:
        return load()
    except (CheckpointError, SpecError):
        raise
    except Exception as e:
        ref = getattr(spec, name)
        file = redact(ref.uri) if ref is not None else "the default LPIPS trunk"
        raise CheckpointError(f"{file}: cannot be loaded as the {name}: "
                              f"{type(e).__name__}: {redact(str(e))}") from None
