// CUDA kernels for upfirdn2d and bias + leaky ReLU (see kernels.h for the arithmetic).
// Written for maskface; one thread per output element, accumulation in float for
// half/bfloat16 inputs.
// Light includes on purpose: nvcc is slow on torch/extension.h, so the Python
// bindings live in bindings.cpp, which the host compiler builds alongside.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/AccumulateType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename scalar_t>
__global__ void upfirdn_forward_kernel(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ k,
                                       scalar_t* __restrict__ out, UpFirDnShape s,
                                       int64_t planes) {
  using acc_t = at::acc_type<scalar_t, true>;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t per_plane = static_cast<int64_t>(s.oh) * s.ow;
  if (i >= planes * per_plane) return;
  int64_t plane = i / per_plane;
  int rest = static_cast<int>(i % per_plane);
  out[i] = static_cast<scalar_t>(upfirdn_forward_at<scalar_t, acc_t>(
      x + plane * s.h * s.w, k, s, rest / s.ow, rest % s.ow));
}

template <typename scalar_t>
__global__ void upfirdn_backward_kernel(const scalar_t* __restrict__ gy,
                                        const scalar_t* __restrict__ k,
                                        scalar_t* __restrict__ gx, UpFirDnShape s,
                                        int64_t planes) {
  using acc_t = at::acc_type<scalar_t, true>;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t per_plane = static_cast<int64_t>(s.h) * s.w;
  if (i >= planes * per_plane) return;
  int64_t plane = i / per_plane;
  int rest = static_cast<int>(i % per_plane);
  gx[i] = static_cast<scalar_t>(upfirdn_backward_at<scalar_t, acc_t>(
      gy + plane * s.oh * s.ow, k, s, rest / s.w, rest % s.w));
}

template <typename scalar_t>
__global__ void bias_act_forward_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ b, scalar_t* __restrict__ y,
                                        int64_t n, int64_t channels, int64_t inner,
                                        float slope, float gain) {
  using acc_t = at::acc_type<scalar_t, true>;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  int64_t c = (i / inner) % channels;
  y[i] = static_cast<scalar_t>(bias_act_forward_at<acc_t>(
      static_cast<acc_t>(x[i]), static_cast<acc_t>(b[c]), slope, gain));
}

template <typename scalar_t>
__global__ void bias_act_backward_kernel(const scalar_t* __restrict__ gy,
                                         const scalar_t* __restrict__ y,
                                         scalar_t* __restrict__ gx, int64_t n, float slope,
                                         float gain) {
  using acc_t = at::acc_type<scalar_t, true>;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  gx[i] = static_cast<scalar_t>(bias_act_backward_at<acc_t>(
      static_cast<acc_t>(gy[i]), static_cast<acc_t>(y[i]), slope, gain));
}

UpFirDnShape shape_of(const at::Tensor& x, const at::Tensor& k, int up, int down, int p0,
                      int p1) {
  UpFirDnShape s;
  s.h = static_cast<int>(x.size(2));
  s.w = static_cast<int>(x.size(3));
  s.kh = static_cast<int>(k.size(0));
  s.kw = static_cast<int>(k.size(1));
  s.up = up; s.down = down; s.p0 = p0; s.p1 = p1;
  s.oh = upfirdn_out(s.h, s.kh, up, down, p0, p1);
  s.ow = upfirdn_out(s.w, s.kw, up, down, p0, p1);
  return s;
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

at::Tensor upfirdn2d(at::Tensor x, at::Tensor k, int64_t up, int64_t down, int64_t p0,
                        int64_t p1) {
  check(x, "x"); check(k, "kernel");
  TORCH_CHECK(x.dim() == 4 && k.dim() == 2, "x [N, C, H, W] and kernel [kh, kw]");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  UpFirDnShape s = shape_of(x, k, up, down, p0, p1);
  TORCH_CHECK(s.oh > 0 && s.ow > 0, "upfirdn2d: empty output");
  auto out = at::empty({x.size(0), x.size(1), s.oh, s.ow}, x.options());
  int64_t planes = x.size(0) * x.size(1);
  int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "upfirdn2d", [&] {
    upfirdn_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s, planes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor upfirdn2d_grad(at::Tensor gy, at::Tensor k, int64_t up, int64_t down,
                             int64_t p0, int64_t p1, int64_t h, int64_t w) {
  check(gy, "grad"); check(k, "kernel");
  const at::cuda::OptionalCUDAGuard guard(device_of(gy));
  auto gx = at::empty({gy.size(0), gy.size(1), h, w}, gy.options());
  UpFirDnShape s = shape_of(gx, k, up, down, p0, p1);
  TORCH_CHECK(s.oh == gy.size(2) && s.ow == gy.size(3), "upfirdn2d_grad: shape mismatch");
  int64_t planes = gy.size(0) * gy.size(1);
  int64_t n = gx.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, gy.scalar_type(),
                                  "upfirdn2d_grad", [&] {
    upfirdn_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
        gy.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), s, planes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

at::Tensor bias_act(at::Tensor x, at::Tensor b, double slope, double gain) {
  check(x, "x"); check(b, "bias");
  TORCH_CHECK(x.dim() >= 2 && b.dim() == 1 && b.size(0) == x.size(1), "bias must be [C]");
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  auto y = at::empty_like(x);
  int64_t n = x.numel();
  int64_t inner = n / (x.size(0) * x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "bias_act", [&] {
    bias_act_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, x.size(1),
        inner, static_cast<float>(slope), static_cast<float>(gain));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor bias_act_grad(at::Tensor gy, at::Tensor y, double slope, double gain) {
  check(gy, "grad"); check(y, "y");
  const at::cuda::OptionalCUDAGuard guard(device_of(gy));
  auto gx = at::empty_like(gy);
  int64_t n = gy.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, gy.scalar_type(),
                                  "bias_act_grad", [&] {
    bias_act_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        gy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n,
        static_cast<float>(slope), static_cast<float>(gain));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}
