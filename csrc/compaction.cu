// KV-cache compaction: CUDA implementation of casakv::compact_kv.
//
// Semantics (same as triton_kernels/compaction.py): for every request r and
// KV head h, retained token j < keep_count[r, h] (logical position
// keep[r, h, j], strictly ascending) is moved, K and V, to logical position j
// of the same request and head.  Positions >= keep_count are untouched.
//
// Sources and destinations overlap, so the move runs in two phases, one
// kernel launch each (stream order separates them):
//   1. gather: cache[keep[j]] -> scratch[r, h, j]   for every j with keep[j] != j
//   2. scatter: scratch[r, h, j] -> cache[j]         for the same j
// Tokens already in place are skipped.  One warp per token row (2*head_size
// elements); when the row is contiguous and every address is 16-byte aligned
// the copy uses 16-byte vectors (uint4), else the widest aligned unit.
//
// Registration: TORCH_LIBRARY(casakv, m) lives in this file.  Other csrc/
// files that add ops to the same namespace must use
// TORCH_LIBRARY_FRAGMENT(casakv, m).  The Python module init is a weak
// symbol so another source file may define the same one.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace casakv {
namespace {

constexpr int kWarp = 32;
constexpr int kTokensPerBlock = 8;  // warps per CTA, one token row each

struct CompactArgs {
  char* cache;            // kv_cache base (bytes)
  char* scratch;          // [R, Hkv, MAXK, 2D] contiguous (bytes)
  const int32_t* block_table;
  const int32_t* keep;
  const int32_t* keep_count;
  int64_t num_kv_heads;
  int64_t max_keep;
  int64_t block_size;
  int64_t bt_s0, bt_s1;                 // elements
  int64_t c_blk, c_head, c_tok;         // bytes
  int64_t k_s0, k_s1, k_s2;             // elements
  int64_t kc_s0, kc_s1;                 // elements
  int64_t row_units;                    // copy units per token row
  int64_t unit_stride;                  // cache stride between units (bytes)
};

template <typename Unit, bool kGather>
__global__ void compact_phase_kernel(const CompactArgs a) {
  const int64_t rh = blockIdx.y;
  const int64_t r = rh / a.num_kv_heads;
  const int64_t h = rh % a.num_kv_heads;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.y;
  const int64_t count = a.keep_count[r * a.kc_s0 + h * a.kc_s1];
  if (j >= count) return;
  const int64_t src = a.keep[r * a.k_s0 + h * a.k_s1 + j * a.k_s2];
  if (src == j) return;  // already in place
  const int64_t pos = kGather ? src : j;
  const int64_t phys = a.block_table[r * a.bt_s0 + (pos / a.block_size) * a.bt_s1];
  char* cache_row = a.cache + phys * a.c_blk + h * a.c_head + (pos % a.block_size) * a.c_tok;
  Unit* scratch_row =
      reinterpret_cast<Unit*>(a.scratch) + (rh * a.max_keep + j) * a.row_units;
  for (int64_t u = threadIdx.x; u < a.row_units; u += kWarp) {
    Unit* c = reinterpret_cast<Unit*>(cache_row + u * a.unit_stride);
    if (kGather) {
      scratch_row[u] = *c;
    } else {
      *c = scratch_row[u];
    }
  }
}

template <typename Unit>
void launch_phases(const CompactArgs& a, dim3 grid, cudaStream_t stream) {
  const dim3 block(kWarp, kTokensPerBlock);
  compact_phase_kernel<Unit, true><<<grid, block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact_phase_kernel<Unit, false><<<grid, block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_args(const at::Tensor& kv_cache, const at::Tensor& block_table,
                const at::Tensor& keep, const at::Tensor& keep_count,
                const at::Tensor& scratch) {
  TORCH_CHECK(kv_cache.dim() == 4, "kv_cache must be [num_blocks, num_kv_heads, block_size, 2*head_size]");
  TORCH_CHECK(kv_cache.size(3) % 2 == 0, "kv_cache last dim must be even");
  TORCH_CHECK(keep.dim() == 3, "keep must be [R, num_kv_heads, MAXK]");
  TORCH_CHECK(keep.size(1) == kv_cache.size(1), "keep: num_kv_heads mismatch");
  TORCH_CHECK(keep_count.dim() == 2 && keep_count.size(0) == keep.size(0) &&
                  keep_count.size(1) == keep.size(1),
              "keep_count must be [R, num_kv_heads]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= keep.size(0),
              "block_table must be [>=R, max_blocks]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && keep.scalar_type() == at::kInt &&
                  keep_count.scalar_type() == at::kInt,
              "block_table, keep and keep_count must be int32");
  TORCH_CHECK(scratch.scalar_type() == kv_cache.scalar_type(), "scratch dtype must match kv_cache");
  TORCH_CHECK(scratch.is_contiguous(), "scratch must be contiguous");
  TORCH_CHECK(scratch.numel() >= keep.size(0) * keep.size(1) * keep.size(2) * kv_cache.size(3),
              "scratch too small: need R * num_kv_heads * MAXK * 2*head_size elements");
}

void compact_kv_cuda(at::Tensor kv_cache, at::Tensor block_table, at::Tensor keep,
                     at::Tensor keep_count, at::Tensor scratch) {
  check_args(kv_cache, block_table, keep, keep_count, scratch);
  TORCH_CHECK(kv_cache.is_cuda() && block_table.is_cuda() && keep.is_cuda() &&
                  keep_count.is_cuda() && scratch.is_cuda(),
              "compact_kv: all tensors must be on CUDA");
  const int64_t R = keep.size(0), H = keep.size(1), K = keep.size(2);
  if (R == 0 || H == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const int64_t esz = kv_cache.element_size();
  const int64_t two_d = kv_cache.size(3);

  CompactArgs a;
  a.cache = static_cast<char*>(kv_cache.data_ptr());
  a.scratch = static_cast<char*>(scratch.data_ptr());
  a.block_table = block_table.data_ptr<int32_t>();
  a.keep = keep.data_ptr<int32_t>();
  a.keep_count = keep_count.data_ptr<int32_t>();
  a.num_kv_heads = H;
  a.max_keep = K;
  a.block_size = kv_cache.size(2);
  a.bt_s0 = block_table.stride(0);
  a.bt_s1 = block_table.stride(1);
  a.c_blk = kv_cache.stride(0) * esz;
  a.c_head = kv_cache.stride(1) * esz;
  a.c_tok = kv_cache.stride(2) * esz;
  a.k_s0 = keep.stride(0);
  a.k_s1 = keep.stride(1);
  a.k_s2 = keep.stride(2);
  a.kc_s0 = keep_count.stride(0);
  a.kc_s1 = keep_count.stride(1);

  // Widest copy unit: the row must be contiguous, and the row size, the
  // cache strides (bytes) and both base pointers multiples of the unit.
  const int64_t row_bytes = two_d * esz;
  const bool row_contig = kv_cache.stride(3) == 1 || two_d == 1;
  int64_t unit = esz;
  if (row_contig) {
    const uint64_t align_bits =
        reinterpret_cast<uintptr_t>(a.cache) | reinterpret_cast<uintptr_t>(a.scratch) |
        static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(a.c_blk) |
        static_cast<uint64_t>(a.c_head) | static_cast<uint64_t>(a.c_tok);
    for (int64_t w = 16; w > esz; w /= 2) {
      if ((align_bits & static_cast<uint64_t>(w - 1)) == 0) {
        unit = w;
        break;
      }
    }
  }
  a.row_units = row_bytes / unit;
  a.unit_stride = row_contig ? unit : kv_cache.stride(3) * esz;

  TORCH_CHECK(R * H <= 65535, "compact_kv: R * num_kv_heads must be <= 65535");
  const dim3 grid(static_cast<unsigned>((K + kTokensPerBlock - 1) / kTokensPerBlock),
                  static_cast<unsigned>(R * H));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (unit) {
    case 16: launch_phases<uint4>(a, grid, stream); break;
    case 8: launch_phases<uint2>(a, grid, stream); break;
    case 4: launch_phases<uint32_t>(a, grid, stream); break;
    case 2: launch_phases<uint16_t>(a, grid, stream); break;
    case 1: launch_phases<uint8_t>(a, grid, stream); break;
    default: TORCH_CHECK(false, "compact_kv: unsupported element size ", esz);
  }
}

void compact_kv_meta(at::Tensor kv_cache, at::Tensor block_table, at::Tensor keep,
                     at::Tensor keep_count, at::Tensor scratch) {
  check_args(kv_cache, block_table, keep, keep_count, scratch);
}

}  // namespace
}  // namespace casakv

TORCH_LIBRARY(casakv, m) {
  m.def(
      "compact_kv(Tensor(a!) kv_cache, Tensor block_table, Tensor keep, "
      "Tensor keep_count, Tensor(b!) scratch) -> ()");
}

TORCH_LIBRARY_IMPL(casakv, CUDA, m) { m.impl("compact_kv", &casakv::compact_kv_cuda); }

TORCH_LIBRARY_IMPL(casakv, Meta, m) { m.impl("compact_kv", &casakv::compact_kv_meta); }

// Python module init for the extension (casakv_vllm._C via setup.py, or the
// name given to torch.utils.cpp_extension.load).  Importing it runs the
// static registrations above.  Weak, so that several csrc files may carry it.
#ifdef TORCH_EXTENSION_NAME
#define CASAKV_STR2(x) #x
#define CASAKV_STR(x) CASAKV_STR2(x)
#define CASAKV_CAT2(a, b) a##b
#define CASAKV_CAT(a, b) CASAKV_CAT2(a, b)
extern "C" __attribute__((weak, visibility("default"))) PyObject* CASAKV_CAT(
    PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, CASAKV_STR(TORCH_EXTENSION_NAME),
                                   "casakv CUDA ops (registered as torch.ops.casakv.*)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
#endif
