// StyleGAN2's two ops as per-element functions, written once for the host and the
// device. The CUDA kernels (ops.cu) and the CPU twin that tests their index arithmetic
// (cpu_twin.cpp) both call these, so a test on a machine without a GPU checks the same
// arithmetic the GPU runs.
//
// upfirdn2d, as models/ops.py defines it: upsample x [H, W] by zero insertion (`up`),
// pad by p0 before and p1 after on both axes (negative crops), correlate with the
// flipped kernel [kh, kw] (a true convolution), keep every `down`-th output.
#pragma once

#ifdef __CUDACC__
#define MF_HD __host__ __device__ __forceinline__
#else
#define MF_HD inline
#endif

struct UpFirDnShape {
  int h, w;            // input plane
  int kh, kw;          // kernel
  int up, down;
  int p0, p1;          // padding before / after (both axes)
  int oh, ow;          // output plane
};

MF_HD int upfirdn_out(int in, int k, int up, int down, int p0, int p1) {
  return (in * up + p0 + p1 - k) / down + 1;
}

// One output element: sum over the taps that land on a non-inserted input sample.
template <typename scalar_t, typename acc_t>
MF_HD acc_t upfirdn_forward_at(const scalar_t* x, const scalar_t* k, const UpFirDnShape& s,
                               int oy, int ox) {
  acc_t acc = 0;
  for (int ky = 0; ky < s.kh; ++ky) {
    int uy = oy * s.down + ky - s.p0;              // row in the upsampled plane
    if (uy < 0 || uy % s.up != 0) continue;
    int iy = uy / s.up;
    if (iy >= s.h) continue;
    for (int kx = 0; kx < s.kw; ++kx) {
      int ux = ox * s.down + kx - s.p0;
      if (ux < 0 || ux % s.up != 0) continue;
      int ix = ux / s.up;
      if (ix >= s.w) continue;
      // correlation with the flipped kernel
      acc += static_cast<acc_t>(x[iy * s.w + ix]) *
             static_cast<acc_t>(k[(s.kh - 1 - ky) * s.kw + (s.kw - 1 - kx)]);
    }
  }
  return acc;
}

// One input element of the gradient: the adjoint of the above, gathering from every
// output whose window used this sample.
template <typename scalar_t, typename acc_t>
MF_HD acc_t upfirdn_backward_at(const scalar_t* gy, const scalar_t* k, const UpFirDnShape& s,
                                int iy, int ix) {
  acc_t acc = 0;
  for (int ky = 0; ky < s.kh; ++ky) {
    int ny = iy * s.up + s.p0 - ky;                // = oy * down
    if (ny < 0 || ny % s.down != 0) continue;
    int oy = ny / s.down;
    if (oy >= s.oh) continue;
    for (int kx = 0; kx < s.kw; ++kx) {
      int nx = ix * s.up + s.p0 - kx;
      if (nx < 0 || nx % s.down != 0) continue;
      int ox = nx / s.down;
      if (ox >= s.ow) continue;
      acc += static_cast<acc_t>(gy[oy * s.ow + ox]) *
             static_cast<acc_t>(k[(s.kh - 1 - ky) * s.kw + (s.kw - 1 - kx)]);
    }
  }
  return acc;
}

// bias + leaky ReLU + gain, and its gradient from the output (gain > 0, so the output's
// sign is the pre-activation's; at exactly 0 the slope applies, as in PyTorch).
template <typename acc_t>
MF_HD acc_t bias_act_forward_at(acc_t x, acc_t b, acc_t slope, acc_t gain) {
  acc_t v = x + b;
  return (v > 0 ? v : v * slope) * gain;
}

template <typename acc_t>
MF_HD acc_t bias_act_backward_at(acc_t gy, acc_t y, acc_t slope, acc_t gain) {
  return gy * gain * (y > 0 ? acc_t(1) : slope);
}
