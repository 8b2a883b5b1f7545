"""How the engine runs, as opposed to what it computes: memory format, compilation,
precision, and how often the loop reads the device.

Every option here changes only float rounding, and each is off by default unless the
measured figures (docs/speed.md) say it wins and the numbers stay within their tolerance:

    channels_last  NHWC convolutions (oneDNN on CPU, cuDNN tensor cores on GPU)
    compile        torch.compile (inductor) the generator, parser, classifier and LPIPS:
                   minutes of warm-up per process for the first batch size, batch 1 and
                   one dynamic-batch graph that serves every other size, then faster
                   steps; a failed compile falls back to eager with a warning. "auto"
                   (the default) compiles on CPUs for generators of 256 px and more,
                   where the measured figures show it winning, when a C++ compiler is
                   found; tiny test-size networks and GPUs (not measured yet) run eager
    autocast       "bf16": the networks run under bfloat16 autocast while the latent,
                   the noise maps and Adam's state stay float32 (opt-in: measured
                   deviation in docs/speed.md)
    tf32           CUDA only: TF32 matmuls and convolutions (opt-in); without it both run
                   in IEEE float32 (set explicitly: cuDNN's convolutions default to TF32)
    ops            StyleGAN2's upfirdn2d and bias + leaky ReLU: "auto" (our CUDA kernels
                   for CUDA tensors when they build and pass their check, else the PyTorch
                   reference), "ref" or "cuda" (models/ops.py)
    check_every    read the per-image health record from the device every N steps (0:
                   only at log steps and at the end; 1 is the plain path: a sync per step)
    reuse_memory   CPU on glibc (on by default, bit-identical): freed activations stay in
                   the process heap and are reused, instead of being unmapped and
                   page-faulted in again at every step (`reuse_freed_memory`)

Some of these are process-wide in torch (the default op implementation, TF32, dynamo's
settings) or in the C library (glibc's malloc thresholds). `Runtime.apply(device)` sets
them, once, where a process or an actor starts (the job's actor, `maskface edit`, the
bench); building an `Editor` changes nothing outside it.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import logging
import platform
import sys
from dataclasses import dataclass, field

import torch

from models.loaders import Models
from models.ops import IMPLS, set_default_impl

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_FROM = 256          # px: compile "auto" compiles generators at least this large
RECOMPILE_LIMIT = 64        # graphs per compiled function before dynamo falls back to eager


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Runtime:
    """How the engine runs (the module doc says what each option does)."""
    channels_last: bool = _option(False, "NHWC convolutions")
    compile: bool | str = _option("auto", "torch.compile the networks: true, false, or auto "
                                          "(CPU generators of 256 px and more, with a C++ "
                                          "compiler)")
    autocast: str | None = _option(None, "`bf16`: the networks in bfloat16, the latent, noise "
                                         "maps and Adam in float32 (opt-in)")
    tf32: bool = _option(False, "CUDA: TF32 matmuls and convolutions (opt-in)")
    ops: str = _option("auto", "upfirdn2d and bias + leaky ReLU: `auto` (our CUDA kernels for "
                               "CUDA tensors when they build), `ref` or `cuda`")
    check_every: int = _option(0, "read the per-image health record every N steps (0: at log "
                                  "steps and at the end)")
    reuse_memory: bool = _option(True, "CPU on glibc: keep freed activations in the heap "
                                       "(bit-identical; the process keeps its peak memory)")

    def __post_init__(self):
        for name in ("channels_last", "tf32", "reuse_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f"compile must be true, false or auto, got {self.compile!r}")
        if not isinstance(self.check_every, int) or isinstance(self.check_every, bool):
            raise ValueError(f"check_every must be an integer, got {self.check_every!r}")
        if self.autocast not in (None, *AUTOCAST):
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)} or unset, "
                             f"got {self.autocast!r}")
        if self.ops not in IMPLS:
            raise ValueError(f"ops must be one of {', '.join(IMPLS)}, got {self.ops!r}")
        if self.check_every < 0:
            raise ValueError(f"check_every must be >= 0, got {self.check_every}")

    @classmethod
    def plain(cls) -> "Runtime":
        """The path the engine started from: eager, NCHW, float32, the PyTorch reference
        ops, a device read per step, glibc's default memory handling."""
        return cls(compile=False, ops="ref", check_every=1, reuse_memory=False)

    def compiles(self, models: Models) -> bool:
        """Whether `prepare` compiles these networks: `compile` itself, or for "auto" a
        CPU, a generator of at least COMPILE_FROM px and a C++ compiler for inductor.
        There, minutes of warm-up are bought back within the first edit (about 1.5x per
        edit at 256 px and 1.7x at 1024 on our CPU). GPUs stay eager under "auto" until
        a GPU bench has measured compile against eager there (`maskface bench --device
        cuda --compile` and `--no-compile`)."""
        if isinstance(self.compile, bool):
            return self.compile
        device, size = models.generator.input.input.device, models.generator.size
        if device.type != "cpu":
            why = "not measured on GPUs yet"
        elif size < COMPILE_FROM:
            why = f"{size} px is below {COMPILE_FROM} px"
        elif not _has_cpp_compiler():
            why = "no C++ compiler for inductor"
        else:
            why = None
        log.info("compile: auto -> %s", "on" if why is None else f"off: {why}")
        return why is None

    def apply(self, device: torch.device) -> list[str]:
        """Set this runtime's process-wide settings for work on `device`: the default op
        implementation, on CUDA the float32 precision of matmuls and convolutions (IEEE, or
        TF32 with `tf32`: both set, both ways, since cuDNN's convolutions default to TF32
        in PyTorch), dynamo's settings when compiling may happen, and
        glibc's memory handling on a CPU. Call it where a process or actor starts, before
        its first edit. Returns what cannot be undone within this process: once glibc's
        thresholds are set (reuse_memory on a CPU), its own adaptive ones never come back
        (`reuse_freed_memory`)."""
        set_default_impl(self.ops)
        if device.type == "cuda":
            set_fp32_precision("tf32" if self.tf32 else "ieee")
        if self.compile is not False:
            # a compile that fails (no C++ compiler on a CPU node, an inductor bug) runs
            # that code eagerly with a logged warning, instead of failing every row
            import torch._dynamo
            torch._dynamo.config.suppress_errors = True
            # one network is several graphs (with and without grad, the noise phase, batch
            # 1, the first batch size, then a dynamic batch): dynamo's default of 8 per
            # function ran the generator eagerly after the third batch size of a job
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       RECOMPILE_LIMIT)
        permanent = []
        if device.type == "cpu" and reuse_freed_memory(self.reuse_memory) and _reusing:
            permanent.append("reuse_memory: glibc's malloc thresholds stay fixed until the "
                             "process exits")
        log.info("runtime applied for %s%s", device.type,
                 "".join(f"; {p}" for p in permanent))
        return permanent

    def prepare(self, models: Models) -> Models:
        """The networks in this runtime's memory format, compiled if asked: no process-wide
        state changes here (`apply` does that). Modules are shared with `models`, except
        that channels_last works on a copy (the caller's networks keep their layout)."""
        compiles = self.compiles(models)
        nets = {name: getattr(models, name) for name in
                ("generator", "face_parser", "classifier", "e4e", "lpips", "judge")}
        for name, net in nets.items():
            if net is None:
                continue
            if self.channels_last:
                net = _to_channels_last(copy.deepcopy(net))
            if compiles and name in ("generator", "face_parser", "classifier", "lpips"):
                # (not e4e or the judge: each runs once or twice per batch)
                # dynamic=None: the first batch size compiles static, a second one makes
                # the batch dimension dynamic, so a shrinking batch does not recompile
                net = torch.compile(net, dynamic=None)
            nets[name] = net
        return dataclasses.replace(models, **nets)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast_context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AUTOCAST[self.autocast])


def set_fp32_precision(mode: str) -> None:
    """float32 matmuls and cuDNN convolutions in `mode`: "ieee" (true float32) or "tf32".
    PyTorch >= 2.9 has one setting per backend op (`fp32_precision`); before it, the
    `allow_tf32` flags (mixing the two APIs raises in torch, so only one is used)."""
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"fp32 precision must be ieee or tf32, got {mode!r}")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        conv.fp32_precision = mode                                # type: ignore[union-attr]
    else:
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def fp32_precision() -> dict[str, str]:
    """The float32 precision in effect on CUDA for matmuls and cuDNN convolutions: "ieee"
    or "tf32" (what the bench records beside its figures)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul, convs = torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision  # type: ignore[union-attr]
        if matmul == "none":            # not set: torch's global float32 matmul precision
            matmul = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        if convs == "none":             # not set: cuDNN's default, TF32
            convs = "tf32"
        return {"matmul": matmul, "conv": convs}
    return {"matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return True
    except Exception:
        return False


def _to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """4-d weights and buffers to NHWC (StyleGAN2's 5-d modulated weights stay as they are)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.ndim == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_reusing = False


def reuse_freed_memory(on: bool) -> bool:
    """Process-wide, Linux with glibc: keep freed memory in the heap for reuse (`on`), or
    not. Returns False where it does not apply (other platforms).

    By default glibc serves every block above its mmap threshold (32 MB at most) with a
    fresh mmap and unmaps it when freed. A StyleGAN2 step at 1024 px allocates dozens of
    such activations ([1, 32, 1024, 1024] is 134 MB), so every step page-faults them in
    again: a multiply into a fresh tensor of that shape took 42 ms on this CPU, 6.5 ms into
    an existing one. With mmap off and trimming off, freed blocks are reused: the same
    arithmetic, the 1024 px generator's forward and backward about 3x faster on 2 cores
    (0 page faults per step once warm, against ~3.3 million), the batch-4 penalty gone.
    The cost: the process keeps its peak memory until it exits (+40% max RSS at 1024 px,
    from fragmentation).

    Turning it off after it was on cannot give back glibc's own adaptive thresholds (any
    mallopt call freezes them), so it sets the values they settle at: mmap above 32 MB,
    trim above 64 MB. Off when it was never on changes nothing.
    """
    global _reusing
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if on == _reusing:
        return True
    libc = ctypes.CDLL("libc.so.6")
    if on:
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never
    else:
        ok = (libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
              and libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20))
        libc.malloc_trim(0)
    _reusing = on
    return bool(ok)
