// Element-wise and per-tensor math of LAMB and LARS, shared by the CPU twin
// (bk_optim_cpu.cpp) and the CUDA kernels (bk_optim_cuda.cu).
//
// Why one header: the CPU twin is what runs and is tested on machines without a GPU,
// so the CUDA kernels must execute exactly the same arithmetic. Nothing here
// includes torch: the CUDA file has to compile with plain nvcc on a CPU-only wheel.
//
// All arithmetic is fp32 whatever the parameter dtype; bias corrections are
// computed in double once per tensor (1 - 0.999^t loses digits in fp32).
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#include <cuda_fp16.h>
#else
#define BK_HD inline
#endif

namespace bk {

// ---------------------------------------------------------------- dtypes
// Element dtypes of parameters and gradients (moments and buffers are always fp32).
enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

BK_HD float to_float(float x) { return x; }
BK_HD void from_float(float* dst, float x) { *dst = x; }

BK_HD float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
BK_HD void from_float(bf16* dst, float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
    dst->bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  dst->bits = static_cast<uint16_t>(u >> 16);
}

#if defined(__CUDACC__)
BK_HD float to_float(f16 x) {
  __half_raw r; r.x = x.bits;
  return __half2float(__half(r));
}
BK_HD void from_float(f16* dst, float f) {
  __half_raw r = __half_raw(__float2half_rn(f));
  dst->bits = r.x;
}
#else
BK_HD float to_float(f16 x) {
  _Float16 h;
  memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
BK_HD void from_float(f16* dst, float f) {
  _Float16 h = static_cast<_Float16>(f);
  memcpy(&dst->bits, &h, 2);
}
#endif

// ---------------------------------------------------------------- LAMB
// Where weight decay enters (see docs/optimizers.md):
//   kPaper:     u = r + wd*x, inside the trust ratio (paper Algorithm 2, apex adam_w_mode=True)
//   kDecoupled: x <- x*(1 - lr*wd) outside the trust ratio (AdamW style; timm decoupled_decay)
//   kL2:        g <- g + wd*x before the moments (apex adam_w_mode=False)
enum WdMode : int32_t { kPaper = 0, kDecoupled = 1, kL2 = 2 };

// Plain-old-data so ctypes (Python) and kernel arguments (CUDA) can carry it as is.
struct LambHyper {
  double beta1, beta2;
  float beta3;           // 1 - beta1 with grad averaging, else 1
  float eps;
  float weight_decay;
  int32_t wd_mode;       // WdMode
  int32_t bias_correction;
  int32_t adapt;         // 0: ratio fixed at 1 (excluded groups)
  float phi_lo, phi_hi;  // paper phi: clamp of ||x|| (0, inf = identity)
  float ratio_lo, ratio_hi;  // clamp of the trust ratio (0, inf = none; (0,1) = LAMBC)
};

// Per-tensor constants derived from the step count (read on the device).
struct LambStepConsts {
  float inv_bc1;       // 1 / (1 - beta1^t)
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
};

BK_HD LambStepConsts lamb_step_consts(const LambHyper& h, float step) {
  LambStepConsts c;
  if (h.bias_correction) {
    double bc1 = 1.0 - pow(h.beta1, static_cast<double>(step));
    double bc2 = 1.0 - pow(h.beta2, static_cast<double>(step));
    c.inv_bc1 = static_cast<float>(1.0 / bc1);
    c.inv_sqrt_bc2 = static_cast<float>(1.0 / sqrt(bc2));
  } else {
    c.inv_bc1 = 1.0f;
    c.inv_sqrt_bc2 = 1.0f;
  }
  return c;
}

// Moments m_t, v_t from g_t (already divided by the clip factor). Returns nothing;
// m and v are updated in place (fp32 state).
BK_HD void lamb_moments(float g, float x, float& m, float& v, const LambHyper& h) {
  if (h.wd_mode == kL2) g += h.weight_decay * x;
  m = static_cast<float>(h.beta1) * m + h.beta3 * g;
  // 1 - beta2 in double: in fp32, 1 - 0.999f loses 4 digits to cancellation
  v = static_cast<float>(h.beta2) * v + static_cast<float>(1.0 - h.beta2) * g * g;
}

// Update direction u = m_hat / (sqrt(v_hat) + eps) [+ wd*x]. Recomputed in pass 2
// from m, v and x so that p.grad is never used as scratch.
BK_HD float lamb_direction(float m, float v, float x, const LambHyper& h, const LambStepConsts& c) {
  float u = (m * c.inv_bc1) / (sqrtf(v) * c.inv_sqrt_bc2 + h.eps);
  if (h.wd_mode == kPaper) u += h.weight_decay * x;
  return u;
}

// Layer-wise ratio phi(||x||) / ||u|| from the squared norms of the whole parameter.
// Ratio 1 where either norm is zero (fresh zero-initialised layers, zero gradients).
// Factor of decoupled decay, x <- x * (1 - lr*wd); 1 otherwise. In double, once per tensor,
// so that it rounds like the host-side (Python float) computation of the other paths.
BK_HD float lamb_decay(float lr, const LambHyper& h) {
  if (h.wd_mode != kDecoupled) return 1.0f;
  return static_cast<float>(1.0 - static_cast<double>(lr) * static_cast<double>(h.weight_decay));
}

BK_HD float lamb_trust_ratio(float x_sq, float u_sq, float decay, const LambHyper& h) {
  if (!h.adapt) return 1.0f;
  float x_norm = sqrtf(x_sq);
  float u_norm = sqrtf(u_sq);
  // decoupled decay shrinks x before the ratio is taken (timm ordering)
  if (h.wd_mode == kDecoupled) x_norm *= fabsf(decay);
  if (!(x_norm > 0.0f) || !(u_norm > 0.0f)) return 1.0f;
  float phi = fminf(fmaxf(x_norm, h.phi_lo), h.phi_hi);
  float r = phi / u_norm;
  return fminf(fmaxf(r, h.ratio_lo), h.ratio_hi);
}

// x_{t+1} = decay * x_t - (lr * ratio) * u; lr_ratio = lr * ratio is computed once per tensor.
BK_HD float lamb_apply(float x, float u, float lr_ratio, float decay, const LambHyper& h) {
  if (h.wd_mode == kDecoupled) x = x * decay;
  return x - lr_ratio * u;
}

// ---------------------------------------------------------------- LARS
// Where the global lr enters the momentum buffer (see docs/optimizers.md):
//   lr_in_buffer = 0: torch.optim.SGD ordering (timm, apex LARC): buf = m buf + d, x -= lr buf
//   lr_in_buffer = 1: the paper's Algorithm 1:                    buf = m buf + lr d, x -= buf
// with d = local_lr (g + wd x). Equal at a constant lr; under warm-up or decay the paper's buffer
// keeps each step's own lr, torch's rescales the whole history by the current one.
struct LarsHyper {
  float momentum;
  float dampening;
  float weight_decay;
  float trust_coeff;   // eta
  float eps;
  int32_t nesterov;
  int32_t trust_clip;  // LARC: ratio <- min(ratio / lr, 1) where the ratio is adaptive
  int32_t adapt;
  int32_t lr_in_buffer;
};

// local lr = eta * ||x|| / (||g|| + wd*||x|| + eps); with LARC's clip, min(local lr / lr, 1).
// Where either norm is zero (or adapt is off) the ratio is 1 and is NOT clipped: the tensor takes
// a plain SGD step at lr, whatever trust_clip says. That is apex LARC (it clips only inside
// `if param_norm != 0 and grad_norm != 0`); timm clips the fallback 1 to min(1/lr, 1) instead,
// which differs when lr > 1.
BK_HD float lars_trust_ratio(float x_sq, float g_sq, float lr, const LarsHyper& h) {
  if (!h.adapt) return 1.0f;
  float x_norm = sqrtf(x_sq);
  float g_norm = sqrtf(g_sq);
  if (!(x_norm > 0.0f) || !(g_norm > 0.0f)) return 1.0f;
  float r = h.trust_coeff * x_norm / (g_norm + h.weight_decay * x_norm + h.eps);
  if (h.trust_clip) r = fminf(r / lr, 1.0f);
  return r;
}

// SGD-momentum step on d = ratio*(g + wd*x), lr outside (torch SGD) or inside (paper) the buffer.
// `first` marks the first step of this tensor: the buffer starts as d (lr d), as in torch.optim.SGD.
BK_HD void lars_apply(float g, float& x, float& buf, float ratio, float lr, bool first,
                      const LarsHyper& h) {
  float d = (g + h.weight_decay * x) * ratio;
  if (h.lr_in_buffer) d = lr * d;  // paper: v <- m v + lr * local_lr * (g + wd x)
  if (h.momentum != 0.0f) {
    buf = first ? d : h.momentum * buf + (1.0f - h.dampening) * d;
    d = h.nesterov ? d + h.momentum * buf : buf;
  }
  x = h.lr_in_buffer ? x - d : x - lr * d;
}

}  // namespace bk
