// Python bindings of the ops in ops.cu, or of their CPU twin in cpu_twin.cpp (built by
// the host compiler, not nvcc).
#include <torch/extension.h>

at::Tensor upfirdn2d(at::Tensor x, at::Tensor k, int64_t up, int64_t down, int64_t p0,
                     int64_t p1);
at::Tensor upfirdn2d_grad(at::Tensor gy, at::Tensor k, int64_t up, int64_t down, int64_t p0,
                          int64_t p1, int64_t h, int64_t w);
at::Tensor bias_act(at::Tensor x, at::Tensor b, double slope, double gain);
at::Tensor bias_act_grad(at::Tensor gy, at::Tensor y, double slope, double gain);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "upsample, FIR filter, downsample");
  m.def("upfirdn2d_grad", &upfirdn2d_grad, "gradient of upfirdn2d with respect to x");
  m.def("bias_act", &bias_act, "bias + leaky ReLU + gain");
  m.def("bias_act_grad", &bias_act_grad, "gradient of bias_act with respect to x");
}
