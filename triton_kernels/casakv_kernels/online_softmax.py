"""The online-softmax step shared by every attention kernel in this package."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(
    acc,  # [BLOCK_M, BLOCK_D] fp32 unnormalised output
    m_i,  # [BLOCK_M] fp32 running max (base-2 scaled scores)
    l_i,  # [BLOCK_M] fp32 running sum of exp2
    s,  # [BLOCK_M, BLOCK_N] fp32 raw scores q.k (unscaled), masked with -inf
    qk_scale,  # softmax scale * log2(e), > 0
    v,  # [BLOCK_N, BLOCK_D] V tile, already in the query dtype
    MAY_BE_EMPTY: tl.constexpr,  # a row of s may be all -inf (masked tiles)
    FP32_DOT: tl.constexpr,  # fp32 operands, IEEE products
):
    """Fold one KV tile into (acc, m, l); P is rounded to V's dtype before P @ V.

    The scale is applied inside the exponent (one FMA per score): with
    ``qk_scale > 0``, ``max(s) * scale == max(s * scale)``.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    if MAY_BE_EMPTY:
        # Rows with nothing visible yet keep m = -inf; shift by 0 to avoid NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if FP32_DOT:
        pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p, v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i
