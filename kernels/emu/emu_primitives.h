// Host emulation of the primitives in ../sm80_primitives.cuh, for testing the kernel body on a CPU.
//
// Every CUDA thread of a block is a std::thread; __syncthreads is a std::barrier over the block and
// warp-collective instructions (ldmatrix, mma.sync, shfl) exchange operands through per-warp slots
// between two warp barriers. Fragment layouts follow the PTX ISA documentation:
//   ldmatrix: lane i addresses row i % 8 of matrix i / 8; lane l receives row l / 4, elements
//             2 (l % 4) and 2 (l % 4) + 1 (with .trans: rows 2 (l % 4), 2 (l % 4) + 1 of column l / 4).
//   mma m16n8k16: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
//                 b0 (k 2t.., n g), b1 (k 2t + 8.., n g); c0, c1 (g, 2t..), c2, c3 (g + 8, 2t..)
//                 with g = lane / 4, t = lane % 4; the low 16 bits hold the lower k / column index.
// cp.async copies immediately (the wait is a no-op). Alignment and bounds of every shared and
// global access made through these functions are checked; a violation aborts with a message.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#define SD_INLINE inline

namespace sd {
namespace emu {

struct Range {
  const char* begin = nullptr;
  const char* end = nullptr;
  bool contains(const void* p, size_t n) const {
    const char* c = static_cast<const char*>(p);
    return c >= begin && c + n <= end;
  }
};

struct Warp {
  std::barrier<> bar{32};
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};

struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  Range smem;
  std::vector<Range> global_in;  // readable global buffers
  Range global_out;              // writable global buffer
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp);
  }
};

inline thread_local Block* t_block = nullptr;
inline thread_local int t_tid = 0;

[[noreturn]] inline void fail(const char* what, const void* p) {
  std::fprintf(stderr, "emu: %s (address %p, thread %d)\n", what, p, t_tid);
  std::abort();
}
inline void check_smem(const void* p, size_t n) {
  if (!t_block->smem.contains(p, n)) fail("shared access out of bounds", p);
  if (reinterpret_cast<uintptr_t>(p) % (n >= 16 ? 16 : n)) fail("misaligned shared access", p);
}
inline void check_global_in(const void* p, size_t n) {
  for (const Range& r : t_block->global_in)
    if (r.contains(p, n)) {
      if (reinterpret_cast<uintptr_t>(p) % 16) fail("misaligned cp.async source", p);
      return;
    }
  fail("global read out of bounds", p);
}
inline Warp& warp() { return *t_block->warps[t_tid / 32]; }
inline int lane() { return t_tid % 32; }

template <class T> inline float to_float(uint16_t bits) {
  T x;
  std::memcpy(&x, &bits, 2);
  return static_cast<float>(x);
}
template <class T> inline uint16_t from_float(float f) {
  T x = static_cast<T>(f);  // round to nearest even, like __floats2half2_rn / __floats2bfloat162_rn
  uint16_t bits;
  std::memcpy(&bits, &x, 2);
  return bits;
}
inline uint16_t half_of(uint32_t r, int hi) { return static_cast<uint16_t>(hi ? r >> 16 : r & 0xffff); }

template <int N, bool kTrans> inline void ldmatrix(uint32_t* r, const void* p) {
  Warp& w = warp();
  const int l = lane();
  check_smem(p, 16);
  w.ptr[l] = p;
  w.bar.arrive_and_wait();
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < N; ++i) {
    const uint16_t* rows[8];
    for (int x = 0; x < 8; ++x) rows[x] = static_cast<const uint16_t*>(w.ptr[i * 8 + x]);
    const uint16_t lo = kTrans ? rows[2 * t][g] : rows[g][2 * t];
    const uint16_t hi = kTrans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  w.bar.arrive_and_wait();
}

// D (16x8) += A (16xK) * B (Kx8), K = 16 (4 A regs, 2 B regs) or 8 (2 A regs, 1 B reg).
template <class T, int K> inline void mma(float (&d)[4], const uint32_t* a, const uint32_t* b) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < K / 4; ++i) w.a[l][i] = a[i];
  for (int i = 0; i < K / 8; ++i) w.b[l][i] = b[i];
  w.bar.arrive_and_wait();
  const int g = l / 4, t = l % 4;
  float res[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int kk = 0; kk < K; ++kk) {
      const int a_lane = (row % 8) * 4 + (kk % 8) / 2, a_reg = (row >= 8 ? 1 : 0) + (kk >= 8 ? 2 : 0);
      const int b_lane = col * 4 + (kk % 8) / 2, b_reg = kk >= 8 ? 1 : 0;
      acc += to_float<T>(half_of(w.a[a_lane][a_reg], kk % 2)) * to_float<T>(half_of(w.b[b_lane][b_reg], kk % 2));
    }
    res[e] = acc;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = res[e];
}

}  // namespace emu

inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  emu::check_smem(smem, 16);
  if (pred) {
    emu::check_global_in(gmem, 16);
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline void block_sync() { emu::t_block->bar.arrive_and_wait(); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, false>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, true>(r, p); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, false>(r, p); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, true>(r, p); }

template <class T> struct Mma {
  static void m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    emu::mma<T, 16>(d, a, b);
  }
  static void m16n8k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b0) { emu::mma<T, 8>(d, a, &b0); }
  static uint32_t pack(float lo, float hi) {
    return uint32_t(emu::from_float<T>(lo)) | (uint32_t(emu::from_float<T>(hi)) << 16);
  }
};

inline float shfl_xor(float v, int mask) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  w.f[l] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[l ^ mask];
  w.bar.arrive_and_wait();
  return r;
}
inline float fast_exp2(float x) { return std::exp2(x); }

inline void st_shared_b32(void* p, uint32_t v) {
  emu::check_smem(p, 4);
  std::memcpy(p, &v, 4);
}
inline void copy_16(void* dst_global, const void* src_shared) {
  emu::check_smem(src_shared, 16);
  if (!emu::t_block->global_out.contains(dst_global, 16)) emu::fail("global write out of bounds", dst_global);
  if (reinterpret_cast<uintptr_t>(dst_global) % 16) emu::fail("misaligned global store", dst_global);
  std::memcpy(dst_global, src_shared, 16);
}

}  // namespace sd
