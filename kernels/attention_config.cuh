// Tile configuration of the fused attention kernel, per head dim.
//
// Shared by the device build (attention.cu) and the host emulator (emu/attention_emu.cpp).
// A block of kWarps warps owns kBlockM = 16 * kMTiles * kWarps query rows of one (batch, head) and
// streams K/V in tiles of kBlockN keys. Each warp owns kMTiles m16 row tiles (two tiles per warp
// halve the shared-memory traffic per MMA). Everything is chosen so that shared memory stays
// <= 48 KiB: no opt-in attribute is needed, which matters for TensorRT's AOT plugin launches.
#pragma once

namespace sd {

template <int D> struct AttnTuning;
//                                      warps  m-tiles/warp  keys/tile
template <> struct AttnTuning<40>  { static constexpr int kWarps = 4, kMTiles = 2, kBlockN = 64; };
template <> struct AttnTuning<64>  { static constexpr int kWarps = 4, kMTiles = 2, kBlockN = 64; };
template <> struct AttnTuning<80>  { static constexpr int kWarps = 4, kMTiles = 2, kBlockN = 32; };
template <> struct AttnTuning<128> { static constexpr int kWarps = 4, kMTiles = 1, kBlockN = 64; };
template <> struct AttnTuning<160> { static constexpr int kWarps = 4, kMTiles = 1, kBlockN = 32; };

template <int D> struct AttnShape {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = AttnTuning<D>::kWarps;
  static constexpr int kMTiles = AttnTuning<D>::kMTiles;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = 16 * kMTiles;          // query rows per warp
  static constexpr int kBlockM = kWarpRows * kWarps;      // query rows per block
  static constexpr int kBlockN = AttnTuning<D>::kBlockN;  // keys per K/V tile
  static constexpr int kChunks = D / 8;                   // 16-byte chunks per row (8 halves)
  // Shared-memory row stride in elements: an odd number of 16-byte chunks makes the 8 row
  // addresses of every ldmatrix fall into distinct banks (no conflicts, no swizzle needed).
  static constexpr int kStride = (kChunks % 2 == 1) ? D : D + 8;
  static constexpr int kKSteps = D / 16;                  // k16 MMA steps of Q K^T over the head dim
  static constexpr bool kKTail = (D % 16) == 8;           // one extra k8 step (D = 40: 16 + 16 + 8)
  static constexpr int kDTiles = D / 8;                   // n8 tiles of the output (PV): 40 = 5 x 8
  static constexpr int kNTiles = kBlockN / 8;             // n8 tiles of the score tile S = Q K^T
  // Shared memory: [K tile: kBlockN rows][Q tile, later V tiles, finally the O staging: kQRows rows]
  static constexpr int kQRows = kBlockM > kBlockN ? kBlockM : kBlockN;
  static constexpr int kSmemBytes = (kBlockN + kQRows) * kStride * 2;

  static_assert(D % 8 == 0, "head dim must be a multiple of 8");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of 16");
  static_assert(kSmemBytes <= 48 * 1024, "keep shared memory under the 48 KiB default limit");
};

// 1/sqrt(D) as a compile-time constant (Newton iterations in double).
constexpr double inv_sqrt_newton(double x, double y, int iters) {
  return iters == 0 ? y : inv_sqrt_newton(x, y * (1.5 - 0.5 * x * y * y), iters - 1);
}
template <int D> struct InvSqrt {
  static constexpr float value = static_cast<float>(inv_sqrt_newton(double(D), 0.1, 40));
};

}  // namespace sd
