// Flash-attention-style forward for one block: softmax(scale * Q K^T) V over one (batch, head) and
// kBlockM query rows. Non-causal, no mask, fp16/bf16 in and out, fp32 accumulation.
//
// Layout: q [B, Sq, H, D], k/v [B, Sk, H, D], out [B, Sq, H, D], row-major and contiguous, i.e. the
// packed [B, S, H*D] tensors of the exporter contract. Any Sq, Sk >= 0 (partial tiles are
// zero-filled on load, masked to -inf in the scores and not stored).
//
// Per K/V tile (FA2 scheme, one K and one V buffer, each load overlapping the other half's math):
//   wait K[j]; sync; issue V[j]   | S = Q K[j]^T (mma m16n8k16, plus one m16n8k8 step when D % 16 == 8)
//                                 | online softmax in registers (exp2, scale folded into one FMA)
//   wait V[j]; sync; issue K[j+1] | O += P V[j]   (P re-packed from the S accumulators, no smem trip)
// Epilogue: O / rowsum -> shared (staging) -> 16-byte coalesced stores of the rows < Sq.
//
// Requires attention_config.cuh and one primitives header (sm80_primitives.cuh on the device,
// emu/emu_primitives.h in the host emulator) to be included first.
#pragma once

#include <math.h>

#include "attention_config.cuh"

namespace sd {

// Copy kRows rows (D elements each; consecutive rows `row_stride` elements apart in global memory)
// into shared memory with row stride kStride. Rows >= valid_rows are zero-filled and not read.
template <class T, int D, int kRows>
SD_INLINE void load_tile(T* smem, const T* gmem, const T* fallback, long long row_stride,
                         int valid_rows, int tid) {
  using S = AttnShape<D>;
  constexpr int kTotal = kRows * S::kChunks;
  constexpr int kIters = (kTotal + S::kThreads - 1) / S::kThreads;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int c = tid + i * S::kThreads;
    if (kTotal % S::kThreads == 0 || c < kTotal) {
      const int r = c / S::kChunks, ch = c - r * S::kChunks;
      const bool ok = r < valid_rows;
      const T* src = ok ? gmem + r * row_stride + ch * 8 : fallback;
      cp_async_16(smem + r * S::kStride + ch * 8, src, ok);
    }
  }
}

template <class T, int D>
SD_INLINE void attention_block(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, T* __restrict__ out, int B, int Sq, int Sk,
                               int H, float scale, char* smem_raw, int tid, int m_block, int bh) {
  using S = AttnShape<D>;
  using M = Mma<T>;
  constexpr int MT = S::kMTiles, NT = S::kNTiles, DT = S::kDTiles, KS = S::kKSteps;
  constexpr int ST = S::kStride;
  const int m0 = m_block * S::kBlockM;
  if (bh >= B * H || m0 >= Sq) return;  // whole block leaves together (oversized grids are safe)

  T* sK = reinterpret_cast<T*>(smem_raw);  // [kBlockN][ST]
  T* sQV = sK + S::kBlockN * ST;           // [kQRows][ST]: the Q tile, then V tiles, then O staging
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // MMA fragment: row group, thread in group
  const int b = bh / H, h = bh - b * H;
  const long long row_stride = (long long)H * D;  // elements between consecutive tokens
  const T* q_head = q + ((long long)b * Sq * H + h) * D;  // token 0 of (b, h)
  const T* k_head = k + ((long long)b * Sk * H + h) * D;
  const T* v_head = v + ((long long)b * Sk * H + h) * D;
  T* o_head = out + ((long long)b * Sq * H + h) * D;

  // Prologue: the Q tile and the first K tile in flight; Q -> registers.
  load_tile<T, D, S::kBlockM>(sQV, q_head + m0 * row_stride, q_head, row_stride, Sq - m0, tid);
  cp_async_commit();
  load_tile<T, D, S::kBlockN>(sK, k_head, k_head, row_stride, Sk, tid);
  cp_async_commit();
  cp_async_wait<1>();
  block_sync();

  uint32_t qf[MT][KS][4];  // A fragments of Q, k16 steps over the head dim
  uint32_t qt[MT][2];      // A fragment of the k8 tail (only when D % 16 == 8)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row0 = warp * S::kWarpRows + mt * 16;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
      ldmatrix_x4(qf[mt][kk],
                  sQV + (row0 + lane % 8 + ((lane / 8) % 2) * 8) * ST + kk * 16 + (lane / 16) * 8);
    }
    if constexpr (S::kKTail) ldmatrix_x2(qt[mt], sQV + (row0 + lane % 16) * ST + KS * 16);
  }

  float o[MT][DT][4];                      // O accumulators: rows (g, g + 8), cols 2t, 2t + 1
  float row_max[MT][2], row_sum[MT][2];    // running max (scaled, log2 units), partial row sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const float scale_log2 = scale * 1.4426950408889634f;  // softmax via exp2
  const int n_tiles = (Sk + S::kBlockN - 1) / S::kBlockN;

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * S::kBlockN;
    cp_async_wait<0>();
    block_sync();  // K tile j landed; every warp is done with V tile j - 1 (and with the Q tile)
    load_tile<T, D, S::kBlockN>(sQV, v_head + n0 * row_stride, v_head, row_stride, Sk - n0, tid);
    cp_async_commit();

    // S = Q K^T: [kWarpRows x kBlockN] per warp, as MT x NT m16n8 accumulators.
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        // B fragments from K rows: (keys nt, d lo), (keys nt, d hi), (keys nt+1, d lo), (keys nt+1, d hi)
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + (nt * 8 + lane % 8 + (lane / 16) * 8) * ST + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::m16n8k16(s[mt][nt], qf[mt][kk], kb[0], kb[1]);
          M::m16n8k16(s[mt][nt + 1], qf[mt][kk], kb[2], kb[3]);
        }
      }
      if constexpr (S::kKTail) {
        uint32_t kb[2];  // (keys nt, d tail), (keys nt+1, d tail)
        ldmatrix_x2(kb, sK + (nt * 8 + lane % 16) * ST + KS * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::m16n8k8(s[mt][nt], qt[mt], kb[0]);
          M::m16n8k8(s[mt][nt + 1], qt[mt], kb[1]);
        }
      }
    }

    if (n0 + S::kBlockN > Sk) {  // partial last tile: keys >= Sk do not exist
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (n0 + nt * 8 + 2 * t + (e & 1) >= Sk) s[mt][nt][e] = -INFINITY;
    }

    // Online softmax; this thread holds rows g (r = 0) and g + 8 (r = 1) of each m-tile, and the
    // four threads of a quad together hold a whole row.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_new = fmaxf(row_max[mt][r], mx * scale_log2);  // scale > 0
        const float m_use = m_new == -INFINITY ? 0.f : m_new;        // all -inf: avoid inf - inf
        const float alpha = fast_exp2(row_max[mt][r] - m_use);
        row_max[mt][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          s[mt][nt][2 * r] = fast_exp2(fmaf(s[mt][nt][2 * r], scale_log2, -m_use));
          s[mt][nt][2 * r + 1] = fast_exp2(fmaf(s[mt][nt][2 * r + 1], scale_log2, -m_use));
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][2 * r] *= alpha;
          o[mt][dt][2 * r + 1] *= alpha;
        }
      }
    }

    cp_async_wait<0>();
    block_sync();  // V tile j landed; every warp is done with K tile j
    if (j + 1 < n_tiles) {
      load_tile<T, D, S::kBlockN>(sK, k_head + (n0 + S::kBlockN) * row_stride, k_head, row_stride,
                                  Sk - n0 - S::kBlockN, tid);
      cp_async_commit();
    }

    // O += P V: k16 steps over the keys of the tile, n8 tiles over the head dim (40 = 5 x 8).
#pragma unroll
    for (int ks = 0; ks < S::kBlockN / 16; ++ks) {
      uint32_t pa[MT][4];  // the S accumulators of n-tiles 2ks, 2ks+1 are exactly an A fragment
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = M::pack(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        pa[mt][1] = M::pack(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        pa[mt][2] = M::pack(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        pa[mt][3] = M::pack(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt + 1 < DT; dt += 2) {
        // transposed: (keys lo, d dt), (keys hi, d dt), (keys lo, d dt+1), (keys hi, d dt+1)
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sQV + (ks * 16 + lane % 8 + ((lane / 8) % 2) * 8) * ST + dt * 8 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::m16n8k16(o[mt][dt], pa[mt], vb[0], vb[1]);
          M::m16n8k16(o[mt][dt + 1], pa[mt], vb[2], vb[3]);
        }
      }
      if constexpr (DT % 2 == 1) {
        uint32_t vb[2];  // (keys lo, last d tile), (keys hi, last d tile)
        ldmatrix_x2_trans(vb, sQV + (ks * 16 + lane % 16) * ST + (DT - 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) M::m16n8k16(o[mt][DT - 1], pa[mt], vb[0], vb[1]);
      }
    }
  }

  // Epilogue: finish the row sums across the quad, normalise, stage in shared, store coalesced.
  float inv[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      inv[mt][r] = sum > 0.f ? 1.f / sum : 0.f;  // Sk == 0 gives zeros, not NaN
    }
  cp_async_wait<0>();
  block_sync();  // every warp is done reading the last V tile
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      T* row = sQV + (warp * S::kWarpRows + mt * 16 + g + 8 * r) * ST + 2 * t;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        st_shared_b32(row + dt * 8, M::pack(o[mt][dt][2 * r] * inv[mt][r], o[mt][dt][2 * r + 1] * inv[mt][r]));
    }
  block_sync();
  constexpr int kOut = S::kBlockM * S::kChunks;
#pragma unroll
  for (int i = 0; i < (kOut + S::kThreads - 1) / S::kThreads; ++i) {
    const int c = tid + i * S::kThreads;
    const int r = c / S::kChunks, ch = c - r * S::kChunks;
    if ((kOut % S::kThreads == 0 || c < kOut) && m0 + r < Sq)
      copy_16(o_head + (m0 + r) * row_stride + ch * 8, sQV + r * ST + ch * 8);
  }
}

}  // namespace sd
