"""Test-only: write files in the structure of NVIDIA's StyleGAN2 pickles, and read them back
with plain `pickle` (no maskface code), so tests can see the raw arrays a file holds.

The official file is `pickle.dump((G, D, Gs))` of `dnnlib.tflib.network.Network` objects,
each pickling the dict built by its `__getstate__`: version, name, static_kwargs,
components, build_module_src, build_func_name, variables [(name, array), ...].
`official_network` makes a stand-in class living at that import path, so pickle writes
the same global reference and the same state as NVIDIA's file does.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import re
import sys
import types

import numpy as np
import torch


class Network:
    """Stand-in for dnnlib.tflib.network.Network with the state NVIDIA's class pickles."""

    def __init__(self, name, build_func_name, variables, static_kwargs=None, components=None):
        self.state = {"version": 4, "name": name, "static_kwargs": dict(static_kwargs or {}),
                      "components": dict(components or {}),
                      "build_module_src": "# (test file: no network source recorded)\n",
                      "build_func_name": build_func_name, "variables": list(variables)}

    def __getstate__(self):
        return self.state

    def __setstate__(self, state):
        self.state = state

    def vars(self) -> dict:
        return dict(self.state["variables"])


@contextlib.contextmanager
def dnnlib_importable():
    """Make `dnnlib.tflib.network.Network` resolve to the stand-in while pickling/unpickling."""
    names = ["dnnlib", "dnnlib.tflib", "dnnlib.tflib.network"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules["dnnlib.tflib.network"].Network = Network
    Network.__module__, Network.__qualname__ = "dnnlib.tflib.network", "Network"
    try:
        yield
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def pickle_bytes(obj, protocol: int = 3, numpy_1_names: bool = True) -> bytes:
    """Pickle with the stand-in importable. Protocols 2 and 3 name globals in plain text
    lines, so numpy 2's `numpy._core` can be renamed to the `numpy.core` of the files
    NVIDIA wrote with numpy 1.x."""
    with dnnlib_importable():
        data = pickle.dumps(obj, protocol=protocol)
    if numpy_1_names and protocol <= 3:
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return data


def plain_load(data: bytes):
    """Read such a file with plain pickle and the stand-in: the raw arrays, no maskface code."""
    with dnnlib_importable():
        return pickle.load(io.BytesIO(data), encoding="latin1")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def n_upsampling_blocks(sd: dict) -> int:
    return sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))


def official_variables(sd: dict) -> tuple[list, list]:
    """Our g_ema state dict -> (G_synthesis, G_mapping) variables in NVIDIA's names, layouts
    and creation order: the inverse of the converter's mapping, written independently."""
    n_mlp = sum(1 for k in sd if re.fullmatch(r"style\.\d+\.weight", k))
    n_up = n_upsampling_blocks(sd)
    mapping = []
    for i in range(n_mlp):
        mapping += [(f"Dense{i}/weight", _np(sd[f"style.{i + 1}.weight"]).T.copy()),
                    (f"Dense{i}/bias", _np(sd[f"style.{i + 1}.bias"]))]

    def conv(prefix, key, up=False):
        w = _np(sd[f"{key}.conv.weight"])[0]                       # [out, in, kh, kw]
        if up:
            w = w[:, :, ::-1, ::-1]
        return [(f"{prefix}/weight", w.transpose(2, 3, 1, 0).copy()),  # [kh, kw, in, out]
                (f"{prefix}/mod_weight", _np(sd[f"{key}.conv.modulation.weight"]).T.copy()),
                (f"{prefix}/mod_bias", _np(sd[f"{key}.conv.modulation.bias"]) - 1),
                (f"{prefix}/noise_strength", np.float32(sd[f"{key}.noise.weight"].item())),
                (f"{prefix}/bias", _np(sd[f"{key}.activate.bias"]))]

    def torgb(prefix, key):
        return [(f"{prefix}/weight", _np(sd[f"{key}.conv.weight"])[0].transpose(2, 3, 1, 0).copy()),
                (f"{prefix}/mod_weight", _np(sd[f"{key}.conv.modulation.weight"]).T.copy()),
                (f"{prefix}/mod_bias", _np(sd[f"{key}.conv.modulation.bias"]) - 1),
                (f"{prefix}/bias", _np(sd[f"{key}.bias"]).reshape(-1))]

    synthesis = [(f"noise{i}", _np(sd[f"noises.noise_{i}"])) for i in range(2 * n_up + 1)]
    synthesis += [("4x4/Const/const", _np(sd["input.input"]))]
    synthesis += conv("4x4/Conv", "conv1") + torgb("4x4/ToRGB", "to_rgb1")
    for i in range(n_up):
        r = 2 ** (i + 3)
        synthesis += conv(f"{r}x{r}/Conv0_up", f"convs.{2 * i}", up=True)
        synthesis += conv(f"{r}x{r}/Conv1", f"convs.{2 * i + 1}")
        synthesis += torgb(f"{r}x{r}/ToRGB", f"to_rgbs.{i}")
    return synthesis, mapping


def official_networks(sd: dict, latent_avg: torch.Tensor, mapping_kwargs: dict | None = None):
    """(G, D, Gs) as NVIDIA pickles them: Gs owns `lod` and `dlatent_avg`, its components
    own the rest. G is a second copy (the trained, non-EMA weights); D is a token net."""
    synthesis, mapping = official_variables(sd)
    size = 2 ** (2 + n_upsampling_blocks(sd))
    kwargs = {"num_channels": 3, "resolution": size, "label_size": 0}

    def generator(name_suffix=""):
        comps = {"synthesis": Network("G_synthesis", "G_synthesis_stylegan2", synthesis, kwargs),
                 "mapping": Network("G_mapping", "G_mapping", mapping,
                                    {**kwargs, **(mapping_kwargs or {})})}
        return Network("G" + name_suffix, "G_main",
                       [("lod", np.float32(0)), ("dlatent_avg", _np(latent_avg))], kwargs, comps)

    d = Network("D", "D_stylegan2", [("Output/weight", np.ones((4, 1), np.float32))], kwargs)
    return generator(), d, generator("s")


def random_generator_state(generator, seed: int = 0) -> dict:
    """Every parameter and buffer of `generator` redrawn (biases, noise strengths and
    modulation biases included), so that no layout fact hides behind a zero or a one."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in generator.state_dict().items():
        if key.endswith(".kernel"):
            sd[key] = value.clone()
        elif key.endswith("modulation.bias"):
            # on a 2**-10 grid, so that the file's `mod_bias = bias - 1` and the converter's
            # `+ 1` are exact in float32 and a round trip can be compared bit for bit
            sd[key] = 1 + torch.round(torch.randn(value.shape, generator=gen) * 300) / 1024
        elif key.startswith("style.") and key.endswith(".weight"):
            sd[key] = torch.randn(value.shape, generator=gen) / 0.01
        else:
            sd[key] = torch.randn(value.shape, generator=gen) * (0.3 if "bias" in key else 1.0)
    return sd
