// Device pieces shared by the sweeps' CUDA decode experiments
// (decode_timeline/split_timeline*.cu, decode_cluster/cluster_decode.cu; not
// built by setup.py): tensor-core MMA wrappers, cp.async and ldmatrix helpers,
// a globaltimer read, and the attention of one 16-token chunk held in shared
// memory for the GQA group of one KV head; on the host, the fields every
// experiment's argument struct shares.
//
// Fragments as in FlashAttention-2 (mma.m16n8k16, bf16/fp16 in, fp32
// accumulate): the A operand of Q K^T holds the group's query heads in rows
// 0..group-1 (other rows zero); K^T and V come from shared memory through
// ldmatrix (V transposed); the S accumulators become the A operand of P V in
// registers.  Online softmax per fragment row (lane >> 2), base 2, fp32.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace casakv_sweep {

constexpr int kWarp = 32;
constexpr int kChunk = 16;  // tokens per pipeline stage

__device__ __forceinline__ long long gtimer() {
  long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  // c += a (16x16, row) * b (16x8, col), fp32 accumulate
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from(float x) { return __float2half(x); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
constexpr int kMaxAhead = 5;  // cp_async_wait_dyn's largest n: rings of at most 6 stages
// wait until at most n groups are pending (n is warp-uniform, <= kMaxAhead)
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
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Log-sum-exp merge of N partial softmax states (running max m, base 2; sum
// of exponentials l; unnormalised accumulator a): returns the largest m and
// sets l and a rescaled to it (to 0 where every m is -inf).
template <int N>
__device__ __forceinline__ float lse_merge(const float (&pm)[N], const float (&pl)[N], const float (&pa)[N],
                                           float& sum_l, float& sum_a) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmaxf(mx, pm[i]);
  const float mu = mx == -INFINITY ? 0.f : mx;
  sum_l = 0.f;
  sum_a = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float f = exp2f(pm[i] - mu);
    sum_l += pl[i] * f;
    sum_a += pa[i] * f;
  }
  return mx;
}

// The sequence's last chunk: zero the V rows from `nvalid` on (those cache
// slots may hold NaN, and 0 * NaN would reach the output).  `unit(t, c)` is
// the index of 16-byte unit c of token row t in `buf`; a row has kRowU4 units
// (K, then V).
template <int kRowU4, typename Unit>
__device__ __forceinline__ void zero_tail_v(uint4* buf, Unit unit, int nvalid, int lane) {
  const int first = nvalid > 0 ? nvalid : 0;
  for (int u = lane; u < (kChunk - first) * (kRowU4 / 2); u += kWarp) {
    const int t = first + u / (kRowU4 / 2);
    buf[unit(t, kRowU4 / 2 + u % (kRowU4 / 2))] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncwarp();
}

// One 16-token chunk of attention: tokens >= nvalid are masked out of the
// scores; m / lsum / acc are this lane's running max (base 2), share of the
// sum of exponentials and output fragments.
template <typename T, int D, typename Unit>
__device__ __forceinline__ void attend_chunk(const uint4* buf, Unit unit, const uint32_t (&qa)[D / 16][2],
                                             float (&acc)[D / 8][4], float& m, float& lsum, int nvalid,
                                             int lane, float qk_scale) {
  constexpr int kRowU4 = 2 * D * 2 / 16;
  constexpr int kKs = D / 16;
  constexpr int kNt = D / 8;
  using M = Mma<T>;
  const int quad = lane & 3;

  // S = Q K^T for tokens 0..7 (s[0]) and 8..15 (s[1])
  float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int k2 = 0; k2 < kKs / 2; ++k2) {
      uint32_t b[4];
      const int t = nt * 8 + (lane & 7);
      ldmatrix_x4<false>(b, buf + unit(t, 4 * k2 + (lane >> 3)));
      M::run(s[nt], qa[2 * k2][0], qa[2 * k2][1], b[0], b[1]);
      M::run(s[nt], qa[2 * k2 + 1][0], qa[2 * k2 + 1][1], b[2], b[3]);
    }
  }

  // online softmax of row `lane >> 2` over this chunk's 16 tokens (4 per lane)
  float x[4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      x[2 * nt + e] = (nt * 8 + 2 * quad + e < nvalid) ? s[nt][e] * qk_scale : -INFINITY;
  float cm = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
  cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 1));
  cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 2));
  const float m_new = fmaxf(m, cm);
  const float mu = m_new == -INFINITY ? 0.f : m_new;
  const float alpha = exp2f(m - mu);
  m = m_new;
  float p[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) p[e] = exp2f(x[e] - mu);
  lsum = lsum * alpha + (p[0] + p[1]) + (p[2] + p[3]);
#pragma unroll
  for (int j = 0; j < kNt; ++j) {
    acc[j][0] *= alpha;
    acc[j][1] *= alpha;
  }
  const uint32_t pa0 = M::pack(p[0], p[1]);  // tokens 2quad.. of 0..7
  const uint32_t pa2 = M::pack(p[2], p[3]);  // tokens 8 + 2quad..

  // O += P V
#pragma unroll
  for (int j2 = 0; j2 < kNt / 2; ++j2) {
    uint32_t b[4];
    const int mi = lane >> 3;
    const int t = (mi & 1) * 8 + (lane & 7);
    ldmatrix_x4<true>(b, buf + unit(t, kRowU4 / 2 + 2 * j2 + (mi >> 1)));
    M::run(acc[2 * j2], pa0, pa2, b[0], b[1]);
    M::run(acc[2 * j2 + 1], pa0, pa2, b[2], b[3]);
  }
}

// Host and device: the tensors every experiment's decode reads and writes
// (strides in elements; a page row's d stride and out's d stride are 1).
struct PagedDecodeFields {
  const void* query;
  const void* kv;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* sel;
  const int32_t* sel_count;
  void* out;
  float* lse;  // nullptr: not written
  int64_t q_s0, q_s1;
  int64_t c_blk, c_head;  // token stride 2D
  int64_t bt_s0, bt_s1;
  int64_t sel_s0, sel_s1, sel_s2;
  int64_t sc_s0, sc_s1;
  int64_t o_s0, o_s1;
  int64_t lse_s0, lse_s1;
  int group;  // query heads per KV head (<= 8)
};

// A fragments of Q for KV head `kvh` of request `seq`: row lane >> 2 holds
// query head kvh * group + (lane >> 2) while that is one of the group's,
// zeros otherwise (and rows 8..15 are zero): qa[ks][0] = columns 16ks +
// 2quad.., qa[ks][1] = +8.
template <typename T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[D / 16][2], const PagedDecodeFields& a, int64_t seq,
                                                 int kvh, int lane) {
  const int row = lane >> 2, quad = lane & 3;
  const bool live = row < a.group;
  const T* qrow = static_cast<const T*>(a.query) + seq * a.q_s0 +
                  static_cast<int64_t>(kvh * a.group + (live ? row : 0)) * a.q_s1;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    qa[ks][0] = live ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks + 2 * quad) : 0u;
    qa[ks][1] = live ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks + 8 + 2 * quad) : 0u;
  }
}

// Host: the pointers and strides that every experiment's argument struct
// (fields of the same names) takes from the op's tensors, after checking the
// 16-byte alignment that cp.async and bulk copies need.
inline void fill_paged_args(PagedDecodeFields& a, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                     const at::Tensor& seq_lens, const at::Tensor& sel, const at::Tensor& sel_count,
                     const at::Tensor& out, const c10::optional<at::Tensor>& lse) {
  const uintptr_t align = reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) |
                          reinterpret_cast<uintptr_t>(query.data_ptr()) |
                          static_cast<uintptr_t>(kv_cache.stride(0) * 2) |
                          static_cast<uintptr_t>(kv_cache.stride(1) * 2) |
                          static_cast<uintptr_t>(query.stride(0) * 2) |
                          static_cast<uintptr_t>(query.stride(1) * 2);
  TORCH_CHECK((align & 15) == 0, "kv_cache / query must be 16-byte aligned");
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
}

}  // namespace casakv_sweep
