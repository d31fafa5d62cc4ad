// Does a TORCH_CHECK whose message streams a value crash when it fires in an
// nvcc-built extension on the GPU box?  Three ops in one .cu, built like
// setup.py's extension (nvcc, -O3, C++17), each failing its check:
//   literal(x)     TORCH_CHECK(false, "literal message")
//   streamed(x)    TORCH_CHECK(false, "streamed message, got ", x.size(0))
//   streamed_int(x) TORCH_CHECK(false, "value ", int64_t{96}, " and ", 3.5)
#include <ATen/ATen.h>
#include <torch/library.h>

namespace {
void literal(at::Tensor x) { TORCH_CHECK(x.dim() == 99, "literal message"); }
void streamed(at::Tensor x) { TORCH_CHECK(x.dim() == 99, "streamed message, got ", x.size(0)); }
void streamed_int(at::Tensor x) {
  const int64_t d = x.size(0);
  TORCH_CHECK(d == 64 || d == 128, "head_size must be 64 or 128, got ", d);
}
}  // namespace

TORCH_LIBRARY(casakv_probe, m) {
  m.def("literal(Tensor x) -> ()");
  m.def("streamed(Tensor x) -> ()");
  m.def("streamed_int(Tensor x) -> ()");
}
TORCH_LIBRARY_IMPL(casakv_probe, CompositeExplicitAutograd, m) {
  m.impl("literal", &literal);
  m.impl("streamed", &streamed);
  m.impl("streamed_int", &streamed_int);
}
