"""NVIDIA's official StyleGAN2 TensorFlow pickle -> our generator checkpoint, without TensorFlow.

NVIDIA publishes `stylegan2-ffhq-config-f.pkl` as `pickle.dump((G, D, Gs))` of
`dnnlib.tflib.network.Network` objects. Each network pickles a state dict: its name,
build function name and source code, static kwargs, sub-networks (`components`) and its
own variables as (name, numpy array) pairs. Unpickling it the usual way execs the
recorded source and builds a TF graph. We never do either: a restricted unpickler
resolves exactly the globals such a file needs (numpy's array and scalar rebuilders,
numpy's dtype, and `Network`, which becomes `RecordedNetwork`: a class that only keeps
the state). Any other global is refused before anything is called. Even the numpy names
resolve to our own records, which check every field and build arrays from exactly-sized
bytes, and the file may set state (BUILD) on nothing but those records.

Layout facts, TensorFlow (G_ema = Gs) -> rosinality `g_ema` (ours):

  G_mapping/Dense{i}/weight [in, out]  -> style.{i+1}.weight [out, in] (transposed)
  G_mapping/Dense{i}/bias              -> style.{i+1}.bias
      Both frameworks store weight = N(0,1)/lrmul and scale at run time by
      lrmul/sqrt(in) (bias by lrmul), so the values carry over when the file's
      `mapping_lrmul` is ours (0.01); another multiplier is folded into the values.
  .../Conv*/weight [kh, kw, in, out]   -> conv.weight [1, out, in, kh, kw]
      The up-sampling `Conv0_up` kernel is also flipped in both spatial axes: TF's
      upsample_conv_2d calls conv2d_transpose on the flipped kernel, ours calls
      conv_transpose2d on the stored one.
  .../mod_weight [style, in]           -> conv.modulation.weight [in, style]
  .../mod_bias [in]                    -> conv.modulation.bias = mod_bias + 1
      (TF adds 1 after the bias; ours initialises the bias at 1 instead)
  .../noise_strength []                -> noise.weight [1]
  .../Conv*/bias                       -> activate.bias
  .../ToRGB/bias [3]                   -> bias [1, 3, 1, 1]
  4x4/Const/const [1, C, 4, 4]         -> input.input
  noise{i} [1, 1, r, r]                -> noises.noise_{i}
  Gs dlatent_avg [style]               -> latent_avg (the mean latent, from the file)

Blur kernels are fixed [1, 3, 3, 1] taps, not variables; they come from our module.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.store.storage import replaced_atomically
from pipeline.store.uris import redact

from .checkpoints import CheckpointError, load_strict, local_file, sha256_file
from .stylegan2 import Generator

log = logging.getLogger(__name__)

CONVERTER_VERSION = "maskface nvidia-pickle converter 1"
LR_MLP = 0.01            # our Generator's mapping lr multiplier (rosinality's default)
SYNTHESIS_FUNC = "G_synthesis_stylegan2"
MAPPING_FUNC = "G_mapping"


class PickleError(CheckpointError):
    """The file is not a readable NVIDIA StyleGAN2 pickle, or asks for something unsafe."""


class RecordedNetwork:
    """Stand-in for `dnnlib.tflib.network.Network`: keeps the pickled state, runs nothing.

    The recorded build source (`build_module_src`) is dropped unread.
    """

    def __setstate__(self, state):
        if not isinstance(state, dict) or not {"name", "variables"} <= set(state):
            raise PickleError("a Network whose state has no name or variables")
        self.name = str(state["name"])
        self.version = state.get("version")
        self.build_func_name = state.get("build_func_name")
        self.static_kwargs = dict(state.get("static_kwargs") or {})
        self.components = dict(state.get("components") or {})
        self.variables = {}
        for item in state["variables"]:
            name, value = item
            if isinstance(value, ArrayRecord):
                value = value.array
            if not isinstance(value, (np.ndarray, np.generic)):
                raise PickleError(f"variable {name!r} of network {self.name!r} is not a numeric "
                                  f"array (got {type(value).__name__})")
            self.variables[str(name)] = np.asarray(value)

    def __repr__(self):
        return f"RecordedNetwork({self.name!r}, {len(self.variables)} variables)"


# numpy's own __setstate__ never sees the file's data: the pickle's numpy globals build
# these records, which check every field and then make arrays from exactly-sized bytes.
# (dtype.__setstate__ accepts internal flags that make numpy read memory it should not.)

NUMERIC_KINDS = "fiub"
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)    # subarray, names, fields, elsize, align, flags


class DtypeRecord:
    """`numpy.dtype(spec, align, copy)` plus its BUILD state, checked to be a plain number."""

    def __init__(self, spec, align=False, copy=True):
        if not isinstance(spec, str):
            raise PickleError(f"a dtype given as {type(spec).__name__}")
        try:
            dtype = np.dtype(spec)
        except TypeError:
            raise PickleError(f"an unknown dtype {spec!r}") from None
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
            raise PickleError(f"a non-numeric dtype {spec!r}")
        self.dtype = dtype

    def __setstate__(self, state):
        ok = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
              and state[1] in ("<", ">", "|", "=") and tuple(state[2:8]) == _PLAIN_DTYPE_STATE
              and (len(state) == 8 or state[8] is None))
        if not ok:
            raise PickleError(f"a dtype with unexpected state {state!r:.120}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _raw_bytes(data) -> bytes:
    if isinstance(data, str):           # a Python 2 pickle read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise PickleError(f"array data of type {type(data).__name__} (only raw numbers allowed)")
    return bytes(data)


def _native(values: np.ndarray) -> np.ndarray:
    return values.astype(values.dtype.newbyteorder("="))     # a copy, owned and writable


class ArrayRecord:
    """`numpy.core.multiarray._reconstruct(ndarray, ...)` plus its BUILD state."""
    array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], DtypeRecord)):
            raise PickleError("an array with unexpected state")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise PickleError(f"an array with shape {shape!r:.80}")
        raw, dtype = _raw_bytes(data), dtype.dtype
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise PickleError(f"an array of shape {list(shape)} {dtype} whose data has "
                              f"{len(raw)} bytes")
        values = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
        self.array = _native(values)


class _NdarrayMarker:
    """What `numpy.ndarray` resolves to: accepted by `_reconstruct`, never callable."""

    def __call__(self, *args):
        raise PickleError("refused: the file calls numpy.ndarray directly")


_NDARRAY = _NdarrayMarker()


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise PickleError("refused: an array of a type other than numpy.ndarray")
    return ArrayRecord()


def _scalar(dtype, data):
    if not isinstance(dtype, DtypeRecord):
        raise PickleError("refused: a numpy scalar without a plain dtype")
    raw = _raw_bytes(data)
    if len(raw) != dtype.dtype.itemsize:
        raise PickleError(f"a {dtype.dtype} scalar with {len(raw)} bytes")
    return _native(np.frombuffer(raw, dtype.dtype))[0]


def _latin1_encode(text, encoding="utf-8"):
    """`_codecs.encode`, which protocol 2 uses to write bytes: only str -> latin-1."""
    if not isinstance(text, str) or encoding != "latin1":
        raise PickleError(f"refused: _codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): DtypeRecord,
            ("dnnlib.tflib.network", "Network"): RecordedNetwork,
            ("_codecs", "encode"): _latin1_encode}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):   # numpy 1.x and 2.x names
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _scalar
_BUILDABLE = (RecordedNetwork, DtypeRecord, ArrayRecord)


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD (setting state) can be limited to our records:
    a file cannot set attributes on anything else, the allowed globals included."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            hint = (" (a StyleGAN2-ADA/StyleGAN3 PyTorch pickle: not supported)"
                    if module.startswith("torch_utils") else "")
            raise PickleError(f"refused: the file asks for the global {module}.{name}{hint}, "
                              "which an NVIDIA StyleGAN2 pickle never needs; nothing in the "
                              "file was run")
        return found

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, _BUILDABLE):
            raise PickleError(f"refused: the file sets the state of a {type(target).__name__}")
        super().load_build()
    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        raise PickleError("refused: the file uses persistent ids (a PyTorch checkpoint?); "
                          "an NVIDIA StyleGAN2 pickle has none")


def read_network_pickle(path: str | os.PathLike, name: str | None = None) -> RecordedNetwork:
    """The G_ema network (`Gs`) of an NVIDIA StyleGAN2 pickle, as recorded state."""
    name = redact(name or str(path))
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        try:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
        except PickleError as e:
            raise PickleError(f"{name}: {e}") from None
        except Exception as e:   # truncated, corrupt, or not a pickle at all
            what = " (it is a ZIP archive: a PyTorch checkpoint?)" if head.startswith(b"PK") else ""
            raise PickleError(f"{name}: not a readable pickle{what}: truncated or corrupt? "
                              f"{type(e).__name__}: {e}") from None
    if (isinstance(obj, tuple) and len(obj) == 3
            and all(isinstance(n, RecordedNetwork) for n in obj)):
        return obj[2]                         # (G, D, Gs): Gs is the EMA generator
    if isinstance(obj, RecordedNetwork):
        return obj
    shape = (f"a {len(obj)}-tuple" if isinstance(obj, tuple) else f"a {type(obj).__name__}")
    raise PickleError(f"{name}: not an NVIDIA StyleGAN2 network pickle: it holds {shape}, "
                      "expected the tuple (G, D, Gs) of networks")


class _Variables:
    """One network's variables, handed out once each so that leftovers can be reported."""

    def __init__(self, network: RecordedNetwork, where: str):
        self.values, self.where, self.used = network.variables, where, set()

    def take(self, name: str, ndim: int) -> np.ndarray:
        if name not in self.values:
            raise PickleError(f"{self.where} has no variable {name!r}")
        value = self.values[name].astype(np.float32)
        if value.ndim != ndim:
            raise PickleError(f"{self.where}/{name} has shape {list(value.shape)}; "
                              f"expected {ndim} dimensions")
        self.used.add(name)
        return value

    def unused(self) -> list[str]:
        return [f"{self.where}/{n}" for n in self.values if n not in self.used]


def _component(gs: RecordedNetwork, key: str, func: str) -> RecordedNetwork:
    net = gs.components.get(key)
    if not isinstance(net, RecordedNetwork):
        raise PickleError(f"network {gs.name!r} has no {key} sub-network; found "
                          f"{sorted(gs.components)}: not a StyleGAN2 generator")
    if net.build_func_name != func:
        raise PickleError(f"the {key} network is built by {net.build_func_name!r}, not {func!r}: "
                          "only StyleGAN2 generators (configs e/f, 'skip' architecture) convert")
    return net


def _check_kwargs(kwargs: dict, where: str) -> None:
    """Refuse the StyleGAN2 options that change what the layers compute."""
    supported = {"architecture": "skip", "nonlinearity": "lrelu", "mapping_nonlinearity": "lrelu",
                 "normalize_latents": True, "label_size": 0, "num_channels": 3}
    for key, want in supported.items():
        if key in kwargs and kwargs[key] != want:
            raise PickleError(f"{where}: {key}={kwargs[key]!r} is not supported (only {want!r})")
    kernel = kwargs.get("resample_kernel")
    if kernel is not None and list(kernel) != [1, 3, 3, 1]:
        raise PickleError(f"{where}: resample_kernel={list(kernel)} is not supported "
                          "(only [1, 3, 3, 1])")


def _modconv(v: _Variables, src: str, dst: str, flip: bool = False) -> dict[str, np.ndarray]:
    weight = v.take(f"{src}/weight", 4).transpose(3, 2, 0, 1)[None]   # [1, out, in, kh, kw]
    if flip:
        weight = weight[..., ::-1, ::-1]
    return {f"{dst}.conv.weight": weight,
            f"{dst}.conv.modulation.weight": v.take(f"{src}/mod_weight", 2).T,
            f"{dst}.conv.modulation.bias": v.take(f"{src}/mod_bias", 1) + 1,
            f"{dst}.noise.weight": v.take(f"{src}/noise_strength", 0).reshape(1),
            f"{dst}.activate.bias": v.take(f"{src}/bias", 1)}


def _torgb(v: _Variables, src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.conv.weight": v.take(f"{src}/weight", 4).transpose(3, 2, 0, 1)[None],
            f"{dst}.conv.modulation.weight": v.take(f"{src}/mod_weight", 2).T,
            f"{dst}.conv.modulation.bias": v.take(f"{src}/mod_bias", 1) + 1,
            f"{dst}.bias": v.take(f"{src}/bias", 1).reshape(1, -1, 1, 1)}


def convert_generator(gs: RecordedNetwork, name: str = "pickle"
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict]:
    """Gs -> (g_ema state dict, latent_avg or None, Generator config). Strict both ways:
    every variable of the synthesis and mapping networks is used, and every key of our
    generator is filled (blur kernels excepted: they are not variables)."""
    try:
        arrays = _generator_arrays(gs)
        latent_avg = gs.variables.get("dlatent_avg")
    except PickleError as e:
        raise PickleError(f"{name}: {e}") from None
    return _generator_state(arrays, latent_avg, name)


def _generator_arrays(gs: RecordedNetwork) -> dict[str, np.ndarray]:
    """Every variable of Gs's synthesis and mapping networks under our generator's keys;
    a variable left over is refused."""
    synthesis = _component(gs, "synthesis", SYNTHESIS_FUNC)
    mapping = _component(gs, "mapping", MAPPING_FUNC)
    for net in (gs, synthesis, mapping):
        _check_kwargs(net.static_kwargs, net.name)
    s = _Variables(synthesis, synthesis.name)
    m = _Variables(mapping, mapping.name)
    log_size = _log_size(s, synthesis.name)
    lrmul = float(mapping.static_kwargs.get("mapping_lrmul",
                                            gs.static_kwargs.get("mapping_lrmul", LR_MLP)))
    arrays = _mapping_arrays(m, lrmul)
    arrays.update(_synthesis_arrays(s, log_size))
    leftover = s.unused() + m.unused()
    if leftover:
        raise PickleError(f"unexpected variables {leftover[:5]}"
                          f"{f' (+{len(leftover) - 5} more)' if len(leftover) > 5 else ''}: "
                          "not a StyleGAN2 config e/f generator")
    return arrays


def _log_size(s: _Variables, where: str) -> int:
    """log2 of the synthesis network's resolution, from its ToRGB layers (4x4 the first)."""
    found = (re.fullmatch(r"(\d+)x\1/ToRGB/weight", k) for k in s.values)
    resolutions = sorted(int(match.group(1)) for match in found if match)
    if not resolutions or resolutions[0] != 4:
        raise PickleError(f"{where} has no 4x4/ToRGB layer: not the 'skip' "
                          "architecture of StyleGAN2 configs e/f")
    return int(np.log2(resolutions[-1]))


def _mapping_arrays(m: _Variables, lrmul: float) -> dict[str, np.ndarray]:
    """The mapping network's dense layers, a multiplier other than ours folded in."""
    n_mlp = sum(1 for k in m.values if re.fullmatch(r"Dense\d+/weight", k))
    fold = np.float32(lrmul / LR_MLP)
    arrays: dict[str, np.ndarray] = {}
    for i in range(n_mlp):
        weight, bias = m.take(f"Dense{i}/weight", 2).T, m.take(f"Dense{i}/bias", 1)
        arrays[f"style.{i + 1}.weight"] = weight * fold      # x * 1.0 is exact
        arrays[f"style.{i + 1}.bias"] = bias * fold
    return arrays


def _synthesis_arrays(s: _Variables, log_size: int) -> dict[str, np.ndarray]:
    """The synthesis network's constant input, layers per resolution and noise maps."""
    arrays = {"input.input": s.take("4x4/Const/const", 4)}
    arrays.update(_modconv(s, "4x4/Conv", "conv1"))
    arrays.update(_torgb(s, "4x4/ToRGB", "to_rgb1"))
    for i in range(log_size - 2):
        res = 2 ** (i + 3)
        arrays.update(_modconv(s, f"{res}x{res}/Conv0_up", f"convs.{2 * i}", flip=True))
        arrays.update(_modconv(s, f"{res}x{res}/Conv1", f"convs.{2 * i + 1}"))
        arrays.update(_torgb(s, f"{res}x{res}/ToRGB", f"to_rgbs.{i}"))
    for i in range((log_size - 2) * 2 + 1):
        arrays[f"noises.noise_{i}"] = s.take(f"noise{i}", 4)
    return arrays


def _generator_state(arrays: dict[str, np.ndarray], latent_avg: np.ndarray | None, name: str
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict]:
    """The arrays as our generator's state dict (checked by loading it, in the module's
    key order, blur kernels added), the mean latent as a tensor, and the config."""
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                  for k, v in arrays.items()}
    try:
        config = Generator.config_from_state_dict(state_dict)
        generator = Generator(**config)
    except (ValueError, KeyError) as e:
        raise PickleError(f"{name}: the layer shapes do not form a generator: {e}") from None
    template = generator.state_dict()
    for key, value in template.items():
        if key.endswith(".kernel") and key not in state_dict:
            state_dict[key] = value.clone()        # fixed blur taps
    load_strict(generator, state_dict, name)       # every key and shape fits
    state_dict = {key: state_dict[key] for key in template}  # the module's key order
    latent = None
    if latent_avg is not None:
        latent = torch.from_numpy(np.ascontiguousarray(latent_avg, dtype=np.float32).reshape(-1))
        if latent.numel() != config["style_dim"]:
            raise PickleError(f"{name}: dlatent_avg has {latent.numel()} values, expected "
                              f"{config['style_dim']}")
    return state_dict, latent, config


@dataclass(frozen=True)
class Conversion:
    dest: Path
    sha256: str
    source_sha256: str
    config: dict
    parameters: int
    latent_avg_norm: float | None


def convert_pickle(src: str, dest: str | os.PathLike, source_sha256: str | None = None
                   ) -> Conversion:
    """Convert the pickle at `src` (path or fsspec URI) into the checkpoint `dest`.

    The output is rosinality's generator file: {'g_ema', 'latent_avg'} plus
    'converted_from' (source file name and sha256, converter version). It is written
    to a temporary name and renamed, so a failed conversion leaves nothing behind.
    """
    name = redact(src)
    path = local_file(src)
    source_sha256 = source_sha256 or sha256_file(path)
    log.info("reading %s (sha256 %s) without TensorFlow", name, source_sha256)
    gs = read_network_pickle(path, name)
    state_dict, latent_avg, config = convert_generator(gs, name)
    checkpoint = {"g_ema": state_dict,
                  "converted_from": {"file": Path(src.split("?")[0]).name,
                                     "sha256": source_sha256, "converter": CONVERTER_VERSION,
                                     "network": gs.name}}
    if latent_avg is not None:
        checkpoint["latent_avg"] = latent_avg
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(dest) as tmp:
        torch.save(checkpoint, tmp)
    params = sum(v.numel() for k, v in state_dict.items()
                 if not k.startswith("noises.") and not k.endswith(".kernel"))
    log.info("wrote %s: %d px, %d mapping layers, %d parameters", dest, config["size"],
             config["n_mlp"], params)
    return Conversion(dest, sha256_file(dest), source_sha256, config, params,
                      None if latent_avg is None else float(latent_avg.norm()))
