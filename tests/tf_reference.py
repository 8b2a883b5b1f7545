"""Test-only: StyleGAN2's TensorFlow layer semantics in plain NumPy (float64), computed
straight from the arrays of an NVIDIA pickle in their TF layouts. Independent of our
converter and of PyTorch: it checks the layout facts the converter relies on.

Semantics, as NVIDIA's networks_stylegan2.py and upfirdn_2d.py define them:
- get_weight: stored w ~ N(0, 1/lrmul), used as w * lrmul / sqrt(fan_in); a bias b is used
  as b * lrmul. `lrelu` = leaky ReLU(0.2) * sqrt(2), after adding the bias.
- modulated_conv2d_layer: styles s = dense(dlatent, mod_weight) + mod_bias + 1 (gain 1,
  lrmul 1); w [kh, kw, in, out] scaled by 1/sqrt(kh*kw*in), multiplied by s over `in`,
  demodulated by 1/sqrt(sum over kh, kw, in + 1e-8); conv2d is a cross-correlation.
- up=True (upsample_conv_2d): "upsample_2d() followed by conv2d(), padding performed only
  once at the beginning": zero insertion x2, pad (3, 2), FIR [1,3,3,1]^2 * 4/64, then the
  3x3 correlation with no further padding.
- upsample_2d (the skip path): zero insertion x2, pad (2, 1), the same FIR.
- layer(): conv, then + noise * noise_strength, then bias + lrelu. ToRGB: conv without
  demodulation, + bias, no activation, + upsample_2d(previous RGB).
"""
from __future__ import annotations

import numpy as np

FIR = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float64)
FIR = FIR / FIR.sum() * 4            # gain factor**2 for the zeros that upsampling inserts


def lrelu(x, bias):
    x = x + bias.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, 0.2 * x) * np.sqrt(2)


def dense(x, weight, bias, lrmul):
    """A mapping layer: weight [in, out] as stored in the file, then bias + lrelu."""
    return lrelu(x @ (weight * (lrmul / np.sqrt(weight.shape[0]))), bias * lrmul)


def mapping(z, variables, lrmul, n_mlp):
    x = z / np.sqrt(np.mean(z ** 2, axis=1, keepdims=True) + 1e-8)
    for i in range(n_mlp):
        x = dense(x, variables[f"Dense{i}/weight"], variables[f"Dense{i}/bias"], lrmul)
    return x


def _styles(dlatent, variables, prefix):
    mod_weight = variables[f"{prefix}/mod_weight"]
    return dlatent @ (mod_weight / np.sqrt(mod_weight.shape[0])) + variables[f"{prefix}/mod_bias"] + 1


def _modulated(variables, prefix, styles, demodulate):
    w = variables[f"{prefix}/weight"].astype(np.float64)           # [kh, kw, in, out]
    w = w / np.sqrt(np.prod(w.shape[:3]))
    ww = w[None] * styles[:, None, None, :, None]                   # [N, kh, kw, in, out]
    if demodulate:
        ww = ww / np.sqrt(np.sum(ww ** 2, axis=(1, 2, 3), keepdims=True) + 1e-8)
    return ww


def _correlate(x, ww):
    """Per-sample cross-correlation, no padding: x [N, in, H, W], ww [N, kh, kw, in, out]."""
    kh, kw = ww.shape[1:3]
    h, w = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    out = np.zeros((x.shape[0], ww.shape[-1], h, w))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nihw,nio->nohw", x[:, :, a:a + h, b:b + w], ww[:, a, b])
    return out


def _upsample_fir(x, pad):
    n, c, h, w = x.shape
    z = np.zeros((n, c, 2 * h, 2 * w))
    z[:, :, ::2, ::2] = x
    z = np.pad(z, ((0, 0), (0, 0), pad, pad))
    out = np.zeros((n, c, z.shape[2] - 3, z.shape[3] - 3))
    for a in range(4):
        for b in range(4):
            out += FIR[a, b] * z[:, :, a:a + out.shape[2], b:b + out.shape[3]]
    return out


def upsample_2d(x):
    return _upsample_fir(x, (2, 1))


def modulated_layer(x, dlatent, variables, prefix, noise, up=False):
    """One synthesis conv layer (`Conv`, `Conv0_up` or `Conv1`) including noise and bias."""
    ww = _modulated(variables, prefix, _styles(dlatent, variables, prefix), demodulate=True)
    if up:
        x = _correlate(_upsample_fir(x, (3, 2)), ww)
    else:
        k = ww.shape[1] // 2
        x = _correlate(np.pad(x, ((0, 0), (0, 0), (k, k), (k, k))), ww)
    x = x + noise * float(variables[f"{prefix}/noise_strength"])
    return lrelu(x, variables[f"{prefix}/bias"])


def torgb(x, dlatent, variables, prefix, skip=None):
    ww = _modulated(variables, prefix, _styles(dlatent, variables, prefix), demodulate=False)
    y = _correlate(x, ww) + variables[f"{prefix}/bias"].reshape(1, -1, 1, 1)
    return y if skip is None else y + upsample_2d(skip)


def synthesis(dlatents, variables, noises):
    """dlatents [N, n_latent, style] -> images [N, 3, R, R] in [-1, 1] ('skip' architecture)."""
    x = np.repeat(variables["4x4/Const/const"].astype(np.float64), dlatents.shape[0], axis=0)
    x = modulated_layer(x, dlatents[:, 0], variables, "4x4/Conv", noises[0])
    y = torgb(x, dlatents[:, 1], variables, "4x4/ToRGB")
    res = 8
    while f"{res}x{res}/ToRGB/weight" in variables:
        i = 2 * (res.bit_length() - 1)                      # layer index res*2-5 in log2 terms
        x = modulated_layer(x, dlatents[:, i - 5], variables, f"{res}x{res}/Conv0_up",
                            noises[i - 5], up=True)
        x = modulated_layer(x, dlatents[:, i - 4], variables, f"{res}x{res}/Conv1", noises[i - 4])
        y = torgb(x, dlatents[:, i - 3], variables, f"{res}x{res}/ToRGB", skip=y)
        res *= 2
    return y
