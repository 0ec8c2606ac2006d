// sd_engine fused attention: extern "C" entry points (portable sm_80 path: mma.sync + cp.async).
//
// Entry points, one pair per (dtype, head dim), dtype in {f16, bf16}, D in {40, 64, 80, 128, 160}:
//
//   sd_attention_fwd_<dtype>_d<D>(const T* q, const T* k, const T* v,
//                                 int B, int Sq, int Sk, int H, T* out)
//       softmax scale 1/sqrt(D) baked in. Argument order = TensorRT AOT plugin order
//       (inputs, extra int32 args, outputs).
//   sd_attention_fwd_<dtype>_d<D>_scaled(const T* q, const T* k, const T* v,
//                                        int B, int Sq, int Sk, int H, float scale, T* out)
//       runtime softmax scale (must be > 0); used by the torch op.
//
// Layout: q/out [B, Sq, H, D], k/v [B, Sk, H, D], contiguous (packed [B, S, H*D]); 16-byte aligned
// base pointers. Launch: grid (ceil(Sq / block_m), B * H, 1), block (threads, 1, 1), dynamic shared
// memory smem_bytes, where {block_m, block_n, threads, smem_bytes} is the exported int[4]
// `sd_attention_cfg_d<D>` (the same for both dtypes; readable from the PTX text and the module).
#include "sm80_primitives.cuh"
#include "attention_impl.cuh"

#define SD_ATTENTION_CONFIG(D)                                                              \
  extern "C" __device__ const int sd_attention_cfg_d##D[4] = {                              \
      sd::AttnShape<D>::kBlockM, sd::AttnShape<D>::kBlockN, sd::AttnShape<D>::kThreads,     \
      sd::AttnShape<D>::kSmemBytes};

#define SD_ATTENTION_ENTRIES(TAG, T, D)                                                              \
  extern "C" __global__ void __launch_bounds__(sd::AttnShape<D>::kThreads)                           \
      sd_attention_fwd_##TAG##_d##D(const T* __restrict__ q, const T* __restrict__ k,                 \
                                    const T* __restrict__ v, int B, int Sq, int Sk, int H,             \
                                    T* __restrict__ out) {                                             \
    extern __shared__ uint4 sd_smem[];                                                                \
    sd::attention_block<T, D>(q, k, v, out, B, Sq, Sk, H, sd::InvSqrt<D>::value,                       \
                              reinterpret_cast<char*>(sd_smem), threadIdx.x, blockIdx.x, blockIdx.y);  \
  }                                                                                                    \
  extern "C" __global__ void __launch_bounds__(sd::AttnShape<D>::kThreads)                           \
      sd_attention_fwd_##TAG##_d##D##_scaled(const T* __restrict__ q, const T* __restrict__ k,        \
                                             const T* __restrict__ v, int B, int Sq, int Sk, int H,    \
                                             float scale, T* __restrict__ out) {                       \
    extern __shared__ uint4 sd_smem[];                                                                \
    sd::attention_block<T, D>(q, k, v, out, B, Sq, Sk, H, scale, reinterpret_cast<char*>(sd_smem),     \
                              threadIdx.x, blockIdx.x, blockIdx.y);                                    \
  }

// Every build has every (dtype, head dim): the PTX and fatbin are one module each.
#define SD_ATTENTION_HEAD_DIM(D)          \
  SD_ATTENTION_CONFIG(D)                  \
  SD_ATTENTION_ENTRIES(f16, __half, D)    \
  SD_ATTENTION_ENTRIES(bf16, __nv_bfloat16, D)

SD_ATTENTION_HEAD_DIM(40)
SD_ATTENTION_HEAD_DIM(64)
SD_ATTENTION_HEAD_DIM(80)
SD_ATTENTION_HEAD_DIM(128)
SD_ATTENTION_HEAD_DIM(160)
