// Runs the device kernel body (../attention_impl.cuh) on the CPU through the emulated primitives.
//
//   attention_emu <f16|bf16> <D> <B> <Sq> <Sk> <H> <scale|baked> <in.f32> <out.f32>
//
// in.f32: float32 q [B, Sq, H*D], then k and v [B, Sk, H*D] (rounded to the dtype here).
// out.f32: float32 out [B, Sq, H*D]. The output buffer is poisoned with NaN before the launch.
// The grid is (ceil(Sq / block_m), B * H), one block at a time, each block `threads` std::threads.
// Built and run by tests/test_kernels.py (g++ -std=c++20 -pthread -I<cuda>/include).
#include "emu_primitives.h"
#include "../attention_impl.cuh"

#include <cstdio>
#include <string>
#include <thread>

namespace {

template <class T, int D>
int run(int B, int Sq, int Sk, int H, bool baked, float scale, const std::vector<float>& in,
        std::vector<float>& out_f) {
  using S = sd::AttnShape<D>;
  const size_t nq = size_t(B) * Sq * H * D, nk = size_t(B) * Sk * H * D;
  if (in.size() != nq + 2 * nk) {
    std::fprintf(stderr, "input has %zu floats, expected %zu\n", in.size(), nq + 2 * nk);
    return 2;
  }
  // +8 elements of slack so that even empty tensors have a valid, aligned base address
  std::vector<T> q(nq + 8), k(nk + 8), v(nk + 8), out(nq + 8);
  for (size_t i = 0; i < nq; ++i) q[i] = static_cast<T>(in[i]);
  for (size_t i = 0; i < nk; ++i) k[i] = static_cast<T>(in[nq + i]);
  for (size_t i = 0; i < nk; ++i) v[i] = static_cast<T>(in[nq + nk + i]);
  for (size_t i = 0; i < nq + 8; ++i) out[i] = static_cast<T>(NAN);
  if (baked) scale = sd::InvSqrt<D>::value;

  alignas(16) static char smem[48 * 1024];
  const int grid_x = (Sq + S::kBlockM - 1) / S::kBlockM, grid_y = B * H;
  for (int by = 0; by < grid_y; ++by)
    for (int bx = 0; bx < grid_x; ++bx) {
      std::memset(smem, 0xff, sizeof(smem));  // NaN-ish garbage: unwritten smem must never be used
      sd::emu::Block block(S::kThreads);
      block.smem = {smem, smem + S::kSmemBytes};
      auto range = [](const std::vector<T>& x, size_t n) {
        const char* p = reinterpret_cast<const char*>(x.data());
        return sd::emu::Range{p, p + n * sizeof(T)};
      };
      block.global_in = {range(q, nq), range(k, nk), range(v, nk)};
      block.global_out = range(out, nq);
      std::vector<std::thread> threads;
      for (int tid = 0; tid < S::kThreads; ++tid)
        threads.emplace_back([&, tid] {
          sd::emu::t_block = &block;
          sd::emu::t_tid = tid;
          sd::attention_block<T, D>(q.data(), k.data(), v.data(), out.data(), B, Sq, Sk, H, scale, smem,
                                    tid, bx, by);
        });
      for (auto& th : threads) th.join();
    }
  out_f.resize(nq);
  for (size_t i = 0; i < nq; ++i) out_f[i] = static_cast<float>(out[i]);
  return 0;
}

template <class T>
int dispatch(int D, int B, int Sq, int Sk, int H, bool baked, float scale, const std::vector<float>& in,
             std::vector<float>& out) {
  switch (D) {
    case 40: return run<T, 40>(B, Sq, Sk, H, baked, scale, in, out);
    case 64: return run<T, 64>(B, Sq, Sk, H, baked, scale, in, out);
    case 80: return run<T, 80>(B, Sq, Sk, H, baked, scale, in, out);
    case 128: return run<T, 128>(B, Sq, Sk, H, baked, scale, in, out);
    case 160: return run<T, 160>(B, Sq, Sk, H, baked, scale, in, out);
    default: std::fprintf(stderr, "unsupported head dim %d\n", D); return 2;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s <f16|bf16> <D> <B> <Sq> <Sk> <H> <scale|baked> <in.f32> <out.f32>\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  const int D = std::stoi(argv[2]), B = std::stoi(argv[3]), Sq = std::stoi(argv[4]), Sk = std::stoi(argv[5]),
            H = std::stoi(argv[6]);
  const bool baked = std::string(argv[7]) == "baked";
  const float scale = baked ? 0.f : std::stof(argv[7]);

  std::vector<float> in;
  if (FILE* f = std::fopen(argv[8], "rb")) {
    float buf[4096];
    size_t n;
    while ((n = std::fread(buf, sizeof(float), 4096, f)) > 0) in.insert(in.end(), buf, buf + n);
    std::fclose(f);
  } else {
    std::fprintf(stderr, "cannot read %s\n", argv[8]);
    return 2;
  }
  std::vector<float> out;
  int rc;
  if (dtype == "f16") rc = dispatch<__half>(D, B, Sq, Sk, H, baked, scale, in, out);
  else if (dtype == "bf16") rc = dispatch<__nv_bfloat16>(D, B, Sq, Sk, H, baked, scale, in, out);
  else { std::fprintf(stderr, "unsupported dtype %s\n", dtype.c_str()); return 2; }
  if (rc) return rc;
  FILE* f = std::fopen(argv[9], "wb");
  if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) {
    std::fprintf(stderr, "cannot write %s\n", argv[9]);
    return 2;
  }
  std::fclose(f);
  return 0;
}
