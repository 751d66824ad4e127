// CPU twin of the fused LAMB / LARS kernels (C++ with OpenMP).
//
// The element-wise math lives in bk_optim_math.h and is shared with the CUDA kernels.
// The work split mirrors multi-tensor-apply: every tensor is cut into fixed chunks,
// chunks are spread over threads, and each chunk writes its partial squared norms
// into its own slot; per-tensor sums are then taken in chunk order, so results do
// not depend on the thread count (deterministic, like apex's l2norm cleanup).
//
// Plain C ABI over raw pointers (called through ctypes): no torch headers, so the
// same binding shape serves the CUDA library and the file builds in seconds.
#include <vector>
#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "bk_optim_math.h"

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per chunk, as CUDA's multi-tensor-apply

constexpr int64_t kTile = 1024;  // elements of u staged in L1 before streaming them out

// dst[0:n] = src[0:n] with non-temporal stores where dst is 32-byte aligned (plain stores
// for the unaligned head and the tail). Ends with a store fence: pass 2 may read dst from
// another thread.
inline void stream_store(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31u) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  _mm_sfence();
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

std::vector<Chunk> make_chunks(int64_t t_begin, int64_t t_end, const int64_t* numel) {
  std::vector<Chunk> chunks;
  for (int64_t t = t_begin; t < t_end; ++t)
    for (int64_t s = 0; s < numel[t]; s += kChunk)
      chunks.push_back({t, s, numel[t] - s < kChunk ? numel[t] - s : kChunk});
  return chunks;
}

// Sum chunk partials per tensor in chunk order (tensors without chunks get 0).
void reduce_partials(int64_t t_begin, int64_t t_end, const std::vector<Chunk>& chunks,
                     const std::vector<double>& partial, float* sq_out) {
  std::vector<double> acc(2 * (t_end - t_begin), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    acc[2 * (chunks[c].tensor - t_begin)] += partial[2 * c];
    acc[2 * (chunks[c].tensor - t_begin) + 1] += partial[2 * c + 1];
  }
  for (int64_t t = t_begin; t < t_end; ++t) {
    sq_out[2 * t] = static_cast<float>(acc[2 * (t - t_begin)]);
    sq_out[2 * t + 1] = static_cast<float>(acc[2 * (t - t_begin) + 1]);
  }
}

// ------------------------------------------------------------------ LAMB
// Pass 1: m, v from g; partial sums of x^2 and u^2. Writes m and v (and u when STASH).
template <typename T, int MODE, bool STASH>
void lamb_pass1(int64_t t_begin, int64_t t_end, const int64_t* numel, void* const* g,
                void* const* x, float* const* m, float* const* v, float* const* stash,
                float* const* step, const bk::LambHyper& hyper, float inv_clip, float* sq_out) {
  bk::LambHyper h = hyper;
  h.wd_mode = MODE;  // a constant the compiler folds, keeping the loop branch-free
  std::vector<Chunk> chunks = make_chunks(t_begin, t_end, numel);
  std::vector<double> partial(2 * chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk ck = chunks[c];
    const bk::LambStepConsts sc = bk::lamb_step_consts(h, *step[ck.tensor]);
    const T* gp = static_cast<const T*>(g[ck.tensor]) + ck.start;
    const T* xp = static_cast<const T*>(x[ck.tensor]) + ck.start;
    float* mp = m[ck.tensor] + ck.start;
    float* vp = v[ck.tensor] + ck.start;
    float* up = STASH ? stash[ck.tensor] + ck.start : nullptr;
    double sx = 0.0, su = 0.0;  // per-tile fp32 sums, added up in double
    // u goes to an L1-resident tile first and then to the stash with streaming stores, so
    // writing the stash does not first read it from memory (write-allocate).
    alignas(64) float tile[kTile];
    for (int64_t t0 = 0; t0 < ck.len; t0 += kTile) {
      const int64_t len = ck.len - t0 < kTile ? ck.len - t0 : kTile;
      float tsx = 0.0f, tsu = 0.0f;
#pragma omp simd reduction(+ : tsx, tsu)
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = t0 + i;
        const float gi = bk::to_float(gp[j]) * inv_clip;
        const float xi = bk::to_float(xp[j]);
        float mi = mp[j], vi = vp[j];
        bk::lamb_moments(gi, xi, mi, vi, h);
        mp[j] = mi;
        vp[j] = vi;
        const float u = bk::lamb_direction(mi, vi, xi, h, sc);
        if (STASH) tile[i] = u;
        tsx += xi * xi;
        tsu += u * u;
      }
      sx += tsx;
      su += tsu;
      if (STASH) stream_store(up + t0, tile, len);
    }
    partial[2 * c] = sx;
    partial[2 * c + 1] = su;
  }
  reduce_partials(t_begin, t_end, chunks, partial, sq_out);
}

// Pass 2: ratio from the (possibly all-reduced) squared norms; u recomputed from m, v, x
// (or read back from the stash); write x.
template <typename T, int MODE, bool STASH>
void lamb_pass2(int64_t t_begin, int64_t t_end, const int64_t* numel, void* const* x,
                float* const* m, float* const* v, float* const* stash, float* const* step,
                const bk::LambHyper& hyper, float lr, const float* sq) {
  bk::LambHyper h = hyper;
  h.wd_mode = MODE;
  std::vector<Chunk> chunks = make_chunks(t_begin, t_end, numel);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk ck = chunks[c];
    const bk::LambStepConsts sc = bk::lamb_step_consts(h, *step[ck.tensor]);
    const float decay = bk::lamb_decay(lr, h);
    const float lr_ratio = lr * bk::lamb_trust_ratio(sq[2 * ck.tensor], sq[2 * ck.tensor + 1], decay, h);
    T* xp = static_cast<T*>(x[ck.tensor]) + ck.start;
    const float* mp = m[ck.tensor] + ck.start;
    const float* vp = v[ck.tensor] + ck.start;
    const float* up = STASH ? stash[ck.tensor] + ck.start : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < ck.len; ++i) {
      const float xi = bk::to_float(xp[i]);
      const float u = STASH ? up[i] : bk::lamb_direction(mp[i], vp[i], xi, h, sc);
      bk::from_float(&xp[i], bk::lamb_apply(xi, u, lr_ratio, decay, h));
    }
  }
}

template <typename T, int MODE, bool STASH>
int lamb_passes(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                float* const* m, float* const* v, float* const* stash, float* const* step,
                const bk::LambHyper& h, const float* clip, const float* lr, float* sq) {
  const float inv_clip = clip ? 1.0f / *clip : 1.0f;
  // Two whole passes, one parallel region each. Processing tensors in cache-sized blocks
  // (pass 1 then pass 2 per block) saved ~10% on one thread here but lost with two, and a
  // region per block made the step several times slower when another process shared the
  // cores (every region ends in a barrier that waits for a descheduled thread).
  if (what & 1) lamb_pass1<T, MODE, STASH>(0, n, numel, g, x, m, v, stash, step, h, inv_clip, sq);
  if (what & 2) lamb_pass2<T, MODE, STASH>(0, n, numel, x, m, v, stash, step, h, *lr, sq);
  return 0;
}

template <typename T, int MODE>
int lamb_dispatch(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                  float* const* m, float* const* v, float* const* stash, float* const* step,
                  const bk::LambHyper& h, const float* clip, const float* lr, float* sq) {
  if (stash) return lamb_passes<T, MODE, true>(what, n, numel, g, x, m, v, stash, step, h, clip, lr, sq);
  return lamb_passes<T, MODE, false>(what, n, numel, g, x, m, v, stash, step, h, clip, lr, sq);
}

template <typename T>
int lamb_by_mode(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                 float* const* m, float* const* v, float* const* stash, float* const* step,
                 const bk::LambHyper& h, const float* clip, const float* lr, float* sq) {
  switch (h.wd_mode) {
    case bk::kPaper: return lamb_dispatch<T, bk::kPaper>(what, n, numel, g, x, m, v, stash, step, h, clip, lr, sq);
    case bk::kDecoupled: return lamb_dispatch<T, bk::kDecoupled>(what, n, numel, g, x, m, v, stash, step, h, clip, lr, sq);
    case bk::kL2: return lamb_dispatch<T, bk::kL2>(what, n, numel, g, x, m, v, stash, step, h, clip, lr, sq);
  }
  return 2;
}

// ------------------------------------------------------------------ LARS
template <typename T>
void lars_norms(int64_t t_begin, int64_t t_end, const int64_t* numel, void* const* g,
                void* const* x, float* sq_out) {
  std::vector<Chunk> chunks = make_chunks(t_begin, t_end, numel);
  std::vector<double> partial(2 * chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk ck = chunks[c];
    const T* gp = static_cast<const T*>(g[ck.tensor]) + ck.start;
    const T* xp = static_cast<const T*>(x[ck.tensor]) + ck.start;
    float sx = 0.0f, sg = 0.0f;
#pragma omp simd reduction(+ : sx, sg)
    for (int64_t i = 0; i < ck.len; ++i) {
      const float xi = bk::to_float(xp[i]);
      const float gi = bk::to_float(gp[i]);
      sx += xi * xi;
      sg += gi * gi;
    }
    partial[2 * c] = sx;
    partial[2 * c + 1] = sg;
  }
  reduce_partials(t_begin, t_end, chunks, partial, sq_out);
}

template <typename T, bool MOMENTUM>
void lars_update(int64_t t_begin, int64_t t_end, const int64_t* numel, void* const* g,
                 void* const* x, float* const* buf, float* const* step, const bk::LarsHyper& hyper,
                 float lr, const float* sq) {
  bk::LarsHyper h = hyper;
  if (!MOMENTUM) h.momentum = 0.0f;
  std::vector<Chunk> chunks = make_chunks(t_begin, t_end, numel);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk ck = chunks[c];
    const float ratio = bk::lars_trust_ratio(sq[2 * ck.tensor], sq[2 * ck.tensor + 1], lr, h);
    const bool first = *step[ck.tensor] <= 1.0f;
    const T* gp = static_cast<const T*>(g[ck.tensor]) + ck.start;
    T* xp = static_cast<T*>(x[ck.tensor]) + ck.start;
    float* bp = MOMENTUM ? buf[ck.tensor] + ck.start : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < ck.len; ++i) {
      float xi = bk::to_float(xp[i]);
      float bi = MOMENTUM ? bp[i] : 0.0f;
      bk::lars_apply(bk::to_float(gp[i]), xi, bi, ratio, lr, first, h);
      bk::from_float(&xp[i], xi);
      if (MOMENTUM) bp[i] = bi;
    }
  }
}

template <typename T>
int lars_dispatch(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
                  float* const* buf, float* const* step, const bk::LarsHyper& h, const float* lr,
                  float* sq) {
  const bool mom = h.momentum != 0.0f;
  auto update = [&](int64_t b, int64_t e) {
    if (mom) lars_update<T, true>(b, e, numel, g, x, buf, step, h, *lr, sq);
    else lars_update<T, false>(b, e, numel, g, x, buf, step, h, *lr, sq);
  };
  if (what & 1) lars_norms<T>(0, n, numel, g, x, sq);
  if (what & 2) update(0, n);
  return 0;
}

}  // namespace

extern "C" {

// what: 1 = pass 1 only (moments + squared norms into sq[2n]),
//       2 = pass 2 only (apply, reading sq, e.g. after a cross-rank all-reduce),
//       3 = both (single process).
// stash: null (pass 2 recomputes u from m, v, x) or fp32 buffers shaped like x where pass 1
//        stores u and pass 2 reads it back (4 more bytes of memory per parameter, less compute
//        and fewer bytes read in pass 2).
// step: per-tensor fp32 counters, already incremented for this step.
// clip: global clip divisor (>= 1) or null; lr: pointer to the learning rate.
int bk_lamb(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
            float* const* m, float* const* v, float* const* stash, float* const* step, int32_t dtype,
            const bk::LambHyper* h, const float* clip, const float* lr, float* sq) {
  switch (dtype) {
    case bk::kF32: return lamb_by_mode<float>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq);
    case bk::kBF16: return lamb_by_mode<bk::bf16>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq);
    case bk::kF16: return lamb_by_mode<bk::f16>(what, n, numel, g, x, m, v, stash, step, *h, clip, lr, sq);
  }
  return 1;
}

// what: 1 = squared norms of x and g into sq[2n], 2 = update from sq, 3 = both.
int bk_lars(int32_t what, int64_t n, const int64_t* numel, void* const* g, void* const* x,
            float* const* buf, float* const* step, int32_t dtype, const bk::LarsHyper* h,
            const float* lr, float* sq) {
  switch (dtype) {
    case bk::kF32: return lars_dispatch<float>(what, n, numel, g, x, buf, step, *h, lr, sq);
    case bk::kBF16: return lars_dispatch<bk::bf16>(what, n, numel, g, x, buf, step, *h, lr, sq);
    case bk::kF16: return lars_dispatch<bk::f16>(what, n, numel, g, x, buf, step, *h, lr, sq);
  }
  return 1;
}

// Lets the loader check that Python and C agree on struct layouts.
int64_t bk_abi_sizes(int32_t which) {
  return which == 0 ? static_cast<int64_t>(sizeof(bk::LambHyper))
                    : static_cast<int64_t>(sizeof(bk::LarsHyper));
}

}  // extern "C"
