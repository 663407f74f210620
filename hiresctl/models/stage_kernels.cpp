// BatchNorm -> ReLU -> 2x2 max-pool of the small encoders as two fused CPU passes over the
// convolution's full-resolution output: one forward (the batch statistics and the pool, in one
// read), one backward (BatchNorm's per-channel affine gradient plus the pool's scatter, in one
// write). The same for the last BatchNorm -> ReLU with the backbone's global max-pool (`whole`:
// the window is the whole plane). hiresctl/models/stages.py compiles this file once per machine
// (torch's C++ extension build) and falls back to torch's own kernels when it cannot; the
// mathematics are those of stages.py's _TrainStage, which documents them.
//
// Layout: x is (N, C, H, W) in channels-last memory (N, H, W, C contiguous), float32 or
// bfloat16, C a multiple of 16: each inner step handles 16 channels as one GCC/Clang vector
// (one AVX-512 register, two AVX2 ones), with independent accumulators so that no loop waits on
// one addition's latency. Per-channel numbers are float32; the sums over the batch are floats
// within a task (a row pair, or an image) and doubles across tasks, added in task order (the
// same result for any number of threads). The pool's window positions are bytes (0..3) for 2x2
// windows, int32 (h*W+w) for a whole plane. bfloat16 converts with AVX-512 instructions where
// the compiler targets them (vcvtneps2bf16 rounds to nearest even, as torch does).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
typedef uint8_t vb __attribute__((vector_size(16)));
constexpr int64_t L = 16;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const uint16_t* p) {  // bfloat16: the upper half of a float's bits
#ifdef __AVX512F__
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
  return (vf)_mm512_castsi512_ps(bits);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(uint16_t* p, vf v) {  // rounded to nearest even, as torch rounds; NaN kept
#ifdef __AVX512BF16__
  const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
  std::memcpy(p, &h, sizeof h);
#else
  vu bits;
  std::memcpy(&bits, &v, sizeof bits);
  vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = (vu)(v != v);
  rounded = (rounded & ~nan) | (0x7FC0u & nan);
  const vh h = __builtin_convertvector(rounded, vh);
  std::memcpy(p, &h, sizeof h);
#endif
}
inline vf relu(vf v) { return (v > 0.f) | (v != v) ? v : vf{}; }  // NaN passes, as torch's

// A task's two per-channel sums, each kept in two accumulators, into its row of partial sums
inline void put_sums(double* out, int64_t C, int64_t c, vf a1, vf b1, vf a2, vf b2) {
  const vf s1 = a1 + b1, s2 = a2 + b2;
  for (int64_t j = 0; j < L; ++j) {
    out[c + j] = s1[j];
    out[C + c + j] = s2[j];
  }
}

// whole: the pool's window is the whole plane (a global max-pool), else 2x2 with stride 2
struct Shape {
  int64_t N, C, H, W, OH, OW;
  bool whole;
  Shape(const at::Tensor& x, bool whole)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), OH(whole ? 1 : x.size(2) / 2),
        OW(whole ? 1 : x.size(3) / 2), whole(whole) {}
  int64_t tasks() const { return whole ? N : N * ((H + 1) / 2); }  // an image, or a row pair
};

// One pair of rows (n, 2i..2i+1) per task, 16 channels at a time: the shifted sums of every
// value (when `sums`: a float within the pair, in four independent accumulators, then a double
// per task), and the 2x2 max-pool of sign*x: the picked value and its window position 0..3
// (row-major, the first of equal values, NaN propagating, as torch's max_pool2d picks). Each
// value is read once for both.
template <typename T>
void pool_rows(const T* xp, const float* sign, const float* shift, T* picked, uint8_t* index,
               double* partial, const bool sums, const Shape s, int64_t begin, int64_t end) {
  const int64_t PH = (s.H + 1) / 2, B = s.C / L, C = s.C, W = s.W, OW = s.OW;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / PH, ph = task % PH;
    const T* top = xp + (n * s.H + 2 * ph) * W * C;
    const bool pair = ph < s.OH;  // else the last row of an odd height: sums only
    const int64_t o = (n * s.OH + ph) * OW * C;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t c = b * L;
      const vf origin = load(shift + c), sg = load(sign + c);
      vf s1a = vf{}, s1b = vf{}, s2a = vf{}, s2b = vf{};
      int64_t w0 = 0;  // the columns summed without a pool
      if (pair) {
        const T* bottom = top + W * C;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t at = 2 * ow * C + c;
          const vf a = load(top + at), bb = load(top + at + C);
          const vf d = load(bottom + at), e = load(bottom + at + C);
          if (sums) {
            const vf da = a - origin, db = bb - origin, dd = d - origin, de = e - origin;
            s1a += da + db;
            s1b += dd + de;
            s2a += da * da + db * db;
            s2b += dd * dd + de * de;
          }
          vf best = sg * a;
          vi k = vi{};
          vf v = sg * bb;
          vi t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 1 : k;
          v = sg * d;
          t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 2 : k;
          v = sg * e;
          t = (v > best) | (v != v);
          best = t ? v : best;
          k = t ? 3 : k;
          store(picked + o + ow * C + c, sg * best);
          if (index != nullptr) {
            const vb kb = __builtin_convertvector(k, vb);
            std::memcpy(index + o + ow * C + c, &kb, sizeof kb);
          }
        }
        w0 = 2 * OW;
        if (sums) {
          for (int64_t w = w0; w < W; ++w) {  // an odd width's last column
            const vf da = load(top + w * C + c) - origin, dd = load(bottom + w * C + c) - origin;
            s1a += da;
            s1b += dd;
            s2a += da * da;
            s2b += dd * dd;
          }
        }
      } else if (sums) {
        for (int64_t w = 0; w < W; ++w) {
          const vf da = load(top + w * C + c) - origin;
          s1a += da;
          s2a += da * da;
        }
      }
      if (sums) put_sums(partial + task * 2 * C, C, c, s1a, s1b, s2a, s2b);
    }
  }
}

template <typename T>
void pool_pass(const T* xp, const float* sign, const float* shift, T* picked, uint8_t* index,
               double* partial, bool sums, Shape s) {
  at::parallel_for(0, s.tasks(), 1, [=](int64_t begin, int64_t end) {
    pool_rows<T>(xp, sign, shift, picked, index, partial, sums, s, begin, end);
  });
}

// The per-task partial sums added in task order (the same result for any number of threads)
std::vector<double> total_of(const double* partial, int64_t tasks, int64_t width) {
  std::vector<double> total(width, 0.0);
  for (int64_t t = 0; t < tasks; ++t) {
    const double* p = partial + t * width;
    for (int64_t j = 0; j < width; ++j) total[j] += p[j];
  }
  return total;
}

// The global max-pool, one image per task: the shifted sums (when `sums`) and, per channel, the
// maximum of sign*x over the plane and its position h*W+w (the first of equal values, NaN
// propagating, as torch's max-pools pick)
template <typename T>
void global_rows(const T* xp, const float* sign, const float* shift, T* picked, int32_t* index,
                 double* partial, const bool sums, const Shape s, int64_t begin, int64_t end) {
  const int64_t B = s.C / L, C = s.C, P = s.H * s.W;
  for (int64_t n = begin; n < end; ++n) {
    const T* image = xp + n * P * C;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t c = b * L;
      const vf origin = load(shift + c), sg = load(sign + c);
      vf s1a = vf{}, s1b = vf{}, s2a = vf{}, s2b = vf{};
      vf best = sg * load(image + c);
      vi k = vi{};
      for (int64_t p = 0; p < P; ++p) {
        const vf a = load(image + p * C + c);
        if (sums) {
          const vf da = a - origin;
          if (p % 2) {
            s1b += da;
            s2b += da * da;
          } else {
            s1a += da;
            s2a += da * da;
          }
        }
        const vf v = sg * a;
        const vi t = (v > best) | (v != v);
        best = t ? v : best;
        k = t ? static_cast<int32_t>(p) : k;
      }
      store(picked + n * C + c, sg * best);
      if (index != nullptr) std::memcpy(index + n * C + c, &k, sizeof k);
      if (sums) put_sums(partial + n * 2 * C, C, c, s1a, s1b, s2a, s2b);
    }
  }
}

// grad_x of the global stage, one image per task: coef * (x - mean) + base, plus gain * G at
// each channel's picked position
template <typename T>
void global_grad_rows(const T* xp, const int32_t* index, const T* gy, const T* y, const float* coef,
                      const float* base, const float* mean, const float* gain, T* out, const Shape s,
                      int64_t begin, int64_t end) {
  const int64_t B = s.C / L, C = s.C, P = s.H * s.W;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t c = b * L, at = n * C + c;
      const vf cf = load(coef + c), m = load(mean + c), bs = load(base + c);
      const vf gg = load(y + at) > 0.f ? load(gain + c) * load(gy + at) : vf{};
      vi k;
      std::memcpy(&k, index + at, sizeof k);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t px = (n * P + p) * C + c;
        store(out + px, cf * (load(xp + px) - m) + bs + (k == static_cast<int32_t>(p) ? gg : vf{}));
      }
    }
  }
}

// y = relu(gain * picked + shift) over the pooled values
template <typename T>
void affine_relu(const T* picked, const float* gain, const float* shift, T* y, int64_t rows, int64_t C) {
  at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < C; c += L) {
      const vf g = load(gain + c), sh = load(shift + c);
      for (int64_t r = begin; r < end; ++r) store(y + r * C + c, relu(g * load(picked + r * C + c) + sh));
    }
  });
}

// Per pooled row: sums of G (grad_y where y > 0) and of G * (picked - mean)
template <typename T>
void grad_sums(const T* gy, const T* y, const T* picked, const float* mean, double* partial,
               int64_t rows, int64_t width, int64_t C) {
  const int64_t B = C / L;
  at::parallel_for(0, rows, 1, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double* out = partial + r * 2 * C;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t c = b * L;
        const vf m = load(mean + c);
        vf r1a = vf{}, r1b = vf{}, r2a = vf{}, r2b = vf{};
        int64_t w = 0;
        for (; w + 1 < width; w += 2) {
          const int64_t at = (r * width + w) * C + c;
          const vf g0 = load(y + at) > 0.f ? load(gy + at) : vf{};
          const vf g1 = load(y + at + C) > 0.f ? load(gy + at + C) : vf{};
          r1a += g0;
          r1b += g1;
          r2a += g0 * (load(picked + at) - m);
          r2b += g1 * (load(picked + at + C) - m);
        }
        if (w < width) {
          const int64_t at = (r * width + w) * C + c;
          const vf g0 = load(y + at) > 0.f ? load(gy + at) : vf{};
          r1a += g0;
          r2a += g0 * (load(picked + at) - m);
        }
        put_sums(out, C, c, r1a, r1b, r2a, r2b);
      }
    }
  });
}

// One pair of rows per task: grad_x = coef * (x - mean) + base, plus gain * G where the pool
// picked the value (G: the output's gradient where the ReLU passed it)
template <typename T>
void grad_rows(const T* xp, const uint8_t* index, const T* gy, const T* y, const float* coef,
               const float* base, const float* mean, const float* gain, T* out, const Shape s,
               int64_t begin, int64_t end) {
  const int64_t PH = (s.H + 1) / 2, B = s.C / L, C = s.C, W = s.W, OW = s.OW;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / PH, ph = task % PH;
    const int64_t first = (n * s.H + 2 * ph) * W * C;
    const bool pair = ph < s.OH;
    const int64_t o = (n * s.OH + ph) * OW * C;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t c = b * L;
      const vf cf = load(coef + c), m = load(mean + c), bs = load(base + c), g = load(gain + c);
      int64_t w0 = 0;
      if (pair) {
        const T* top = xp + first;
        const T* bottom = top + W * C;
        T* otop = out + first;
        T* obottom = otop + W * C;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t at = o + ow * C + c, px = 2 * ow * C + c;
          vb kb;
          std::memcpy(&kb, index + at, sizeof kb);
          const vi k = __builtin_convertvector(kb, vi);
          const vf gg = load(y + at) > 0.f ? g * load(gy + at) : vf{};
          store(otop + px, cf * (load(top + px) - m) + bs + (k == 0 ? gg : vf{}));
          store(otop + px + C, cf * (load(top + px + C) - m) + bs + (k == 1 ? gg : vf{}));
          store(obottom + px, cf * (load(bottom + px) - m) + bs + (k == 2 ? gg : vf{}));
          store(obottom + px + C, cf * (load(bottom + px + C) - m) + bs + (k == 3 ? gg : vf{}));
        }
        w0 = 2 * OW;
        for (int64_t w = w0; w < W; ++w) {  // an odd width's last column
          store(otop + w * C + c, cf * (load(top + w * C + c) - m) + bs);
          store(obottom + w * C + c, cf * (load(bottom + w * C + c) - m) + bs);
        }
      } else {  // the last row of an odd height
        for (int64_t w = 0; w < W; ++w) {
          const int64_t px = first + w * C + c;
          store(out + px, cf * (load(xp + px) - m) + bs);
        }
      }
    }
  }
}

template <typename T>
void grad_pass(const T* xp, const uint8_t* index, const T* gy, const T* y, const float* coef,
               const float* base, const float* mean, const float* gain, T* out, Shape s) {
  // the rows in a function of their own: its arguments stay in registers, where a lambda's
  // captures are read again after every store
  at::parallel_for(0, s.tasks(), 1, [=](int64_t begin, int64_t end) {
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
                                  double eps, double factor, bool batch, bool update, bool keep,
                                  bool whole) {
  const Shape s(x, whole);
  const int64_t C = s.C;
  auto fopt = x.options().dtype(at::kFloat);
  auto picked = at::empty({s.N, C, s.OH, s.OW}, x.options(), at::MemoryFormat::ChannelsLast);
  // the window position: 0..3 of a 2x2 window, h*W+w of a whole plane
  const auto index_type = whole ? at::kInt : at::kByte;
  auto index = keep ? at::empty({s.N, s.OH, s.OW, C}, x.options().dtype(index_type)) : at::Tensor();
  auto mean = at::empty({C}, fopt), rstd = at::empty({C}, fopt);
  auto gain = at::empty({C}, fopt);
  std::vector<float> shift(C), sign(C), origin(C, 0.f);
  const float *w = fptr(weight), *b = fptr(bias);
  float *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>(), *g = gain.data_ptr<float>();
  float *sh = shift.data(), *sg = sign.data(), *org = origin.data();
  const T* xp = ptr<T>(x);
  for (int64_t c = 0; c < C; ++c) sg[c] = w[c] < 0.f ? -1.f : 1.f;  // sign(gain) = sign(weight)
  at::Tensor partial;
  if (batch) {
    // the sums are taken about each channel's first value, which keeps E[x^2] - E[x]^2 exact
    // where a channel's mean is large beside its spread
    for (int64_t c0 = 0; c0 < C; c0 += L) store(org + c0, load(xp + c0));
    partial = at::empty({s.tasks(), 2, C}, x.options().dtype(at::kDouble));
  }
  double* pp = batch ? partial.data_ptr<double>() : nullptr;
  if (whole) {
    int32_t* ip = keep ? index.data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, s.tasks(), 1, [=](int64_t begin, int64_t end) {
      global_rows<T>(xp, sg, org, ptr<T>(picked), ip, pp, batch, s, begin, end);
    });
  } else {
    pool_pass<T>(xp, sg, org, ptr<T>(picked), keep ? index.data_ptr<uint8_t>() : nullptr, pp, batch, s);
  }
  if (batch) {
    const auto total = total_of(pp, s.tasks(), 2 * C);
    const double* tp = total.data();
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
  return {y, picked, keep ? index : at::empty({0}, x.options().dtype(index_type)), gain, mean, rstd};
}

// (y, picked, index, gain, mean, rstd): the stage's output and what its backward needs.
// batch: normalise by the batch's statistics (else by the running ones); update: also update
// the running statistics with `factor`; keep: record the pool's choices for a backward;
// whole: a global max-pool (output N x C x 1 x 1), else 2x2 with stride 2.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps, double factor, bool batch, bool update, bool keep,
                                bool whole) {
  check(x);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "at least 2x2 values");
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t{1} << 31), "a plane of fewer than 2^31 values");
  if (x.scalar_type() == at::kFloat)
    return forward_t<float>(x, weight, bias, running_mean, running_var, eps, factor, batch, update, keep, whole);
  return forward_t<uint16_t>(x, weight, bias, running_mean, running_var, eps, factor, batch, update, keep, whole);
}

template <typename T>
std::vector<at::Tensor> backward_t(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& picked,
                                   const at::Tensor& index, const at::Tensor& y, const at::Tensor& gain,
                                   const at::Tensor& mean, const at::Tensor& rstd, bool whole) {
  const Shape s(x, whole);
  const int64_t C = s.C, rows = s.N * s.OH;
  auto fopt = x.options().dtype(at::kFloat);
  auto partial = at::empty({rows, 2, C}, x.options().dtype(at::kDouble));
  grad_sums<T>(ptr<T>(gy), ptr<T>(y), ptr<T>(picked), fptr(mean), partial.data_ptr<double>(), rows, s.OW, C);
  const auto total = total_of(partial.data_ptr<double>(), rows, 2 * C);
  const double* tp = total.data();
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
  const T *xp = ptr<T>(x), *gp = ptr<T>(gy), *yp = ptr<T>(y);
  const float* mp = fptr(mean);
  T* out = ptr<T>(grad);
  if (whole) {
    const int32_t* ip = index.data_ptr<int32_t>();
    at::parallel_for(0, s.tasks(), 1, [=](int64_t begin, int64_t end) {
      global_grad_rows<T>(xp, ip, gp, yp, cf, bs, mp, g, out, s, begin, end);
    });
  } else {
    grad_pass<T>(xp, index.data_ptr<uint8_t>(), gp, yp, cf, bs, mp, g, out, s);
  }
  return {grad, g_weight, g_bias};
}

// (grad_x, grad_weight, grad_bias) from the output's gradient and what forward kept
std::vector<at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& picked,
                                 const at::Tensor& index, const at::Tensor& y, const at::Tensor& gain,
                                 const at::Tensor& mean, const at::Tensor& rstd, bool whole) {
  check(x);
  TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the output's gradient: x's type, channels-last");
  TORCH_CHECK(index.scalar_type() == (whole ? at::kInt : at::kByte), "the forward's window positions");
  if (x.scalar_type() == at::kFloat) return backward_t<float>(gy, x, picked, index, y, gain, mean, rstd, whole);
  return backward_t<uint16_t>(gy, x, picked, index, y, gain, mean, rstd, whole);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
