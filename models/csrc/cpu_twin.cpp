// The CPU twin of ops.cu: the same per-element arithmetic (kernels.h) in plain loops,
// with the same functions and the same bindings (bindings.cpp). It exists so that a
// machine without a GPU tests the index arithmetic the CUDA kernels run; models/ops.py
// never uses it for real work.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/AccumulateType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"

at::Tensor upfirdn2d(at::Tensor x, at::Tensor k, int64_t up, int64_t down, int64_t p0,
                        int64_t p1) {
  x = x.contiguous(); k = k.contiguous();
  UpFirDnShape s{static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                 static_cast<int>(k.size(0)), static_cast<int>(k.size(1)),
                 static_cast<int>(up), static_cast<int>(down), static_cast<int>(p0),
                 static_cast<int>(p1), 0, 0};
  s.oh = upfirdn_out(s.h, s.kh, s.up, s.down, s.p0, s.p1);
  s.ow = upfirdn_out(s.w, s.kw, s.up, s.down, s.p0, s.p1);
  auto out = at::empty({x.size(0), x.size(1), s.oh, s.ow}, x.options());
  int64_t planes = x.size(0) * x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upfirdn2d_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    for (int64_t p = 0; p < planes; ++p)
      for (int oy = 0; oy < s.oh; ++oy)
        for (int ox = 0; ox < s.ow; ++ox)
          out.data_ptr<scalar_t>()[(p * s.oh + oy) * s.ow + ox] = static_cast<scalar_t>(
              upfirdn_forward_at<scalar_t, acc_t>(x.data_ptr<scalar_t>() + p * s.h * s.w,
                                                  k.data_ptr<scalar_t>(), s, oy, ox));
  });
  return out;
}

at::Tensor upfirdn2d_grad(at::Tensor gy, at::Tensor k, int64_t up, int64_t down,
                             int64_t p0, int64_t p1, int64_t h, int64_t w) {
  gy = gy.contiguous(); k = k.contiguous();
  UpFirDnShape s{static_cast<int>(h), static_cast<int>(w), static_cast<int>(k.size(0)),
                 static_cast<int>(k.size(1)), static_cast<int>(up), static_cast<int>(down),
                 static_cast<int>(p0), static_cast<int>(p1), static_cast<int>(gy.size(2)),
                 static_cast<int>(gy.size(3))};
  auto gx = at::empty({gy.size(0), gy.size(1), h, w}, gy.options());
  int64_t planes = gy.size(0) * gy.size(1);
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "upfirdn2d_grad_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    for (int64_t p = 0; p < planes; ++p)
      for (int iy = 0; iy < s.h; ++iy)
        for (int ix = 0; ix < s.w; ++ix)
          gx.data_ptr<scalar_t>()[(p * s.h + iy) * s.w + ix] = static_cast<scalar_t>(
              upfirdn_backward_at<scalar_t, acc_t>(gy.data_ptr<scalar_t>() + p * s.oh * s.ow,
                                                   k.data_ptr<scalar_t>(), s, iy, ix));
  });
  return gx;
}

at::Tensor bias_act(at::Tensor x, at::Tensor b, double slope, double gain) {
  x = x.contiguous();
  auto y = at::empty_like(x);
  int64_t n = x.numel(), channels = x.size(1), inner = n / (x.size(0) * x.size(1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_act_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    for (int64_t i = 0; i < n; ++i)
      y.data_ptr<scalar_t>()[i] = static_cast<scalar_t>(bias_act_forward_at<acc_t>(
          x.data_ptr<scalar_t>()[i], b.data_ptr<scalar_t>()[(i / inner) % channels],
          static_cast<acc_t>(slope), static_cast<acc_t>(gain)));
  });
  return y;
}

at::Tensor bias_act_grad(at::Tensor gy, at::Tensor y, double slope, double gain) {
  gy = gy.contiguous(); y = y.contiguous();
  auto gx = at::empty_like(gy);
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "bias_act_grad_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    for (int64_t i = 0; i < gy.numel(); ++i)
      gx.data_ptr<scalar_t>()[i] = static_cast<scalar_t>(bias_act_backward_at<acc_t>(
          gy.data_ptr<scalar_t>()[i], y.data_ptr<scalar_t>()[i], static_cast<acc_t>(slope),
          static_cast<acc_t>(gain)));
  });
  return gx;
}
