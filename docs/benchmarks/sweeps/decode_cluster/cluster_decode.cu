// EXPERIMENT (not built by setup.py): split-KV sparse decode in ONE launch,
// the splits of each (request, KV head) being the CTAs of one thread-block
// cluster that merge through distributed shared memory.  No workspaces, no
// merge kernel.  Op: casakv_cl::cluster_decode.  Driver: cluster.py; results
// in ../README.md, "Decode: one launch, the splits merged inside a
// thread-block cluster".
//
// Semantics: those of the split stage + merge of
// triton_kernels/sparse_decode.py with physical block ids (sel_physical=True):
// query [R, Hq, D], kv_cache [blocks, Hkv, block_size, 2D] (K | V per token,
// every (block, KV head) page contiguous), sel [R, Hkv, MAXSEL] physical ids,
// ascending, sel_count [R, Hkv]; out [R, Hq, D] in the query dtype, lse fp32
// natural log (optional).  A row with count 0 gives 0 and lse -inf.
//
// Grid (C, Hkv, R), cluster (C, 1, 1): CTA `rank` of the cluster owns the
// slice [rank * per, min((rank + 1) * per, count)) of its row's selection,
// per = cdiv(count, C); the page ids are loaded with bounds guessed from
// MAXSEL, alongside the count (reloaded if the count differs).  Inside a CTA
// each warp streams its 16-token chunks (warp w: chunks w, w + W, ...)
// through its own ring of `stages` shared buffers, and attends to each with
// tensor cores (../decode_chunk.cuh).  Then the warps combine through shared
// memory into the CTA's partial (m, l, acc per query head, base 2), and the
// cluster merges:
//   * pull (mode bit 4 clear): a cluster barrier makes every partial
//     visible, each CTA merges a share of the outputs reading all C partials
//     through DSMEM, and a second barrier keeps the shared memory alive until
//     every CTA has read it;
//   * push (mode bit 4): each CTA stores its values of every output into the
//     shared memory of the CTA that owns that output (output idx is owned by
//     rank idx % C), one cluster barrier, and each CTA merges its own outputs
//     locally.  A relaxed cluster arrive at the start, waited on before the
//     first remote store, makes sure every CTA of the cluster has started.
//
// mode bits: 1 loads only (no attention; out not written), 2 one bulk copy
// (cp.async.bulk on an mbarrier) per token row into rows padded by 16 bytes
// instead of cp.async into XOR-swizzled rows, 4 push, 8 L2 hints (K/V pages
// evict_first, page ids evict_last), 16 (diagnostic) run the CTA combine once
// more before the real one.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../decode_chunk.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace casakv_cl {
namespace {
namespace cg = cooperative_groups;
using namespace casakv_sweep;

constexpr int kMaxWarps = 8;
constexpr int kMaxStages = 8;
constexpr int kMaxGroup = 8;
constexpr int kMaxCluster = 16;
// A CTA's partial (pull: m[8], l[8], acc[8][D], read by the cluster) or
// its inbox (push: m, l from every rank, then each rank's values of the
// outputs this CTA owns), in floats.
__host__ __device__ constexpr int part_floats(int d) {
  return kMaxGroup * (d + 2) > kMaxCluster * 2 * kMaxGroup + kMaxGroup * d + kMaxCluster
             ? kMaxGroup * (d + 2)
             : kMaxCluster * 2 * kMaxGroup + kMaxGroup * d + kMaxCluster;
}
constexpr int kPush = 4;  // mode bit: push the partials into their owners' shared memory
constexpr int kHints = 8;   // mode bit: L2 hints, K/V pages evict_first, page ids evict_last
constexpr int kWarm = 16;   // mode bit (diagnostic): run the CTA combine once more before the real one
// start, issued, 1st chunk, warp 0 loop end, all loops end, partials stored, warm pass, CTA combined
// (and pushed), cluster barrier, merged, end
constexpr int kStamps = 11;

struct Args : PagedDecodeFields {
  float qk_scale;  // softmax scale * log2(e)
  int block_size;
  int stages;
  int warps;
  int mode;
  int maxsel;     // sel.size(2): the split bounds are guessed from it (fast start)
  long long* tl;  // nullptr or [CTAs, kStamps] globaltimer stamps
};

__device__ __forceinline__ void cp_async16_hint(void* smem, const void* gmem, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "l"(pol)
               : "memory");
}
__device__ __forceinline__ uint64_t policy_evict_first() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ uint64_t policy_evict_last() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ int ld_hint(const int32_t* p, uint64_t pol) {
  int v;
  asm volatile("ld.global.L2::cache_hint.b32 %0, [%1], %2;\n" : "=r"(v) : "l"(p), "l"(pol));
  return v;
}
// mbarrier + bulk copy (sm_90)
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(phase)
        : "memory");
  }
}
__device__ __forceinline__ void bulk_g2s(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(smem)),
      "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void bulk_g2s_hint(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar,
                                              uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          smem_addr(smem)),
      "l"(gmem), "r"(bytes), "r"(smem_addr(bar)), "l"(pol)
      : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 16-byte unit c of token row t in a chunk buffer.  Swizzled (cp.async):
// rows of kRowU4 units, unit c at c ^ (t & 7).  Padded (bulk copies): rows of
// kRowU4 + 1 units, unit c at c; the extra unit shifts each row by 4 banks.
template <int kRowU4, bool kPad>
__device__ __forceinline__ int unit(int t, int c) {
  if constexpr (kPad)
    return t * (kRowU4 + 1) + c;
  else
    return t * kRowU4 + (c ^ (t & 7));
}

template <typename T, int D, bool kBulk>
__global__ void __launch_bounds__(kMaxWarps* kWarp) cluster_decode_kernel(const Args a) {
  static_assert(D == 64 || D == 128, "head size 64 or 128");
  constexpr int kRowU4 = 2 * D * 2 / 16;                      // 16-byte units per token row (K | V)
  constexpr int kBufU4 = kChunk * (kRowU4 + (kBulk ? 1 : 0));  // units per chunk buffer
  constexpr int kKs = D / 16;
  constexpr int kNt = D / 8;
  constexpr int kPartF = part_floats(D);  // pull: m[8], l[8], acc[8][D]; push: the inbox

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int C = static_cast<int>(cluster.num_blocks());
  const long long t_start = a.tl != nullptr ? gtimer() : 0;
  const int64_t cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int kvh = blockIdx.y;
  const int64_t seq = blockIdx.z;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int row = lane >> 2;
  const int quad = lane & 3;
  const int nw = a.warps;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* part = reinterpret_cast<float*>(smem_raw);  // read by the whole cluster
  uint64_t* bars = reinterpret_cast<uint64_t*>(part + kPartF);  // [warps][stages]
  uint4* ring_base = reinterpret_cast<uint4*>(bars + kMaxWarps * kMaxStages);
  uint4* ring = ring_base + warp * a.stages * kBufU4;
  uint64_t* my_bars = bars + warp * kMaxStages;
  if constexpr (kBulk) {
    if (lane == 0) {
      for (int s = 0; s < a.stages; ++s) mbar_init(my_bars + s, 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncwarp();
  }
  const bool push = (a.mode & kPush) != 0;
  // push: before any remote store, every CTA of the cluster must have started
  if (push) asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");

  // Fast start: the page ids are loaded with split bounds guessed from
  // MAXSEL, alongside the count; reloaded when the count differs.
  const int cpp = a.block_size / kChunk;
  const int32_t* sel_row = a.sel + seq * a.sel_s0 + kvh * a.sel_s1;
  auto bounds = [&](int cnt, int& s0_, int& s1_, int& my_n_) {
    const int per_ = (cnt + C - 1) / C;
    s0_ = rank * per_;
    s1_ = min(s0_ + per_, cnt);
    const int nch = max(s1_ - s0_, 0) * cpp;
    my_n_ = warp < nch ? (nch - warp + nw - 1) / nw : 0;
  };
  int s0, s1, my_n;
  bounds(a.maxsel, s0, s1, my_n);
  // lane j holds the page id of this warp's chunk j (j < 32)
  const bool hints = (a.mode & kHints) != 0;
  const uint64_t pol_first = policy_evict_first(), pol_last = policy_evict_last();
  auto id_at = [&](int k) { return hints ? ld_hint(sel_row + k * a.sel_s2, pol_last) : sel_row[k * a.sel_s2]; };
  int id_lane = lane < my_n ? id_at(s0 + (warp + lane * nw) / cpp) : 0;
  const int count = a.sel_count[seq * a.sc_s0 + kvh * a.sc_s1];
  if (count != a.maxsel) {
    bounds(count, s0, s1, my_n);
    id_lane = lane < my_n ? id_at(s0 + (warp + lane * nw) / cpp) : 0;
  }
  const int npages = max(s1 - s0, 0);

  const T* kv_head = static_cast<const T*>(a.kv) + kvh * a.c_head;
  auto page_of = [&](int i) -> int64_t {
    int p = __shfl_sync(0xffffffffu, id_lane, i & 31);
    if (i >= 32) p = id_at(s0 + (warp + i * nw) / cpp);
    return p;
  };
  auto issue = [&](int i, int slot) {  // whole warp
    const int c = warp + i * nw;
    const int64_t phys = page_of(i);
    const T* src = kv_head + phys * a.c_blk + static_cast<int64_t>(c % cpp) * kChunk * 2 * D;
    uint4* dst = ring + slot * kBufU4;
    if constexpr (kBulk) {
      if (lane == 0) mbar_expect_tx(my_bars + slot, kChunk * 2 * D * 2);
      __syncwarp();
      if (lane < kChunk)
      {
        if (hints)
          bulk_g2s_hint(dst + unit<kRowU4, true>(lane, 0), src + lane * 2 * D, 2 * D * 2, my_bars + slot, pol_first);
        else
          bulk_g2s(dst + unit<kRowU4, true>(lane, 0), src + lane * 2 * D, 2 * D * 2, my_bars + slot);
      }
    } else {
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
#pragma unroll
      for (int j = 0; j < kChunk * kRowU4 / kWarp; ++j) {
        const int u = j * kWarp + lane;
        if (hints)
          cp_async16_hint(dst + unit<kRowU4, false>(u / kRowU4, u % kRowU4), s4 + u, pol_first);
        else
          cp_async16(dst + unit<kRowU4, false>(u / kRowU4, u % kRowU4), s4 + u);
      }
    }
  };
  const int ahead = kBulk ? a.stages : a.stages - 1;
  for (int i = 0; i < ahead; ++i) {
    if (i < my_n) issue(i, i);
    if constexpr (!kBulk) cp_async_commit();
  }

  // tail of the sequence's last block (masked), looked up after the first copies
  const int seq_len = a.seq_lens[seq];
  int valid = npages * a.block_size;
  if (npages > 0 && s1 == count && seq_len > 0) {
    const int last_blk = (seq_len - 1) / a.block_size;
    const int last_phys = a.block_table[seq * a.bt_s0 + last_blk * a.bt_s1];
    if (sel_row[(count - 1) * a.sel_s2] == last_phys) valid -= (last_blk + 1) * a.block_size - seq_len;
  }

  uint32_t qa[kKs][2];
  load_q_fragments<T, D>(qa, a, seq, kvh, lane);
  float acc[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m = -INFINITY, lsum = 0.f;

  long long* stamp = a.tl != nullptr && threadIdx.x == 0 ? a.tl + cta * kStamps : nullptr;
  if (stamp) {
    stamp[0] = t_start;
    stamp[1] = gtimer();
  }
  const auto unit_of = [](int t, int c) { return unit<kRowU4, kBulk>(t, c); };
  int slot = 0;
  uint32_t phase = 0;
  for (int i = 0; i < my_n; ++i) {
    if constexpr (kBulk) {
      mbar_wait(my_bars + slot, phase);
    } else {
      const int nxt = i + ahead;
      if (nxt < my_n) issue(nxt, nxt % a.stages);
      cp_async_commit();
      cp_async_wait_dyn(ahead);
      __syncwarp();
    }
    if (stamp && i == 0) stamp[2] = gtimer();
    uint4* buf = ring + slot * kBufU4;
    if (!(a.mode & 1)) {
      const int nvalid = min(kChunk, valid - (warp + i * nw) * kChunk);
      if (nvalid < kChunk) zero_tail_v<kRowU4>(buf, unit_of, nvalid, lane);
      attend_chunk<T, D>(buf, unit_of, qa, acc, m, lsum, nvalid, lane, a.qk_scale);
    }
    __syncwarp();  // every lane is done with this slot
    if constexpr (kBulk) {
      const int nxt = i + a.stages;
      if (nxt < my_n) {
        fence_proxy_async();  // generic-proxy reads / writes of the slot before the async refill
        issue(nxt, slot);
      }
      if (slot + 1 == a.stages) phase ^= 1u;
    }
    slot = slot + 1 == a.stages ? 0 : slot + 1;
  }
  if constexpr (!kBulk) cp_async_wait<0>();
  if (stamp) stamp[3] = gtimer();
  lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
  lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);

  // the CTA's warps -> its partial (part: m[8], l[8], acc[8][D])
  __syncthreads();  // the rings are free
  if (stamp) stamp[4] = gtimer();
  constexpr int kAccRow = D + 8;  // padded: a quarter-warp's float2 stores hit 32 banks
  float* wm = reinterpret_cast<float*>(ring_base);
  float* wl = wm + nw * 8;
  float* wacc = wl + nw * 8;
  if (quad == 0) {
    wm[warp * 8 + row] = m;
    wl[warp * 8 + row] = lsum;
  }
#pragma unroll
  for (int j = 0; j < kNt; ++j)
    *reinterpret_cast<float2*>(wacc + (warp * 8 + row) * kAccRow + 8 * j + 2 * quad) = make_float2(acc[j][0], acc[j][1]);
  __syncthreads();
  if (stamp) stamp[5] = gtimer();
  const int outs = a.group * D;
  const int own = (outs + C - 1) / C;  // outputs each rank merges (push)
  float* in_ml = part;                               // push inbox: [C][2 * kMaxGroup]
  float* in_acc = part + kMaxCluster * 2 * kMaxGroup;  // push inbox: [C][own]
  auto combine = [&](bool real) {
    for (int idx = threadIdx.x; idx < outs; idx += nw * kWarp) {
      const int g = idx / D, d = idx % D;
      // unrolled over kMaxWarps (predicated) so that every load is issued at once
      float wmv[kMaxWarps], wlv[kMaxWarps], wav[kMaxWarps];
#pragma unroll
      for (int w = 0; w < kMaxWarps; ++w) {
        wmv[w] = w < nw ? wm[w * 8 + g] : -INFINITY;
        wlv[w] = w < nw ? wl[w * 8 + g] : 0.f;
        wav[w] = w < nw ? wacc[(w * 8 + g) * kAccRow + d] : 0.f;
      }
      float sum_l, sum_a;
      const float mx = lse_merge(wmv, wlv, wav, sum_l, sum_a);
      if (!real) {  // a store the compiler cannot drop, that never happens for finite data
        if (sum_a != sum_a && sum_l == 12345.f) wacc[0] = sum_a;
        continue;
      }
      if (push) {
        cluster.map_shared_rank(in_acc, idx % C)[rank * own + idx / C] = sum_a;
        if (d == 0) {
          for (int c = 0; c < C; ++c) {
            float* ml = cluster.map_shared_rank(in_ml, c) + rank * 2 * kMaxGroup;
            ml[g] = mx;
            ml[kMaxGroup + g] = sum_l;
          }
        }
      } else {
        part[2 * kMaxGroup + g * D + d] = sum_a;
        if (d == 0) {
          part[g] = mx;
          part[kMaxGroup + g] = sum_l;
        }
      }
    }
  };
  if (a.mode & kWarm) combine(false);
  if (stamp) stamp[6] = gtimer();
  if (push) asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  combine(true);

  if (stamp) stamp[7] = gtimer();
  // every CTA's partial (pull) or pushed values (push) -> visible to the cluster
  cluster.sync();
  if (stamp) stamp[8] = gtimer();
  // output (g, d) from the C ranks' values; fetch(c, m, l, acc) reads rank c's
  auto merge_out = [&](int g, int d, auto fetch) {
    float pm[kMaxCluster], pl[kMaxCluster], pa[kMaxCluster];
#pragma unroll
    for (int c = 0; c < kMaxCluster; ++c) {  // every load issued before any is used
      pm[c] = -INFINITY;
      pl[c] = 0.f;
      pa[c] = 0.f;
      if (c < C) fetch(c, pm[c], pl[c], pa[c]);
    }
    float sum_l, sum_a;
    const float mx = lse_merge(pm, pl, pa, sum_l, sum_a);
    const float mu = mx == -INFINITY ? 0.f : mx;
    const int64_t head = static_cast<int64_t>(kvh) * a.group + g;
    if (!(a.mode & 1)) {
      const float inv = sum_l == 0.f ? 0.f : 1.f / sum_l;
      static_cast<T*>(a.out)[seq * a.o_s0 + head * a.o_s1 + d] = Mma<T>::from(sum_a * inv);
      if (a.lse != nullptr && d == 0)
        a.lse[seq * a.lse_s0 + head * a.lse_s1] =
            sum_l == 0.f ? -INFINITY : (mu + log2f(sum_l)) * 0.6931471805599453f;
    }
  };
  if (push) {  // merge the outputs this CTA owns from its own inbox
    for (int j = threadIdx.x; j < own && j * C + rank < outs; j += nw * kWarp) {
      const int idx = j * C + rank;
      const int g = idx / D;
      merge_out(g, idx % D, [&](int c, float& mm, float& ll, float& aa) {
        mm = in_ml[c * 2 * kMaxGroup + g];
        ll = in_ml[c * 2 * kMaxGroup + kMaxGroup + g];
        aa = in_acc[c * own + j];
      });
    }
    if (stamp) stamp[9] = stamp[10] = gtimer();
    return;  // nothing reads this CTA's shared memory any more
  }
  for (int idx = rank + C * static_cast<int>(threadIdx.x); idx < outs; idx += C * nw * kWarp) {
    const int g = idx / D, d = idx % D;
    merge_out(g, d, [&](int c, float& mm, float& ll, float& aa) {  // from rank c's shared memory
      const float* rp = cluster.map_shared_rank(part, c);
      mm = rp[g];
      ll = rp[kMaxGroup + g];
      aa = rp[2 * kMaxGroup + g * D + d];
    });
  }
  if (stamp) stamp[9] = gtimer();
  cluster.sync();  // no CTA leaves while another still reads its partial
  if (stamp) stamp[10] = gtimer();
}

size_t smem_bytes(int64_t d, int64_t stages, int64_t warps, bool bulk, int64_t floor_bytes) {
  const size_t head = static_cast<size_t>(part_floats(static_cast<int>(d))) * sizeof(float) + kMaxWarps * kMaxStages * 8;
  const size_t row = static_cast<size_t>(2 * d * 2 + (bulk ? 16 : 0));
  const size_t ring = static_cast<size_t>(warps * stages) * kChunk * row;
  const size_t combine = static_cast<size_t>(warps * 8 * (d + 8 + 2)) * sizeof(float);
  return std::max(head + std::max(ring, combine), static_cast<size_t>(floor_bytes));
}

int max_smem_optin(int dev) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

template <typename T, int D, bool kBulk>
void prepare(int dev) {
  static bool done[64] = {};
  if (dev < 64 && !done[dev]) {
    auto kernel = cluster_decode_kernel<T, D, kBulk>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_optin(dev)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    done[dev] = true;
  }
}

cudaLaunchConfig_t config(dim3 grid, int warps, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attr,
                          int cluster) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(warps * kWarp, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

template <typename T, int D, bool kBulk>
void launch(const Args& a, int cluster, dim3 grid, size_t smem, cudaStream_t stream) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  prepare<T, D, kBulk>(dev);
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = config(grid, a.warps, smem, stream, attr, cluster);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, cluster_decode_kernel<T, D, kBulk>, a));
}

void cluster_decode_cuda(at::Tensor query, at::Tensor kv_cache, at::Tensor block_table, at::Tensor seq_lens,
                         at::Tensor sel, at::Tensor sel_count, double qk_scale, int64_t cluster, int64_t stages,
                         int64_t warps, int64_t smem_floor, at::Tensor out, c10::optional<at::Tensor> lse,
                         c10::optional<at::Tensor> tl, int64_t mode) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4, "cluster_decode: query [R, H, D], kv [blocks, Hkv, bs, 2D]");
  const int64_t R = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t Hkv = kv_cache.size(1), bs = kv_cache.size(2);
  TORCH_CHECK(D == 64 || D == 128, "cluster_decode: head_size must be 64 or 128");
  TORCH_CHECK(kv_cache.size(3) == 2 * D && kv_cache.stride(3) == 1 && kv_cache.stride(2) == 2 * D,
              "cluster_decode: each (block, KV head) page must be contiguous [bs, 2D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == query.scalar_type() &&
                  (query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf),
              "cluster_decode: bf16 or fp16, the same for query, kv_cache and out");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxGroup, "cluster_decode: GQA group of at most 8");
  TORCH_CHECK(bs % kChunk == 0, "cluster_decode: block_size must be a multiple of 16");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "cluster_decode: query/out rows must be contiguous");
  TORCH_CHECK(sel.dim() == 3 && sel.size(0) == R && sel.size(1) == Hkv, "cluster_decode: sel [R, Hkv, MAXSEL]");
  TORCH_CHECK(sel_count.dim() == 2 && sel_count.size(0) == R && sel_count.size(1) == Hkv,
              "cluster_decode: sel_count [R, Hkv]");
  for (const at::Tensor* t : {&block_table, &seq_lens, &sel, &sel_count})
    TORCH_CHECK(t->scalar_type() == at::kInt, "cluster_decode: index tensors must be int32");
  TORCH_CHECK(cluster >= 1 && cluster <= kMaxCluster, "cluster_decode: cluster size in [1, 16]");
  if (tl.has_value())
    TORCH_CHECK(tl->scalar_type() == at::kLong && tl->numel() >= cluster * Hkv * R * kStamps,
                "cluster_decode: tl must be int64 with CTAs x 11 entries");
  TORCH_CHECK(stages >= 1 && stages <= kMaxStages && warps >= 1 && warps <= kMaxWarps,
              "cluster_decode: stages in [1, 8], warps in [1, 8]");
  const bool bulk = (mode & 2) != 0;
  TORCH_CHECK(bulk || (stages >= 2 && stages <= kMaxAhead + 1), "cluster_decode: cp.async needs 2 to 6 stages");
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  Args a{};
  fill_paged_args(a, query, kv_cache, block_table, seq_lens, sel, sel_count, out, lse);
  a.qk_scale = static_cast<float>(qk_scale);
  a.group = static_cast<int>(H / Hkv);
  a.block_size = static_cast<int>(bs);
  a.stages = static_cast<int>(stages);
  a.warps = static_cast<int>(warps);
  a.mode = static_cast<int>(mode);
  a.maxsel = static_cast<int>(sel.size(2));
  a.tl = tl.has_value() ? reinterpret_cast<long long*>(tl->data_ptr<int64_t>()) : nullptr;
  const size_t smem = smem_bytes(D, stages, warps, bulk, smem_floor);
  TORCH_CHECK(static_cast<int64_t>(smem) <= max_smem_optin(query.get_device()), "cluster_decode: too much smem");
  const dim3 grid(static_cast<unsigned>(cluster), static_cast<unsigned>(Hkv), static_cast<unsigned>(R));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int cl = static_cast<int>(cluster);
  const bool bf = query.scalar_type() == at::kBFloat16;
#define CL_LAUNCH(T, DD, B) launch<T, DD, B>(a, cl, grid, smem, stream)
  if (bf && D == 128 && bulk) CL_LAUNCH(__nv_bfloat16, 128, true);
  else if (bf && D == 128) CL_LAUNCH(__nv_bfloat16, 128, false);
  else if (bf && bulk) CL_LAUNCH(__nv_bfloat16, 64, true);
  else if (bf) CL_LAUNCH(__nv_bfloat16, 64, false);
  else if (D == 128 && bulk) CL_LAUNCH(__half, 128, true);
  else if (D == 128) CL_LAUNCH(__half, 128, false);
  else if (bulk) CL_LAUNCH(__half, 64, true);
  else CL_LAUNCH(__half, 64, false);
#undef CL_LAUNCH
}

// How many clusters of this shape the GPU holds at once (cudaOccupancyMaxActiveClusters).
int64_t max_active_clusters(int64_t cluster, int64_t stages, int64_t warps, int64_t smem_floor, int64_t head_size,
                            int64_t mode) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const bool bulk = (mode & 2) != 0;
  const size_t smem = smem_bytes(head_size, stages, warps, bulk, smem_floor);
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = config(dim3(cluster, 8, 1), static_cast<int>(warps), smem, nullptr, attr,
                                  static_cast<int>(cluster));
  int n = 0;
  if (head_size == 128 && bulk) {
    prepare<__nv_bfloat16, 128, true>(dev);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, cluster_decode_kernel<__nv_bfloat16, 128, true>, &cfg));
  } else {
    prepare<__nv_bfloat16, 128, false>(dev);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, cluster_decode_kernel<__nv_bfloat16, 128, false>, &cfg));
  }
  return n;
}

}  // namespace
}  // namespace casakv_cl

TORCH_LIBRARY(casakv_cl, m) {
  m.def(
      "cluster_decode(Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor sel, "
      "Tensor sel_count, float qk_scale, int cluster, int stages, int warps, int smem_floor, Tensor(a!) out, "
      "Tensor(b!)? lse, Tensor(c!)? tl, int mode) -> ()");
  m.def("max_active_clusters(int cluster, int stages, int warps, int smem_floor, int head_size, int mode) -> int",
        &casakv_cl::max_active_clusters);
}

TORCH_LIBRARY_IMPL(casakv_cl, CUDA, m) { m.impl("cluster_decode", &casakv_cl::cluster_decode_cuda); }
