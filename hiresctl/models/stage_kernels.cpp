// BatchNorm -> ReLU -> 2x2 max-pool of the small encoders as two fused CPU passes over the
// convolution's full-resolution output: one forward (the batch statistics and the pool, in one
// read), one backward (BatchNorm's per-channel affine gradient plus the pool's scatter, in one
// write). hiresctl/models/stages.py compiles this file once per machine (torch's C++ extension
// build) and falls back to torch's own kernels when it cannot; the mathematics are those of
// stages.py's _TrainStage, which documents them.
//
// Layout: x is (N, C, H, W) in channels-last memory (N, H, W, C contiguous), float32 or
// bfloat16, C a multiple of 16: each inner step handles 16 channels as one GCC/Clang vector
// (one AVX-512 register, two AVX2 ones). Per-channel numbers are float32 and every sum over the
// batch is a double across rows (a float within a row).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t L = 16;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const uint16_t* p) {  // bfloat16: the upper half of a float's bits
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(uint16_t* p, vf v) {  // rounded to nearest even, as torch rounds; NaN kept
  vu bits;
  std::memcpy(&bits, &v, sizeof bits);
  vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = (vu)(v != v);
  rounded = (rounded & ~nan) | (0x7FC0u & nan);
  const vh h = __builtin_convertvector(rounded, vh);
  std::memcpy(p, &h, sizeof h);
}
inline vf relu(vf v) { return (v > 0.f) | (v != v) ? v : vf{}; }  // NaN passes, as torch's

struct Shape {
  int64_t N, C, H, W, OH, OW;
  explicit Shape(const at::Tensor& x)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), OH(x.size(2) / 2), OW(x.size(3) / 2) {}
};

// Per row pair (n, 2i..2i+1): the shifted sums of every value (when `sums`), and the 2x2
// max-pool of sign*x: the picked value and its window position 0..3 (int32; row-major, the first of
// equal values, NaN propagating, as torch's max_pool2d picks).
template <typename T>
void pool_rows(const T* xp, const float* sign, const float* shift, T* picked, int32_t* index,
               double* partial, const bool sums, const Shape s, int64_t begin, int64_t end) {
  const int64_t PH = (s.H + 1) / 2, B = s.C / L;
  {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / PH, ph = task % PH;
      if (sums) {
        double* out = partial + task * 2 * s.C;
        std::fill(out, out + 2 * s.C, 0.0);
        for (int64_t h = 2 * ph; h < std::min(2 * ph + 2, s.H); ++h) {
          const T* row = xp + (n * s.H + h) * s.W * s.C;
          for (int64_t b = 0; b < B; ++b) {  // 16 channels along the row, in registers
            const vf origin = load(shift + b * L);
            vf r1 = vf{}, r2 = vf{};
            for (int64_t w = 0; w < s.W; ++w) {
              const vf v = load(row + w * s.C + b * L) - origin;
              r1 += v;
              r2 += v * v;
            }
            for (int64_t j = 0; j < L; ++j) {
              out[b * L + j] += r1[j];
              out[s.C + b * L + j] += r2[j];
            }
          }
        }
      }
      if (ph >= s.OH) continue;
      const T* top = xp + (n * s.H + 2 * ph) * s.W * s.C;
      const T* bottom = top + s.W * s.C;
      const int64_t o = (n * s.OH + ph) * s.OW * s.C;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t c = b * L, at = ow * s.C + c;
          const vf sg = load(sign + c);
          vf best = sg * load(top + 2 * ow * s.C + c);
          vi k = vi{};
          vf v = sg * load(top + (2 * ow + 1) * s.C + c);
          vi t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 1 : k;
          v = sg * load(bottom + 2 * ow * s.C + c);
          t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 2 : k;
          v = sg * load(bottom + (2 * ow + 1) * s.C + c);
          t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 3 : k;
          store(picked + o + at, sg * best);
          if (index != nullptr) std::memcpy(index + o + at, &k, sizeof k);
        }
      }
    }
  }
}

template <typename T>
void pool_pass(const T* xp, const float* sign, const float* shift, T* picked, int32_t* index,
               double* partial, bool sums, Shape s) {
  at::parallel_for(0, s.N * ((s.H + 1) / 2), 1, [=](int64_t begin, int64_t end) {
    pool_rows<T>(xp, sign, shift, picked, index, partial, sums, s, begin, end);
  });
}

// y = relu(gain * picked + shift) over the pooled values
template <typename T>
void affine_relu(const T* picked, const float* gain, const float* shift, T* y, int64_t rows, int64_t C) {
  at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < C; c += L) {
        store(y + r * C + c, relu(load(gain + c) * load(picked + r * C + c) + load(shift + c)));
      }
    }
  });
}

// Per pooled row: sums of G (grad_y where y > 0) and of G * (picked - mean)
template <typename T>
void grad_sums(const T* gy, const T* y, const T* picked, const float* mean, double* partial,
               int64_t rows, int64_t width, int64_t C) {
  const int64_t B = C / L;
  at::parallel_for(0, rows, 1, [=](int64_t begin, int64_t end) {
    std::vector<vf> r1(B), r2(B);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(r1.begin(), r1.end(), vf{});
      std::fill(r2.begin(), r2.end(), vf{});
      for (int64_t w = 0; w < width; ++w) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t at = (r * width + w) * C + b * L;
          const vf g = load(y + at) > 0.f ? load(gy + at) : vf{};
          r1[b] += g;
          r2[b] += g * (load(picked + at) - load(mean + b * L));
        }
      }
      double* out = partial + r * 2 * C;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < L; ++j) {
          out[b * L + j] = r1[b][j];
          out[C + b * L + j] = r2[b][j];
        }
      }
    }
  });
}

// grad_x = coef * (x - mean) + base, plus gain * G where the pool picked the value
template <typename T>
void grad_rows(const T* xp, const int32_t* index, const T* gy, const T* y, const float* coef,
               const float* base, const float* mean, const float* gain, T* out, const Shape s,
               int64_t begin, int64_t end) {
  const int64_t B = s.C / L;
  for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.H, h = task % s.H;
      const T* row = xp + task * s.W * s.C;
      T* orow = out + task * s.W * s.C;
      const bool pooled_row = h / 2 < s.OH;
      const int32_t rk = static_cast<int32_t>(h % 2) * 2;
      const int64_t o = (n * s.OH + h / 2) * s.OW * s.C;
      for (int64_t w = 0; w < s.W; ++w) {
        const bool pooled = pooled_row && w / 2 < s.OW;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t c = b * L;
          vf v = load(coef + c) * (load(row + w * s.C + c) - load(mean + c)) + load(base + c);
          if (pooled) {
            const int64_t at = o + (w / 2) * s.C + c;
            vi k;
            std::memcpy(&k, index + at, sizeof k);
            const vi hit = (k == (rk + static_cast<int32_t>(w % 2))) & (load(y + at) > 0.f);
            v += hit ? load(gain + c) * load(gy + at) : vf{};
          }
          store(orow + w * s.C + c, v);
        }
      }
  }
}

template <typename T>
void grad_pass(const T* xp, const int32_t* index, const T* gy, const T* y, const float* coef,
               const float* base, const float* mean, const float* gain, T* out, Shape s) {
  // the rows in a function of their own: its arguments stay in registers, where a lambda's
  // captures are read again after every store
  at::parallel_for(0, s.N * s.H, 1, [=](int64_t begin, int64_t end) {
    grad_rows<T>(xp, index, gy, y, coef, base, mean, gain, out, s, begin, end);
  });
}

void check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "a 4-d CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "channels-last memory");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16");
  TORCH_CHECK(x.size(1) % L == 0, "channels: a multiple of 16");
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

float* fptr(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "a contiguous float32 tensor");
  return t.data_ptr<float>();
}

template <typename T>
std::vector<at::Tensor> forward_t(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& running_mean, const at::Tensor& running_var,
                                  double eps, double factor, bool batch, bool update, bool keep) {
  const Shape s(x);
  const int64_t C = s.C;
  auto fopt = x.options().dtype(at::kFloat);
  auto picked = at::empty({s.N, C, s.OH, s.OW}, x.options(), at::MemoryFormat::ChannelsLast);
  auto index = keep ? at::empty({s.N, s.OH, s.OW, C}, x.options().dtype(at::kInt)) : at::Tensor();
  auto mean = at::empty({C}, fopt), rstd = at::empty({C}, fopt);
  auto gain = at::empty({C}, fopt), shift = at::empty({C}, fopt);
  auto sign = at::empty({C}, fopt), origin = at::zeros({C}, fopt);
  const float *w = fptr(weight), *b = fptr(bias);
  float *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>(), *g = gain.data_ptr<float>();
  float *sh = shift.data_ptr<float>(), *sg = sign.data_ptr<float>(), *org = origin.data_ptr<float>();
  const T* xp = ptr<T>(x);
  for (int64_t c = 0; c < C; ++c) sg[c] = w[c] < 0.f ? -1.f : 1.f;  // sign(gain) = sign(weight)
  at::Tensor partial;
  if (batch) {
    // the sums are taken about each channel's first value, which keeps E[x^2] - E[x]^2 exact
    // where a channel's mean is large beside its spread
    for (int64_t c0 = 0; c0 < C; c0 += L) store(org + c0, load(xp + c0));
    partial = at::empty({s.N * ((s.H + 1) / 2), 2, C}, x.options().dtype(at::kDouble));
  }
  pool_pass<T>(xp, sg, org, ptr<T>(picked), keep ? index.data_ptr<int32_t>() : nullptr,
               batch ? partial.data_ptr<double>() : nullptr, batch, s);
  if (batch) {
    const auto total = partial.sum(0);
    const double* tp = total.data_ptr<double>();
    const double n = static_cast<double>(s.N * s.H * s.W);
    float* rm = update ? fptr(running_mean) : nullptr;
    float* rv = update ? fptr(running_var) : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const double d = tp[c] / n;
      const double var = std::max(tp[C + c] / n - d * d, 0.0);
      const double mu = d + org[c];
      m[c] = static_cast<float>(mu);
      r[c] = 1.f / std::sqrt(static_cast<float>(var) + static_cast<float>(eps));
      if (update) {  // as nn.BatchNorm2d: the unbiased variance in the running average
        rm[c] = static_cast<float>((1.0 - factor) * rm[c] + factor * mu);
        rv[c] = static_cast<float>((1.0 - factor) * rv[c] + factor * var * n / (n - 1.0));
      }
    }
  } else {
    const float *rm = fptr(running_mean), *rv = fptr(running_var);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = rm[c];
      r[c] = 1.f / std::sqrt(rv[c] + static_cast<float>(eps));
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    g[c] = w[c] * r[c];
    sh[c] = b[c] - g[c] * m[c];
  }
  auto y = at::empty_like(picked, at::MemoryFormat::ChannelsLast);
  affine_relu<T>(ptr<T>(picked), g, sh, ptr<T>(y), s.N * s.OH * s.OW, C);
  return {y, picked, keep ? index : at::empty({0}, x.options().dtype(at::kInt)), gain, mean, rstd};
}

// (y, picked, index, gain, mean, rstd): the stage's output and what its backward needs.
// batch: normalise by the batch's statistics (else by the running ones); update: also update
// the running statistics with `factor`; keep: record the pool's choices for a backward.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps, double factor, bool batch, bool update, bool keep) {
  check(x);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "at least 2x2 values");
  if (x.scalar_type() == at::kFloat)
    return forward_t<float>(x, weight, bias, running_mean, running_var, eps, factor, batch, update, keep);
  return forward_t<uint16_t>(x, weight, bias, running_mean, running_var, eps, factor, batch, update, keep);
}

template <typename T>
std::vector<at::Tensor> backward_t(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& picked,
                                   const at::Tensor& index, const at::Tensor& y, const at::Tensor& gain,
                                   const at::Tensor& mean, const at::Tensor& rstd) {
  const Shape s(x);
  const int64_t C = s.C, rows = s.N * s.OH;
  auto fopt = x.options().dtype(at::kFloat);
  auto partial = at::empty({rows, 2, C}, x.options().dtype(at::kDouble));
  grad_sums<T>(ptr<T>(gy), ptr<T>(y), ptr<T>(picked), fptr(mean), partial.data_ptr<double>(), rows, s.OW, C);
  const auto total = partial.sum(0);
  const double* tp = total.data_ptr<double>();
  auto g_weight = at::empty({C}, fopt), g_bias = at::empty({C}, fopt);
  auto coef = at::empty({C}, fopt), base = at::empty({C}, fopt);
  const float *g = fptr(gain), *r = fptr(rstd);
  float *gw = g_weight.data_ptr<float>(), *gb = g_bias.data_ptr<float>();
  float *cf = coef.data_ptr<float>(), *bs = base.data_ptr<float>();
  const double n = static_cast<double>(s.N * s.H * s.W);
  for (int64_t c = 0; c < C; ++c) {
    // BatchNorm's gradient gamma*rstd*(G - mean(G) - xhat*mean(G*xhat)), G non-zero only where
    // the pool picked a value and the ReLU passed it
    const double sum_g = tp[c], sum_gxhat = r[c] * tp[C + c];
    gb[c] = static_cast<float>(sum_g);
    gw[c] = static_cast<float>(sum_gxhat);
    cf[c] = static_cast<float>(-g[c] * r[c] * sum_gxhat / n);
    bs[c] = static_cast<float>(-g[c] * sum_g / n);
  }
  auto grad = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  grad_pass<T>(ptr<T>(x), index.data_ptr<int32_t>(), ptr<T>(gy), ptr<T>(y), coef.data_ptr<float>(),
               base.data_ptr<float>(), fptr(mean), g, ptr<T>(grad), s);
  return {grad, g_weight, g_bias};
}

// (grad_x, grad_weight, grad_bias) from the output's gradient and what forward kept
std::vector<at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& picked,
                                 const at::Tensor& index, const at::Tensor& y, const at::Tensor& gain,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  check(x);
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the output's gradient: x's type, channels-last");
  if (x.scalar_type() == at::kFloat) return backward_t<float>(gy, x, picked, index, y, gain, mean, rstd);
  return backward_t<uint16_t>(gy, x, picked, index, y, gain, mean, rstd);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
