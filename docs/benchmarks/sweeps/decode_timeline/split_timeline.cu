// EXPERIMENT (not built by setup.py): the tensor-core CUDA split stage of
// decode-cuda-split-mma.patch with per-CTA globaltimer stamps and a loads-only
// mode, as casakv_exp::sparse_decode_split.  Driver: timeline.py.
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
// Work layout (CTA = `warps` warps, grid (num_splits, Hkv, R)): warp w takes
// chunks w, w + warps, ... of the slice (chunk = 16 tokens of one page;
// block_size must be a multiple of 16).  Per chunk, on tensor cores
// (mma.m16n8k16, bf16/fp16 in, fp32 accumulate; fragments as in
// FlashAttention-2): the A operand of Q K^T holds the GQA group's query heads
// in rows 0..group-1 (the other rows are zero), K^T and V come from shared
// memory through ldmatrix (V transposed), and the S accumulators become the A
// operand of P V in registers.  Online softmax per row, base 2, fp32.  The
// warps' partial results are combined through shared memory at the end.
//
// Registration: TORCH_LIBRARY_FRAGMENT (compaction.cu owns TORCH_LIBRARY).
//
// Session 7: the MMA / cp.async helpers, the chunk's attention, the Q
// fragments and the shared argument fields moved to ../decode_chunk.cuh
// (shared with decode_cluster/).  Compiled with nvcc 13.0 before and after
// the move: the same register counts per instance (162 / 128).  Not re-run
// on the GPU after the move (device loans were paused that session).
// split_timeline_v1.cu stays as it was measured.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../decode_chunk.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace casakv_exp {
namespace {
using namespace casakv_sweep;

constexpr int kMaxWarps = 8;     // warps per CTA: 1 .. kMaxWarps (runtime)
constexpr int kMaxStages = 6;

struct SplitArgs : PagedDecodeFields {
  float* ws_acc;
  float* ws_m;
  float* ws_l;
  int64_t wa_s0, wa_s1, wa_s2;          // ws_acc (d stride 1)
  int64_t wm_s0, wm_s1;                 // ws_m / ws_l (split stride 1)
  float qk_scale;                       // softmax scale * log2(e)
  int num_splits;
  int block_size;                       // multiple of kChunk
  int stages;                           // 2 .. kMaxStages
  int warps;                            // 1 .. kMaxWarps
  long long* tl;                        // [CTAs, 5] globaltimer stamps (ns)
  int mode;                             // bits: 1 loads only, 2 fast start, 4 fused merge, 8 dynamic
                                        // chunks (bits 4..7: chunks per grab, 0 -> 2)
  int* ctr;                             // [B, 3 * Hkv] int32 zeros: dynamic work / done, fused merge
  int64_t ctr_s0;
  int maxsel;                           // sel.size(2)
  int64_t num_blocks;                   // kv_cache.size(0)
};

// Lets a programmatic dependent launch (the merge kernel) start now; it
// still waits for this grid to finish before reading the workspaces.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Shared-memory chunk layout: token rows of kRowU4 16-byte units (K then V);
// unit c of row t sits at c ^ (t & 7), so the 8 rows an ldmatrix reads (and
// the 8 units a quarter-warp's cp.async writes) fall in 8 different banks.
template <int kRowU4>
__device__ __forceinline__ int swz(int t, int c) {
  return t * kRowU4 + (c ^ (t & 7));
}

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps* kWarp)
    sparse_decode_split_kernel(const SplitArgs a) {
  static_assert(D == 64 || D == 128, "head size 64 or 128");
  constexpr int kRowU4 = 2 * D * 2 / 16;  // 16-byte units per token row (K | V)
  constexpr int kChunkU4 = kChunk * kRowU4;
  constexpr int kKs = D / 16;             // k-steps of Q K^T
  constexpr int kNt = D / 8;              // n-tiles of P V
  using M = Mma<T>;

  allow_dependents();
  const long long t_start = gtimer();
  const int64_t cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t seq = blockIdx.z;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row = lane >> 2;   // fragment row: query head of the GQA group
  const int quad = lane & 3;   // fragment column pair

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4* ring = reinterpret_cast<uint4*>(smem_raw) + warp * a.stages * kChunkU4;

  const bool fast = (a.mode & 2) != 0;
  const int seq_len = a.seq_lens[seq];
  const int count = a.sel_count[seq * a.sc_s0 + kvh * a.sc_s1];
  // fast start: split bounds from MAXSEL, so the first page ids load alongside
  // the count instead of after it
  const int per = ((fast ? a.maxsel : count) + a.num_splits - 1) / a.num_splits;
  const int s0 = split * per;
  const int cpp = a.block_size / kChunk;  // chunks per page
  const int32_t* sel_row = a.sel + seq * a.sel_s0 + kvh * a.sel_s1;
  const int spec_chunks = max(min(s0 + per, a.maxsel) - s0, 0) * cpp;
  int valid = 0, nchunks = 0;
  auto finish_bounds = [&]() {
    const int s1 = min(s0 + per, count);
    const int npages = max(s1 - s0, 0);
    nchunks = npages * cpp;
    valid = npages * a.block_size;  // valid tokens of the slice's stream
    if (npages > 0 && s1 == count && seq_len > 0) {
      const int last_blk = (seq_len - 1) / a.block_size;
      const int last_phys = a.block_table[seq * a.bt_s0 + last_blk * a.bt_s1];
      if (sel_row[(count - 1) * a.sel_s2] == last_phys)
        valid -= (last_blk + 1) * a.block_size - seq_len;
    }
  };
  if (!fast) finish_bounds();

  uint32_t qa[kKs][2];
  load_q_fragments<T, D>(qa, a, seq, kvh, lane);

  float acc[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m = -INFINITY, lsum = 0.f;  // row `row`: running max (base 2), lane's share of the sum

  const T* kv_head = static_cast<const T*>(a.kv) + kvh * a.c_head;
  const int nw = a.warps;
  auto chunks_of_warp = [&](int n) { return warp < n ? (n - warp + nw - 1) / nw : 0; };
  int my_n = chunks_of_warp(fast ? spec_chunks : nchunks);

  // dynamic mode: every warp of every split of this (request, KV head) takes
  // the next `batch` chunks of the whole row from one counter
  const bool dyn = (a.mode & 8) != 0;
  const int batch = ((a.mode >> 4) & 15) ? ((a.mode >> 4) & 15) : 2;
  int* work = a.ctr + seq * a.ctr_s0 + kvh;
  const int n_row = count * cpp;
  __shared__ int chunk_of[kMaxWarps * kMaxStages];
  int b_cur = 0, b_end = 0, pend = 0;
  if (dyn) {
    if (lane == 0) {
      b_cur = atomicAdd(work, batch);
      pend = atomicAdd(work, batch);
    }
    b_cur = __shfl_sync(0xffffffffu, b_cur, 0);
    b_end = b_cur + batch;
  }
  auto next_chunk = [&]() {
    if (b_cur == b_end) {
      b_cur = __shfl_sync(0xffffffffu, pend, 0);
      b_end = b_cur + batch;
      if (lane == 0) pend = atomicAdd(work, batch);
    }
    return b_cur++;
  };
  auto issue = [&](int i, int slot) {
    int c = warp + i * nw;
    if (dyn) {
      c = next_chunk();
      if (lane == 0) chunk_of[warp * kMaxStages + slot] = c;
      if (c >= n_row) return;
      c -= s0 * cpp;  // (s0 = 0 below: whole row)
    }
    int64_t phys = sel_row[(s0 + c / cpp) * a.sel_s2];
    if (fast) phys = min(max(phys, int64_t{0}), a.num_blocks - 1);  // maybe past the count
    const uint4* src = reinterpret_cast<const uint4*>(kv_head + phys * a.c_blk +
                                                      static_cast<int64_t>(c % cpp) * kChunk * 2 * D);
    uint4* dst = ring + slot * kChunkU4;
#pragma unroll
    for (int j = 0; j < kChunkU4 / kWarp; ++j) {
      const int u = j * kWarp + lane;
      cp_async16(dst + swz<kRowU4>(u / kRowU4, u % kRowU4), src + u);
    }
  };
  const int ahead = a.stages - 1;
  for (int i = 0; i < ahead; ++i) {
    if (dyn || i < my_n) issue(i, i);
    cp_async_commit();
  }
  int valid_row = 0;
  if (dyn) {
    valid_row = count * a.block_size;
    if (count > 0 && seq_len > 0) {
      const int last_blk = (seq_len - 1) / a.block_size;
      const int last_phys = a.block_table[seq * a.bt_s0 + last_blk * a.bt_s1];
      if (sel_row[(count - 1) * a.sel_s2] == last_phys) valid_row -= (last_blk + 1) * a.block_size - seq_len;
    }
    my_n = 1 << 30;  // until the row runs out
  }

  if (fast) {
    finish_bounds();
    my_n = chunks_of_warp(nchunks);
  }
  const auto unit = [](int t, int c) { return swz<kRowU4>(t, c); };
  int slot = 0;
  if (threadIdx.x == 0) { a.tl[cta * 5 + 0] = t_start; a.tl[cta * 5 + 1] = gtimer(); }
  for (int i = 0; i < my_n; ++i) {
    const int nxt = i + ahead;
    if (dyn || nxt < my_n) issue(nxt, nxt % a.stages);  // the slot chunk i - 1 used
    cp_async_commit();
    cp_async_wait_dyn(ahead);  // chunk i has landed (this lane's copies)
    __syncwarp();              // ... and every lane's
    int cdyn = 0;
    if (dyn) {
      cdyn = chunk_of[warp * kMaxStages + slot];
      if (cdyn >= n_row) break;
    }
    if (i == 0 && threadIdx.x == 0) a.tl[cta * 5 + 2] = gtimer();
    if (a.mode & 1) { __syncwarp(); slot = slot + 1 == a.stages ? 0 : slot + 1; continue; }
    uint4* buf = ring + slot * kChunkU4;
    const int nvalid = dyn ? min(kChunk, valid_row - cdyn * kChunk)
                           : min(kChunk, valid - (warp + i * nw) * kChunk);
    if (nvalid < kChunk) zero_tail_v<kRowU4>(buf, unit, nvalid, lane);
    attend_chunk<T, D>(buf, unit, qa, acc, m, lsum, nvalid, lane, a.qk_scale);
    __syncwarp();  // every lane is done with this slot
    slot = slot + 1 == a.stages ? 0 : slot + 1;
  }
  cp_async_wait<0>();
  if (threadIdx.x == 0) a.tl[cta * 5 + 3] = gtimer();
  lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
  lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);

  // combine the warps: [warps][8] max / sum, [warps][8][D] accumulators
  __syncthreads();  // the ring is free
  float* wm = reinterpret_cast<float*>(smem_raw);
  float* wl = wm + nw * 8;
  float* wacc = wl + nw * 8;
  if (quad == 0) {
    wm[warp * 8 + row] = m;
    wl[warp * 8 + row] = lsum;
  }
#pragma unroll
  for (int j = 0; j < kNt; ++j) {
    wacc[(warp * 8 + row) * D + 8 * j + 2 * quad] = acc[j][0];
    wacc[(warp * 8 + row) * D + 8 * j + 2 * quad + 1] = acc[j][1];
  }
  __syncthreads();

  const bool single = a.num_splits == 1;
  for (int idx = threadIdx.x; idx < a.group * D; idx += nw * kWarp) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < nw; ++w) mx = fmaxf(mx, wm[w * 8 + g]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float sum_l = 0.f, sum_a = 0.f;
#pragma unroll
    for (int w = 0; w < nw; ++w) {
      const float f = exp2f(wm[w * 8 + g] - mu);
      sum_l += wl[w * 8 + g] * f;
      sum_a += wacc[(w * 8 + g) * D + d] * f;
    }
    const int64_t head = static_cast<int64_t>(kvh) * a.group + g;
    if (single) {
      const float inv = sum_l == 0.f ? 0.f : 1.f / sum_l;
      static_cast<T*>(a.out)[seq * a.o_s0 + head * a.o_s1 + d] = M::from(sum_a * inv);
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
  __syncthreads();
  if (threadIdx.x == 0) a.tl[cta * 5 + 4] = gtimer();
  if (dyn) {  // the last split to finish resets the row's work counter
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      int* done = a.ctr + seq * a.ctr_s0 + gridDim.y + kvh;
      if (atomicAdd(done, 1) == a.num_splits - 1) {
        *done = 0;
        *work = 0;
      }
    }
  }
  if (single || !(a.mode & 4)) return;

  // fused merge: the last split of (request, KV head) combines all of them
  __shared__ int is_last;
  __shared__ float mu_s[8], tot_s[8];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* c = a.ctr + seq * a.ctr_s0 + 2 * gridDim.y + kvh;
    is_last = atomicAdd(c, 1) == a.num_splits - 1;
    if (is_last) *c = 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int S = a.num_splits, G = a.group, nt = nw * kWarp;
  float* wv = reinterpret_cast<float*>(smem_raw);  // [G*S]: m, then weights
  float* lv = wv + G * S;                         // [G*S]: l
  for (int i = threadIdx.x; i < G * S; i += nt) {
    const int64_t o = seq * a.wm_s0 + (static_cast<int64_t>(kvh) * G + i / S) * a.wm_s1 + i % S;
    wv[i] = __ldcg(a.ws_m + o);
    lv[i] = __ldcg(a.ws_l + o);
  }
  __syncthreads();
  if (threadIdx.x < G) {
    float mx = -INFINITY;
    for (int j = 0; j < S; ++j) mx = fmaxf(mx, wv[threadIdx.x * S + j]);
    mu_s[threadIdx.x] = mx == -INFINITY ? 0.f : mx;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * S; i += nt) wv[i] = exp2f(wv[i] - mu_s[i / S]);
  __syncthreads();
  if (threadIdx.x < G) {
    float t = 0.f;
    for (int j = 0; j < S; ++j) t += lv[threadIdx.x * S + j] * wv[threadIdx.x * S + j];
    tot_s[threadIdx.x] = t;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += nt) {
    const int g = idx / D, d = idx % D;
    const int64_t head = static_cast<int64_t>(kvh) * G + g;
    const float* src = a.ws_acc + seq * a.wa_s0 + head * a.wa_s1 + d;
    float o = 0.f;
    for (int j0 = 0; j0 < S; j0 += 16) {  // 16 independent loads in flight
      float v[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = j0 + j < S ? __ldcg(src + (j0 + j) * a.wa_s2) : 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) o += j0 + j < S ? v[j] * wv[g * S + j0 + j] : 0.f;
    }
    const float t = tot_s[g];
    static_cast<T*>(a.out)[seq * a.o_s0 + head * a.o_s1 + d] = M::from(t == 0.f ? 0.f : o / t);
    if (a.lse != nullptr && d == 0)
      a.lse[seq * a.lse_s0 + head * a.lse_s1] = t == 0.f ? -INFINITY : (mu_s[g] + log2f(t)) * 0.6931471805599453f;
  }
}

size_t smem_bytes(int64_t d, int64_t stages, int64_t warps) {
  const size_t ring = static_cast<size_t>(warps * stages * kChunk * 2 * d * 2);
  const size_t combine = static_cast<size_t>(warps * 8 * (d + 2)) * sizeof(float);
  return std::max(std::max(ring, combine), static_cast<size_t>(2 * 8 * 128 * sizeof(float)));
}

int max_smem_optin(int dev) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

template <typename T, int D>
void launch(const SplitArgs& a, dim3 grid, cudaStream_t stream) {
  auto kernel = sparse_decode_split_kernel<T, D>;
  // once per device (not a stream operation, but kept out of graph captures)
  static bool opted_in[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && !opted_in[dev]) {
    cudaFuncAttributes fa;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        max_smem_optin(dev) - static_cast<int>(fa.sharedSizeBytes)));
    opted_in[dev] = true;
  }
  kernel<<<grid, a.warps * kWarp, smem_bytes(D, a.stages, a.warps), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_head(const SplitArgs& a, int64_t d, dim3 grid, cudaStream_t stream) {
  if (d == 64) return launch<T, 64>(a, grid, stream);
  return launch<T, 128>(a, grid, stream);
}

void check_args(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& sel, const at::Tensor& sel_count,
                int64_t num_splits, int64_t stages, int64_t warps, const at::Tensor& out,
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
  TORCH_CHECK(warps >= 1 && warps <= kMaxWarps, "sparse_decode_split: warps must be in [1, ", kMaxWarps, "]");
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
                              double qk_scale, int64_t num_splits, int64_t stages, int64_t warps, at::Tensor out,
                              c10::optional<at::Tensor> lse, at::Tensor ws_acc, at::Tensor ws_m,
                              at::Tensor ws_l, at::Tensor tl, int64_t mode, at::Tensor ctr) {
  check_args(query, kv_cache, block_table, seq_lens, sel, sel_count, num_splits, stages, warps, out, lse,
             ws_acc, ws_m, ws_l);
  const int64_t R = query.size(0), D = query.size(2), Hkv = kv_cache.size(1);
  if (R == 0) return;
  TORCH_CHECK(R <= 65535 && Hkv <= 65535, "sparse_decode_split: too many requests or KV heads");
  const c10::cuda::CUDAGuard guard(query.device());

  SplitArgs a{};
  fill_paged_args(a, query, kv_cache, block_table, seq_lens, sel, sel_count, out, lse);
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
  a.warps = static_cast<int>(warps);
  a.tl = reinterpret_cast<long long*>(tl.data_ptr<int64_t>());
  a.mode = static_cast<int>(mode);
  a.ctr = ctr.data_ptr<int>();
  a.ctr_s0 = ctr.stride(0);
  a.maxsel = static_cast<int>(sel.size(2));
  a.num_blocks = kv_cache.size(0);
  const int64_t smem = static_cast<int64_t>(smem_bytes(D, stages, warps));
  TORCH_CHECK(smem <= max_smem_optin(query.get_device()), "sparse_decode_split: ", warps, " warps x ", stages,
              " stages need ", smem, " bytes of shared memory, more than this GPU has per block");

  const dim3 grid(static_cast<unsigned>(num_splits), static_cast<unsigned>(Hkv), static_cast<unsigned>(R));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (query.scalar_type() == at::kBFloat16)
    dispatch_head<__nv_bfloat16>(a, D, grid, stream);
  else
    dispatch_head<__half>(a, D, grid, stream);
}

void sparse_decode_split_meta(at::Tensor query, at::Tensor kv_cache, at::Tensor block_table,
                              at::Tensor seq_lens, at::Tensor sel, at::Tensor sel_count,
                              double qk_scale, int64_t num_splits, int64_t stages, int64_t warps, at::Tensor out,
                              c10::optional<at::Tensor> lse, at::Tensor ws_acc, at::Tensor ws_m,
                              at::Tensor ws_l, at::Tensor tl, int64_t mode, at::Tensor ctr) {
  check_args(query, kv_cache, block_table, seq_lens, sel, sel_count, num_splits, stages, warps, out, lse,
             ws_acc, ws_m, ws_l);
}

}  // namespace
}  // namespace casakv_exp

TORCH_LIBRARY(casakv_exp, m) {
  m.def(
      "sparse_decode_split(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor sel, Tensor sel_count, float qk_scale, int num_splits, int stages, int warps, "
      "Tensor(a!) out, Tensor(b!)? lse, Tensor(c!) ws_acc, Tensor(d!) ws_m, Tensor(e!) ws_l, Tensor(f!) tl, int mode, Tensor(g!) ctr) -> ()");
}

TORCH_LIBRARY_IMPL(casakv_exp, CUDA, m) { m.impl("sparse_decode_split", &casakv_exp::sparse_decode_split_cuda); }

TORCH_LIBRARY_IMPL(casakv_exp, Meta, m) { m.impl("sparse_decode_split", &casakv_exp::sparse_decode_split_meta); }
