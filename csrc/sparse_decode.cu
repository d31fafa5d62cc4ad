// Split-KV sparse paged decode, stage 1: CUDA implementation of
// casakv::sparse_decode_split.
//
// Semantics: the split stage of triton_kernels/sparse_decode.py with physical
// block ids (``sel_physical=True``).  For request r, KV head h and split s,
// the slice [s * per, min((s + 1) * per, count)) of the row's selected pages
// (per = cdiv(count, num_splits)) is attended to by the GROUP query heads of
// h.  Results, in base 2 like the Triton kernel:
//   * num_splits > 1: the unnormalised fp32 accumulator, running max and sum
//     of exponentials go to the split workspaces (ws_acc [B, Hq, S, D],
//     ws_m / ws_l [B, Hq, S]); the Triton merge kernel combines them;
//   * num_splits == 1: ``out`` (and ``lse``, natural log) directly.
// The sequence's partial last block can only be a row's last entry
// (selections are ascending); its tail is masked.
//
// Why CUDA: Triton 3.6 compiles the split loop with one buffer per operand
// and waits for every copy at the top of each iteration, so a program has a
// single tile in flight; a 10% selection gives each program only a handful
// of tiles.  Here every warp streams its own 16-token chunks through a ring
// of ``stages`` shared-memory buffers filled by cp.async, so each warp keeps
// stages - 1 chunks in flight while it computes on one.
//
// Work layout (CTA = kWarps warps, grid (num_splits, Hkv, R)): warp w takes
// chunks w, w + kWarps, ... of the slice (chunk = 16 tokens of one page;
// block_size must be a multiple of 16).  Per chunk:
//   * scores: lane (tq = lane / 8, dc = lane % 8) owns tokens 4i + tq and the
//     16-byte column groups dc, dc + 8, ... of the head; partial dot
//     products are summed over the 8 lanes of a token (3 shuffles);
//   * softmax: running max / sum per query head, base 2, fp32;
//   * P @ V: lane owns D / 32 output columns, P goes through shared memory.
// The warps' partial results are combined through shared memory at the end.
//
// Registration: TORCH_LIBRARY_FRAGMENT (compaction.cu owns TORCH_LIBRARY).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace casakv {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;        // warps per CTA
constexpr int kChunk = 16;       // tokens per pipeline stage
constexpr int kMaxStages = 6;

struct SplitArgs {
  const void* query;
  const void* kv;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* sel;
  const int32_t* sel_count;
  float* ws_acc;
  float* ws_m;
  float* ws_l;
  void* out;
  float* lse;  // nullptr: not written
  int64_t q_s0, q_s1;                   // elements
  int64_t c_blk, c_head;                // elements (token stride 2D, d stride 1)
  int64_t bt_s0, bt_s1;
  int64_t sel_s0, sel_s1, sel_s2;
  int64_t sc_s0, sc_s1;
  int64_t wa_s0, wa_s1, wa_s2;          // ws_acc (d stride 1)
  int64_t wm_s0, wm_s1;                 // ws_m / ws_l (split stride 1)
  int64_t o_s0, o_s1;                   // out (d stride 1)
  int64_t lse_s0, lse_s1;
  float qk_scale;                       // softmax scale * log2(e)
  int num_splits;
  int group;                            // query heads per KV head (<= GP)
  int block_size;                       // multiple of kChunk
  int stages;                           // 2 .. kMaxStages
};

template <typename T>
struct Vec;
template <>
struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
  }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <>
struct Vec<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  }
  static __device__ __forceinline__ __half from(float x) { return __float2half(x); }
  static __device__ __forceinline__ float f(__half x) { return __half2float(x); }
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// wait until at most n groups are pending (n is warp-uniform, < kMaxStages)
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    default: cp_async_wait<5>(); break;
  }
}

// Lets a programmatic dependent launch (the merge kernel) start now; it
// still waits for this grid to finish before reading the workspaces.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename T, int D, int GP>
__global__ void __launch_bounds__(kWarps* kWarp)
    sparse_decode_split_kernel(const SplitArgs a) {
  static_assert(D == 64 || D == 128, "head size 64 or 128");
  constexpr int kRow = 2 * D;                         // elements per token row (K | V)
  constexpr int kChunkU4 = kChunk * kRow * 2 / 16;    // 16-byte units per chunk
  constexpr int kRowU4 = kRow * 2 / 16;
  constexpr int kNch = D / 64;                        // K column groups per lane
  constexpr int kVpl = D / kWarp;                     // output columns per lane
  using V = Vec<T>;

  allow_dependents();
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t seq = blockIdx.z;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int tq = lane >> 3;
  const int dc = lane & 7;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4* ring = reinterpret_cast<uint4*>(smem_raw) + warp * a.stages * kChunkU4;
  float* pbuf = reinterpret_cast<float*>(reinterpret_cast<uint4*>(smem_raw) +
                                         kWarps * a.stages * kChunkU4) +
                warp * GP * kChunk;

  const int seq_len = a.seq_lens[seq];
  const int count = a.sel_count[seq * a.sc_s0 + kvh * a.sc_s1];
  const int per = (count + a.num_splits - 1) / a.num_splits;
  const int s0 = split * per;
  const int s1 = min(s0 + per, count);
  const int npages = max(s1 - s0, 0);
  const int cpp = a.block_size / kChunk;  // chunks per page
  const int nchunks = npages * cpp;
  const int32_t* sel_row = a.sel + seq * a.sel_s0 + kvh * a.sel_s1;
  int valid = npages * a.block_size;  // valid tokens of the slice's stream
  if (npages > 0 && s1 == count && seq_len > 0) {
    const int last_blk = (seq_len - 1) / a.block_size;
    const int last_phys = a.block_table[seq * a.bt_s0 + last_blk * a.bt_s1];
    if (sel_row[(count - 1) * a.sel_s2] == last_phys)
      valid -= (last_blk + 1) * a.block_size - seq_len;
  }

  // query rows of this KV head, pre-scaled (base 2), lane's column groups
  float q[GP][kNch * 8];
  const T* qbase = static_cast<const T*>(a.query) + seq * a.q_s0;
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    const bool live = g < a.group;
    const T* qrow = qbase + static_cast<int64_t>(kvh * a.group + (live ? g : 0)) * a.q_s1;
#pragma unroll
    for (int j = 0; j < kNch; ++j) {
      const uint4 u = *reinterpret_cast<const uint4*>(qrow + (dc + 8 * j) * 8);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = V::f2(w[e]);
        q[g][j * 8 + 2 * e] = live ? f.x * a.qk_scale : 0.f;
        q[g][j * 8 + 2 * e + 1] = live ? f.y * a.qk_scale : 0.f;
      }
    }
  }

  float acc[GP][kVpl];
  float m[GP], l[GP];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVpl; ++e) acc[g][e] = 0.f;
  }

  const T* kv_head = static_cast<const T*>(a.kv) + kvh * a.c_head;
  const int my_n = warp < nchunks ? (nchunks - warp + kWarps - 1) / kWarps : 0;
  auto issue = [&](int i, int slot) {
    const int c = warp + i * kWarps;
    const int64_t phys = sel_row[(s0 + c / cpp) * a.sel_s2];
    const uint4* src = reinterpret_cast<const uint4*>(kv_head + phys * a.c_blk +
                                                      static_cast<int64_t>(c % cpp) * kChunk * kRow);
    uint4* dst = ring + slot * kChunkU4;
#pragma unroll
    for (int j = 0; j < kChunkU4 / kWarp; ++j) cp_async16(dst + j * kWarp + lane, src + j * kWarp + lane);
  };
  const int ahead = a.stages - 1;
  for (int i = 0; i < ahead; ++i) {
    if (i < my_n) issue(i, i);
    cp_async_commit();
  }

  int slot = 0;
  for (int i = 0; i < my_n; ++i) {
    const int nxt = i + ahead;
    if (nxt < my_n) issue(nxt, nxt % a.stages);  // the slot chunk i - 1 used
    cp_async_commit();
    cp_async_wait_dyn(ahead);  // chunk i has landed (this lane's copies)
    __syncwarp();              // ... and every lane's
    const uint4* buf = ring + slot * kChunkU4;
    const int tok0 = (warp + i * kWarps) * kChunk;  // position in the slice's stream
    const int nvalid = min(kChunk, valid - tok0);

    // scores s[g][r] for tokens 4r + tq
    float s[GP][4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float kf[kNch * 8];
#pragma unroll
      for (int j = 0; j < kNch; ++j) {
        const uint4 u = buf[(4 * r + tq) * kRowU4 + dc + 8 * j];
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = V::f2(w[e]);
          kf[j * 8 + 2 * e] = f.x;
          kf[j * 8 + 2 * e + 1] = f.y;
        }
      }
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        float t = 0.f;
#pragma unroll
        for (int e = 0; e < kNch * 8; ++e) t = fmaf(q[g][e], kf[e], t);
        s[g][r] = t;
      }
    }
#pragma unroll
    for (int g = 0; g < GP; ++g)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float t = s[g][r];
        t += __shfl_xor_sync(0xffffffffu, t, 1);
        t += __shfl_xor_sync(0xffffffffu, t, 2);
        t += __shfl_xor_sync(0xffffffffu, t, 4);
        s[g][r] = (4 * r + tq < nvalid) ? t : -INFINITY;
      }

    // online softmax; lane dc == g writes the probabilities of head g
    float alpha[GP], m_use[GP];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      float cm = fmaxf(fmaxf(s[g][0], s[g][1]), fmaxf(s[g][2], s[g][3]));
      cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 8));
      cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 16));
      const float m_new = fmaxf(m[g], cm);
      m_use[g] = m_new == -INFINITY ? 0.f : m_new;
      alpha[g] = exp2f(m[g] - m_use[g]);
      m[g] = m_new;
      if (dc == g) {
#pragma unroll
        for (int r = 0; r < 4; ++r) pbuf[g * kChunk + 4 * r + tq] = exp2f(s[g][r] - m_use[g]);
      }
    }
    __syncwarp();

    // P @ V: lane owns columns lane * kVpl ..
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      l[g] *= alpha[g];
#pragma unroll
      for (int e = 0; e < kVpl; ++e) acc[g][e] *= alpha[g];
    }
    const T* vrow = reinterpret_cast<const T*>(buf) + D + lane * kVpl;
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      if (t < nvalid) {  // tokens past the sequence may hold anything (NaN)
        float vf[kVpl];
        if constexpr (kVpl == 4) {
          const uint2 u = *reinterpret_cast<const uint2*>(vrow + t * kRow);
          const float2 f0 = V::f2(u.x), f1 = V::f2(u.y);
          vf[0] = f0.x; vf[1] = f0.y; vf[2] = f1.x; vf[3] = f1.y;
        } else {
          const float2 f0 = V::f2(*reinterpret_cast<const uint32_t*>(vrow + t * kRow));
          vf[0] = f0.x; vf[1] = f0.y;
        }
#pragma unroll
        for (int g = 0; g < GP; ++g) {
          const float p = pbuf[g * kChunk + t];
          l[g] += p;
#pragma unroll
          for (int e = 0; e < kVpl; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
        }
      }
    }
    __syncwarp();  // every lane is done with this slot and pbuf
    slot = slot + 1 == a.stages ? 0 : slot + 1;
  }
  cp_async_wait<0>();

  // combine the warps: [kWarps][GP] max / sum, [kWarps][GP][D] accumulators
  __syncthreads();  // the ring is free
  float* wm = reinterpret_cast<float*>(smem_raw);
  float* wl = wm + kWarps * GP;
  float* wacc = wl + kWarps * GP;
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      wm[warp * GP + g] = m[g];
      wl[warp * GP + g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < GP; ++g)
#pragma unroll
    for (int e = 0; e < kVpl; ++e) wacc[(warp * GP + g) * D + lane * kVpl + e] = acc[g][e];
  __syncthreads();

  const bool single = a.num_splits == 1;
  for (int idx = threadIdx.x; idx < a.group * D; idx += kWarps * kWarp) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w * GP + g]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float sum_l = 0.f, sum_a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(wm[w * GP + g] - mu);
      sum_l += wl[w * GP + g] * f;
      sum_a += wacc[(w * GP + g) * D + d] * f;
    }
    const int64_t head = static_cast<int64_t>(kvh) * a.group + g;
    if (single) {
      const float inv = sum_l == 0.f ? 0.f : 1.f / sum_l;
      static_cast<T*>(a.out)[seq * a.o_s0 + head * a.o_s1 + d] = V::from(sum_a * inv);
      if (a.lse != nullptr && d == 0)
        a.lse[seq * a.lse_s0 + head * a.lse_s1] =
            sum_l == 0.f ? -INFINITY : (mu + log2f(sum_l)) * 0.6931471805599453f;
    } else {
      a.ws_acc[seq * a.wa_s0 + head * a.wa_s1 + split * a.wa_s2 + d] = sum_a;
      if (d == 0) {
        const int64_t o = seq * a.wm_s0 + head * a.wm_s1 + split;
        a.ws_m[o] = mx;
        a.ws_l[o] = sum_l;
      }
    }
  }
}

size_t smem_bytes(int d, int gp, int stages) {
  const size_t ring = static_cast<size_t>(kWarps) * stages * kChunk * 2 * d * 2;
  const size_t pbuf = static_cast<size_t>(kWarps) * gp * kChunk * sizeof(float);
  const size_t combine = static_cast<size_t>(kWarps) * gp * (d + 2) * sizeof(float);
  return std::max(ring + pbuf, combine);
}

template <typename T, int D, int GP>
void launch(const SplitArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = smem_bytes(D, GP, a.stages);
  auto kernel = sparse_decode_split_kernel<T, D, GP>;
  // once per device (not a stream operation, but kept out of graph captures)
  static bool opted_in[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && !opted_in[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes(D, GP, kMaxStages))));
    opted_in[dev] = true;
  }
  kernel<<<grid, kWarps * kWarp, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void dispatch_group(const SplitArgs& a, dim3 grid, cudaStream_t stream) {
  if (a.group <= 1) return launch<T, D, 1>(a, grid, stream);
  if (a.group <= 2) return launch<T, D, 2>(a, grid, stream);
  if (a.group <= 4) return launch<T, D, 4>(a, grid, stream);
  return launch<T, D, 8>(a, grid, stream);
}

template <typename T>
void dispatch_head(const SplitArgs& a, int64_t d, dim3 grid, cudaStream_t stream) {
  if (d == 64) return dispatch_group<T, 64>(a, grid, stream);
  return dispatch_group<T, 128>(a, grid, stream);
}

void check_args(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& sel, const at::Tensor& sel_count,
                int64_t num_splits, int64_t stages, const at::Tensor& out,
                const c10::optional<at::Tensor>& lse, const at::Tensor& ws_acc,
                const at::Tensor& ws_m, const at::Tensor& ws_l) {
  TORCH_CHECK(query.dim() == 3, "sparse_decode_split: query must be [R, num_heads, head_size]");
  TORCH_CHECK(kv_cache.dim() == 4, "sparse_decode_split: kv_cache must be [blocks, Hkv, block_size, 2*D]");
  const int64_t R = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t Hkv = kv_cache.size(1), bs = kv_cache.size(2);
  TORCH_CHECK(D == 64 || D == 128, "sparse_decode_split: head_size must be 64 or 128, got ", D);
  TORCH_CHECK(kv_cache.size(3) == 2 * D, "sparse_decode_split: kv_cache last dim must be 2*head_size");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  (query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf),
              "sparse_decode_split: query and kv_cache must both be bf16 or fp16");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "sparse_decode_split: out dtype must match query");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= 8,
              "sparse_decode_split: num_heads must be a multiple of num_kv_heads, at most 8 per KV head");
  TORCH_CHECK(bs % kChunk == 0, "sparse_decode_split: block_size must be a multiple of 16, got ", bs);
  TORCH_CHECK(kv_cache.stride(3) == 1 && kv_cache.stride(2) == 2 * D,
              "sparse_decode_split: each (block, KV head) page must be contiguous");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "sparse_decode_split: query/out rows must be contiguous");
  TORCH_CHECK(out.dim() == 3 && out.size(0) >= R && out.size(1) == H && out.size(2) == D,
              "sparse_decode_split: out must be [>=R, num_heads, head_size]");
  TORCH_CHECK(sel.dim() == 3 && sel.size(0) == R && sel.size(1) == Hkv,
              "sparse_decode_split: sel must be [R, num_kv_heads, MAXSEL]");
  TORCH_CHECK(sel_count.dim() == 2 && sel_count.size(0) == R && sel_count.size(1) == Hkv,
              "sparse_decode_split: sel_count must be [R, num_kv_heads]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= R, "sparse_decode_split: block_table must be [>=R, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == R, "sparse_decode_split: seq_lens must be [R]");
  for (const at::Tensor* t : {&block_table, &seq_lens, &sel, &sel_count})
    TORCH_CHECK(t->scalar_type() == at::kInt, "sparse_decode_split: index tensors must be int32");
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, "sparse_decode_split: num_splits must be in [1, 65535]");
  TORCH_CHECK(stages >= 2 && stages <= kMaxStages, "sparse_decode_split: stages must be in [2, ", kMaxStages, "]");
  if (lse.has_value())
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->dim() == 2 && lse->size(1) == H,
                "sparse_decode_split: lse must be fp32 [>=R, num_heads]");
  if (num_splits > 1) {
    TORCH_CHECK(ws_acc.scalar_type() == at::kFloat && ws_acc.dim() == 4 && ws_acc.size(0) >= R &&
                    ws_acc.size(1) == H && ws_acc.size(2) >= num_splits && ws_acc.size(3) == D &&
                    ws_acc.stride(3) == 1,
                "sparse_decode_split: ws_acc must be fp32 [>=R, num_heads, >=num_splits, head_size]");
    TORCH_CHECK(ws_m.scalar_type() == at::kFloat && ws_l.scalar_type() == at::kFloat && ws_m.dim() == 3 &&
                    ws_m.sizes() == ws_l.sizes() && ws_m.strides() == ws_l.strides() &&
                    ws_m.size(0) >= R && ws_m.size(1) == H && ws_m.size(2) >= num_splits &&
                    ws_m.stride(2) == 1,
                "sparse_decode_split: ws_m / ws_l must be fp32 [>=R, num_heads, >=num_splits]");
  }
}

void sparse_decode_split_cuda(at::Tensor query, at::Tensor kv_cache, at::Tensor block_table,
                              at::Tensor seq_lens, at::Tensor sel, at::Tensor sel_count,
                              double qk_scale, int64_t num_splits, int64_t stages, at::Tensor out,
                              c10::optional<at::Tensor> lse, at::Tensor ws_acc, at::Tensor ws_m,
                              at::Tensor ws_l) {
  check_args(query, kv_cache, block_table, seq_lens, sel, sel_count, num_splits, stages, out, lse,
             ws_acc, ws_m, ws_l);
  const int64_t R = query.size(0), D = query.size(2), Hkv = kv_cache.size(1);
  if (R == 0) return;
  TORCH_CHECK(R <= 65535 && Hkv <= 65535, "sparse_decode_split: too many requests or KV heads");
  const c10::cuda::CUDAGuard guard(query.device());
  const uintptr_t align = reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) |
                          reinterpret_cast<uintptr_t>(query.data_ptr()) |
                          static_cast<uintptr_t>(kv_cache.stride(0) * 2) |
                          static_cast<uintptr_t>(kv_cache.stride(1) * 2) |
                          static_cast<uintptr_t>(query.stride(0) * 2) |
                          static_cast<uintptr_t>(query.stride(1) * 2);
  TORCH_CHECK((align & 15) == 0, "sparse_decode_split: kv_cache / query must be 16-byte aligned");

  SplitArgs a{};
  a.query = query.data_ptr();
  a.kv = kv_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.sel = sel.data_ptr<int32_t>();
  a.sel_count = sel_count.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  a.q_s0 = query.stride(0);
  a.q_s1 = query.stride(1);
  a.c_blk = kv_cache.stride(0);
  a.c_head = kv_cache.stride(1);
  a.bt_s0 = block_table.stride(0);
  a.bt_s1 = block_table.stride(1);
  a.sel_s0 = sel.stride(0);
  a.sel_s1 = sel.stride(1);
  a.sel_s2 = sel.stride(2);
  a.sc_s0 = sel_count.stride(0);
  a.sc_s1 = sel_count.stride(1);
  a.o_s0 = out.stride(0);
  a.o_s1 = out.stride(1);
  if (lse.has_value()) {
    a.lse_s0 = lse->stride(0);
    a.lse_s1 = lse->stride(1);
  }
  if (num_splits > 1) {
    a.ws_acc = ws_acc.data_ptr<float>();
    a.ws_m = ws_m.data_ptr<float>();
    a.ws_l = ws_l.data_ptr<float>();
    a.wa_s0 = ws_acc.stride(0);
    a.wa_s1 = ws_acc.stride(1);
    a.wa_s2 = ws_acc.stride(2);
    a.wm_s0 = ws_m.stride(0);
    a.wm_s1 = ws_m.stride(1);
  }
  a.qk_scale = static_cast<float>(qk_scale);
  a.num_splits = static_cast<int>(num_splits);
  a.group = static_cast<int>(query.size(1) / Hkv);
  a.block_size = static_cast<int>(kv_cache.size(2));
  a.stages = static_cast<int>(stages);

  const dim3 grid(static_cast<unsigned>(num_splits), static_cast<unsigned>(Hkv), static_cast<unsigned>(R));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (query.scalar_type() == at::kBFloat16)
    dispatch_head<__nv_bfloat16>(a, D, grid, stream);
  else
    dispatch_head<__half>(a, D, grid, stream);
}

void sparse_decode_split_meta(at::Tensor query, at::Tensor kv_cache, at::Tensor block_table,
                              at::Tensor seq_lens, at::Tensor sel, at::Tensor sel_count,
                              double qk_scale, int64_t num_splits, int64_t stages, at::Tensor out,
                              c10::optional<at::Tensor> lse, at::Tensor ws_acc, at::Tensor ws_m,
                              at::Tensor ws_l) {
  check_args(query, kv_cache, block_table, seq_lens, sel, sel_count, num_splits, stages, out, lse,
             ws_acc, ws_m, ws_l);
}

}  // namespace
}  // namespace casakv

TORCH_LIBRARY_FRAGMENT(casakv, m) {
  m.def(
      "sparse_decode_split(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor sel, Tensor sel_count, float qk_scale, int num_splits, int stages, "
      "Tensor(a!) out, Tensor(b!)? lse, Tensor(c!) ws_acc, Tensor(d!) ws_m, Tensor(e!) ws_l) -> ()");
}

TORCH_LIBRARY_IMPL(casakv, CUDA, m) { m.impl("sparse_decode_split", &casakv::sparse_decode_split_cuda); }

TORCH_LIBRARY_IMPL(casakv, Meta, m) { m.impl("sparse_decode_split", &casakv::sparse_decode_split_meta); }
