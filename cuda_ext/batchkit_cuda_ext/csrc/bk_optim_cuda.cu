// Fused multi-tensor LAMB and LARS kernels for CUDA.
//
// Design (see docs/optimizers.md):
// * multi-tensor-apply: tensor addresses and a block -> (tensor, chunk) table travel by
//   value as a kernel argument (< 32 KB with CUDA 12.1+, else < 4 KB), one block per
//   64K-element chunk, kILP independent loads in flight per thread;
// * LAMB runs in two passes and never writes p.grad: pass 1 updates m, v and writes
//   per-chunk partial sums of x^2 and u^2; a reduce kernel sums them per tensor in a
//   fixed order (deterministic, no atomics); pass 2 recomputes u from m, v, x and
//   applies the trust ratio. Between the two, the caller may all-reduce the per-tensor
//   squared norms (ZeRO fragments) without any host sync;
// * step (per tensor), lr and the clip divisor are read through device pointers, so a
//   step issues launches only: no host sync, and lr schedules need no recompile;
// * the element-wise math is bk_optim_math.h, shared with the CPU twin.
//
// Plain C ABI over raw pointers with the stream passed in: this file includes no torch
// header, so it compiles with nvcc alone (the CPU torch wheel ships no CUDA headers).
#include <cuda_runtime.h>
#include <stdint.h>

#include "bk_optim_math.h"

namespace {

constexpr int kChunk = 1 << 16;
constexpr int kThreads = 512;
// Each thread keeps kILP elements' loads in flight (elements kThreads apart, so every load
// stays coalesced and the per-thread summation order is the plain strided one).
constexpr int kILP = 4;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
// CUDA 12.1+ passes up to 32764 bytes of kernel arguments (Volta and newer): a whole
// BERT-large layer stack goes out in a few launches per pass.
constexpr int kMaxTensors = 96;    // per launch (block_tensor is one byte)
constexpr int kMaxBlocks = 1536;   // per launch
constexpr int kMaxReduce = 1024;   // tensors per reduce launch
constexpr size_t kArgLimit = 32764;
#else
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kMaxReduce = 320;
constexpr size_t kArgLimit = 4096;
#endif

template <int DEPTH>
struct TensorMeta {
  void* addr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  const float* step[kMaxTensors];
  int32_t index[kMaxTensors];       // the tensor's position in the caller's list
  int32_t chunk_base[kMaxTensors];  // slot of its chunk 0 in the partials buffer
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

static_assert(sizeof(TensorMeta<5>) + sizeof(bk::LambHyper) + 2 * sizeof(void*) <= kArgLimit,
              "TensorMeta exceeds the kernel parameter limit; lower kMaxTensors or kMaxBlocks");


struct ReduceMeta {
  int32_t index[kMaxReduce];
  int32_t chunk_base[kMaxReduce];
  int32_t n_chunks[kMaxReduce];
};
static_assert(sizeof(ReduceMeta) + 2 * sizeof(void*) <= kArgLimit, "ReduceMeta exceeds the kernel parameter limit");

// Sum of two values over the block; result valid in thread 0. Fixed tree order.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = make_float2(a, b);
  __syncthreads();
  float2 r = make_float2(0.f, 0.f);
  if (warp == 0) {
    r = lane < kThreads / 32 ? warp_sums[lane] : make_float2(0.f, 0.f);
    for (int off = 16; off > 0; off >>= 1) {
      r.x += __shfl_down_sync(0xffffffffu, r.x, off);
      r.y += __shfl_down_sync(0xffffffffu, r.y, off);
    }
  }
  return r;
}

// ------------------------------------------------------------------ kernels
template <typename T, int MODE, bool STASH>
__global__ void __launch_bounds__(kThreads)
lamb_pass1_kernel(TensorMeta<5> meta, bk::LambHyper h, const float* clip, float* partials) {
  h.wd_mode = MODE;
  const int slot = meta.block_tensor[blockIdx.x];
  const int chunk = meta.block_chunk[blockIdx.x];
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), meta.numel[slot] - start);
  const T* g = static_cast<const T*>(meta.addr[0][slot]) + start;
  const T* x = static_cast<const T*>(meta.addr[1][slot]) + start;
  float* m = static_cast<float*>(meta.addr[2][slot]) + start;
  float* v = static_cast<float*>(meta.addr[3][slot]) + start;
  float* stash = STASH ? static_cast<float*>(meta.addr[4][slot]) + start : nullptr;
  const bk::LambStepConsts sc = bk::lamb_step_consts(h, *meta.step[slot]);
  const float inv_clip = clip ? 1.0f / *clip : 1.0f;
  float sx = 0.f, su = 0.f;
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kILP) {
    float gi[kILP], xi[kILP], mi[kILP], vi[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {  // all loads first
      const int64_t i = base + k * kThreads;
      if (i < len) {
        gi[k] = bk::to_float(g[i]);
        xi[k] = bk::to_float(x[i]);
        mi[k] = m[i];
        vi[k] = v[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        bk::lamb_moments(gi[k] * inv_clip, xi[k], mi[k], vi[k], h);
        m[i] = mi[k];
        v[i] = vi[k];
        const float u = bk::lamb_direction(mi[k], vi[k], xi[k], h, sc);
        if (STASH) stash[i] = u;
        sx += xi[k] * xi[k];
        su += u * u;
      }
    }
  }
  const float2 s = block_sum2(sx, su);
  if (threadIdx.x == 0) {
    const int64_t p = meta.chunk_base[slot] + chunk;
    partials[2 * p] = s.x;
    partials[2 * p + 1] = s.y;
  }
}

template <typename T, int MODE, bool STASH>
__global__ void __launch_bounds__(kThreads)
lamb_pass2_kernel(TensorMeta<4> meta, bk::LambHyper h, const float* lr_ptr, const float* sq) {
  h.wd_mode = MODE;
  const int slot = meta.block_tensor[blockIdx.x];
  const int chunk = meta.block_chunk[blockIdx.x];
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), meta.numel[slot] - start);
  T* x = static_cast<T*>(meta.addr[0][slot]) + start;
  const float* m = static_cast<const float*>(meta.addr[1][slot]) + start;
  const float* v = static_cast<const float*>(meta.addr[2][slot]) + start;
  const float* stash = STASH ? static_cast<const float*>(meta.addr[3][slot]) + start : nullptr;
  const int t = meta.index[slot];
  const float lr = *lr_ptr;
  const bk::LambStepConsts sc = bk::lamb_step_consts(h, *meta.step[slot]);
  const float decay = bk::lamb_decay(lr, h);
  const float lr_ratio = lr * bk::lamb_trust_ratio(sq[2 * t], sq[2 * t + 1], decay, h);
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kILP) {
    float xi[kILP], mi[kILP], vi[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        xi[k] = bk::to_float(x[i]);
        mi[k] = STASH ? stash[i] : m[i];  // with a stash, mi holds u
        vi[k] = STASH ? 0.f : v[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        const float u = STASH ? mi[k] : bk::lamb_direction(mi[k], vi[k], xi[k], h, sc);
        bk::from_float(&x[i], bk::lamb_apply(xi[k], u, lr_ratio, decay, h));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lars_norm_kernel(TensorMeta<2> meta, float* partials) {
  const int slot = meta.block_tensor[blockIdx.x];
  const int chunk = meta.block_chunk[blockIdx.x];
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), meta.numel[slot] - start);
  const T* g = static_cast<const T*>(meta.addr[0][slot]) + start;
  const T* x = static_cast<const T*>(meta.addr[1][slot]) + start;
  float sx = 0.f, sg = 0.f;
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kILP) {
    float xi[kILP], gi[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        xi[k] = bk::to_float(x[i]);
        gi[k] = bk::to_float(g[i]);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (base + k * kThreads < len) {
        sx += xi[k] * xi[k];
        sg += gi[k] * gi[k];
      }
    }
  }
  const float2 s = block_sum2(sx, sg);
  if (threadIdx.x == 0) {
    const int64_t p = meta.chunk_base[slot] + chunk;
    partials[2 * p] = s.x;
    partials[2 * p + 1] = s.y;
  }
}

template <typename T, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads)
lars_update_kernel(TensorMeta<3> meta, bk::LarsHyper h, const float* lr_ptr, const float* sq) {
  if (!MOMENTUM) h.momentum = 0.f;
  const int slot = meta.block_tensor[blockIdx.x];
  const int chunk = meta.block_chunk[blockIdx.x];
  const int64_t start = static_cast<int64_t>(chunk) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), meta.numel[slot] - start);
  const T* g = static_cast<const T*>(meta.addr[0][slot]) + start;
  T* x = static_cast<T*>(meta.addr[1][slot]) + start;
  float* buf = MOMENTUM ? static_cast<float*>(meta.addr[2][slot]) + start : nullptr;
  const int t = meta.index[slot];
  const float lr = *lr_ptr;
  const float ratio = bk::lars_trust_ratio(sq[2 * t], sq[2 * t + 1], lr, h);
  const bool first = *meta.step[slot] <= 1.0f;
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kILP) {
    float gi[kILP], xi[kILP], bi[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        gi[k] = bk::to_float(g[i]);
        xi[k] = bk::to_float(x[i]);
        bi[k] = MOMENTUM && !first ? buf[i] : 0.f;  // the first step does not read the buffer
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < len) {
        bk::lars_apply(gi[k], xi[k], bi[k], ratio, lr, first, h);
        bk::from_float(&x[i], xi[k]);
        if (MOMENTUM) buf[i] = bi[k];
      }
    }
  }
}

// Per-tensor sums of the chunk partials, in chunk order: one block per tensor.
__global__ void __launch_bounds__(kThreads)
reduce_partials_kernel(ReduceMeta meta, const float* partials, float* sq) {
  const int b = blockIdx.x;
  float a = 0.f, c = 0.f;
  for (int k = threadIdx.x; k < meta.n_chunks[b]; k += kThreads) {
    a += partials[2 * (meta.chunk_base[b] + k)];
    c += partials[2 * (meta.chunk_base[b] + k) + 1];
  }
  const float2 s = block_sum2(a, c);
  if (threadIdx.x == 0) {
    sq[2 * meta.index[b]] = s.x;
    sq[2 * meta.index[b] + 1] = s.y;
  }
}

// ------------------------------------------------------------------ host side
int64_t n_chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Launch-table sizes in use: the compiled maxima unless lowered by bk_cuda_set_launch_limits
// (tests lower them to cross launch boundaries with small tensors).
int g_max_tensors = kMaxTensors, g_max_blocks = kMaxBlocks, g_max_reduce = kMaxReduce;

// Walks every chunk of every non-empty tensor, fills TensorMeta and calls launch(meta,
// n_blocks) whenever the block table or the tensor table is full. A tensor cut by a
// launch boundary is re-entered in slot 0 of the next launch.
template <int DEPTH, typename Launch>
int multi_tensor_apply(int64_t n, const int64_t* numel, void* const* const* lists,
                       float* const* step, Launch&& launch) {
  TensorMeta<DEPTH> meta;
  int nt = 0, nb = 0;
  int64_t chunk_base = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t nch = n_chunks_of(numel[t]);
    bool in_table = false;
    for (int64_t ch = 0; ch < nch; ++ch) {
      if (!in_table) {
        for (int d = 0; d < DEPTH; ++d) meta.addr[d][nt] = lists[d] ? lists[d][t] : nullptr;
        meta.numel[nt] = numel[t];
        meta.step[nt] = step ? step[t] : nullptr;
        meta.index[nt] = static_cast<int32_t>(t);
        meta.chunk_base[nt] = static_cast<int32_t>(chunk_base);
        ++nt;
        in_table = true;
      }
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int32_t>(ch);
      ++nb;
      const bool last_chunk = ch == nch - 1;
      if (nb == g_max_blocks || (nt == g_max_tensors && last_chunk)) {
        launch(meta, nb);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
        nb = 0;
        nt = 0;
        in_table = false;
      }
    }
    chunk_base += nch;
  }
  if (nb > 0) {
    launch(meta, nb);
    return static_cast<int>(cudaGetLastError());
  }
  return 0;
}

int reduce_partials(int64_t n, const int64_t* numel, const float* partials, float* sq,
                    cudaStream_t stream) {
  // Tensors without chunks (empty) must still report 0.
  cudaMemsetAsync(sq, 0, sizeof(float) * 2 * n, stream);
  ReduceMeta meta;
  int nr = 0;
  int64_t chunk_base = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t nch = n_chunks_of(numel[t]);
    if (nch > 0) {
      meta.index[nr] = static_cast<int32_t>(t);
      meta.chunk_base[nr] = static_cast<int32_t>(chunk_base);
      meta.n_chunks[nr] = static_cast<int32_t>(nch);
      if (++nr == g_max_reduce) {
        reduce_partials_kernel<<<nr, kThreads, 0, stream>>>(meta, partials, sq);
        nr = 0;
      }
    }
    chunk_base += nch;
  }
  if (nr > 0) reduce_partials_kernel<<<nr, kThreads, 0, stream>>>(meta, partials, sq);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int MODE, bool STASH>
int lamb_typed(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
               float* const* m, float* const* v, float* const* stash, float* const* step,
               const bk::LambHyper& h, const float* clip, const float* lr, float* sq, float* workspace,
               cudaStream_t stream) {
  void* const* u = reinterpret_cast<void* const*>(stash);
  if (what & 1) {
    void* const* lists[5] = {g, x, reinterpret_cast<void* const*>(m), reinterpret_cast<void* const*>(v), u};
    int err = multi_tensor_apply<5>(n, numel, lists, step, [&](const TensorMeta<5>& meta, int nb) {
      lamb_pass1_kernel<T, MODE, STASH><<<nb, kThreads, 0, stream>>>(meta, h, clip, workspace);
    });
    if (err) return err;
    if ((err = reduce_partials(n, numel, workspace, sq, stream))) return err;
  }
  if (what & 2) {
    void* const* lists[4] = {x, reinterpret_cast<void* const*>(m), reinterpret_cast<void* const*>(v), u};
    int err = multi_tensor_apply<4>(n, numel, lists, step, [&](const TensorMeta<4>& meta, int nb) {
      lamb_pass2_kernel<T, MODE, STASH><<<nb, kThreads, 0, stream>>>(meta, h, lr, sq);
    });
    if (err) return err;
  }
  return 0;
}

template <typename T, bool STASH>
int lamb_by_mode(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                 float* const* m, float* const* v, float* const* u, float* const* step,
                 const bk::LambHyper& h, const float* clip, const float* lr, float* sq, float* ws,
                 cudaStream_t s) {
  switch (h.wd_mode) {
    case bk::kPaper: return lamb_typed<T, bk::kPaper, STASH>(what, n, numel, g, x, m, v, u, step, h, clip, lr, sq, ws, s);
    case bk::kDecoupled: return lamb_typed<T, bk::kDecoupled, STASH>(what, n, numel, g, x, m, v, u, step, h, clip, lr, sq, ws, s);
    case bk::kL2: return lamb_typed<T, bk::kL2, STASH>(what, n, numel, g, x, m, v, u, step, h, clip, lr, sq, ws, s);
  }
  return -2;
}

template <typename T>
int lamb_stash(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
               float* const* m, float* const* v, float* const* u, float* const* step,
               const bk::LambHyper& h, const float* clip, const float* lr, float* sq, float* ws,
               cudaStream_t s) {
  if (u) return lamb_by_mode<T, true>(what, n, numel, g, x, m, v, u, step, h, clip, lr, sq, ws, s);
  return lamb_by_mode<T, false>(what, n, numel, g, x, m, v, u, step, h, clip, lr, sq, ws, s);
}

template <typename T>
int lars_typed(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
               float* const* buf, float* const* step, const bk::LarsHyper& h, const float* lr,
               float* sq, float* workspace, cudaStream_t stream) {
  if (what & 1) {
    void* const* lists[2] = {g, x};
    int err = multi_tensor_apply<2>(n, numel, lists, nullptr, [&](const TensorMeta<2>& meta, int nb) {
      lars_norm_kernel<T><<<nb, kThreads, 0, stream>>>(meta, workspace);
    });
    if (err) return err;
    if ((err = reduce_partials(n, numel, workspace, sq, stream))) return err;
  }
  if (what & 2) {
    void* const* lists[3] = {g, x, reinterpret_cast<void* const*>(buf)};
    auto go = [&](const TensorMeta<3>& meta, int nb) {
      if (h.momentum != 0.f) lars_update_kernel<T, true><<<nb, kThreads, 0, stream>>>(meta, h, lr, sq);
      else lars_update_kernel<T, false><<<nb, kThreads, 0, stream>>>(meta, h, lr, sq);
    };
    int err = multi_tensor_apply<3>(n, numel, lists, step, go);
    if (err) return err;
  }
  return 0;
}

}  // namespace

extern "C" {

// Same contract as the CPU twin's bk_lamb / bk_lars (what: 1 = pass 1 + per-tensor
// squared norms, 2 = apply from sq, 3 = both; stash: null or u buffers), plus a workspace of
// bk_cuda_workspace_floats(n, numel) floats and the CUDA stream to launch on.
int bk_cuda_lamb(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                 float* const* m, float* const* v, float* const* stash, float* const* step,
                 int32_t dtype, const bk::LambHyper* h, const float* clip, const float* lr,
                 float* sq, float* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case bk::kF32: return lamb_stash<float>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq, workspace, s);
    case bk::kBF16: return lamb_stash<bk::bf16>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq, workspace, s);
    case bk::kF16: return lamb_stash<bk::f16>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq, workspace, s);
  }
  return -1;
}

int bk_cuda_lars(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                 float* const* buf, float* const* step, int32_t dtype, const bk::LarsHyper* h,
                 const float* lr, float* sq, float* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case bk::kF32: return lars_typed<float>(what, n, numel, g, x, buf, step, *h, lr, sq, workspace, s);
    case bk::kBF16: return lars_typed<bk::bf16>(what, n, numel, g, x, buf, step, *h, lr, sq, workspace, s);
    case bk::kF16: return lars_typed<bk::f16>(what, n, numel, g, x, buf, step, *h, lr, sq, workspace, s);
  }
  return -1;
}

int64_t bk_cuda_workspace_floats(int64_t n, const int64_t* numel) {
  int64_t chunks = 0;
  for (int64_t t = 0; t < n; ++t) chunks += n_chunks_of(numel[t]);
  return 2 * chunks + 2;
}

// Lowers the launch-table sizes (0 = the compiled maximum); returns -1 if a value is out of
// range. The compiled maxima are reported back through `maxima` (3 ints) when it is not null.
int bk_cuda_set_launch_limits(int32_t tensors, int32_t blocks, int32_t reduce, int32_t* maxima) {
  if (maxima) {
    maxima[0] = kMaxTensors;
    maxima[1] = kMaxBlocks;
    maxima[2] = kMaxReduce;
  }
  if (tensors < 0 || tensors > kMaxTensors || blocks < 0 || blocks > kMaxBlocks || reduce < 0 ||
      reduce > kMaxReduce)
    return -1;
  g_max_tensors = tensors ? tensors : kMaxTensors;
  g_max_blocks = blocks ? blocks : kMaxBlocks;
  g_max_reduce = reduce ? reduce : kMaxReduce;
  return 0;
}

const char* bk_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int64_t bk_abi_sizes(int32_t which) {
  return which == 0 ? static_cast<int64_t>(sizeof(bk::LambHyper))
                    : static_cast<int64_t>(sizeof(bk::LarsHyper));
}

}  // extern "C"
