// Group-wise int4 x float / int8 linear kernels for CPU decode (batch 1..16), one translation unit.
//
// Weight layout (made once at load time by cluster/kernels/__init__.py:repack): w (N, K/2) uint8 in
// blocks of 32 input columns; byte i of a block holds column i in its low nibble and column i + 16
// in its high nibble (codes 0..15). Per output row n and group g (group_size columns):
//     W[n, k] = q[n, k] * scale[n, g] + offset[n, g]        (offset = zero - 8 * scale)
//
//   int4_f32(x (M,K) f32, w, scale (N,G), offset (N,G), group_size) -> (M,N) f32
//       weight-only: each 32-column block is dequantized in registers and FMA'd with every row of x.
//   int4_a8(x (M,K) f32, w, scale, offset, group_size) -> (M,N) f32
//       x is quantized per row to int8 (s = amax/127, round half to even, as cluster.quant does);
//       integer dots per group (vpdpbusd on AVX512-VNNI, pmaddubsw/pmaddwd on AVX2), scaled per group:
//       y[m,n] = s_m * sum_g scale[n,g] * sum_{k in g} q[n,k] xq[m,k] + sum_g offset[n,g] * s_m * sum_{k in g} xq[m,k].
//
// The ISA is chosen at run time (__builtin_cpu_supports): AVX-512 (f, bw, vl, vnni) or AVX2+FMA;
// the TU is compiled without -march so it loads on any x86-64. Output channels are split across
// torch's OpenMP threads (at::parallel_for), so torch.set_num_threads applies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define T256 __attribute__((target("avx2,fma")))

enum class Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kNone;
}

Isa isa() {
  static const Isa chosen = [] {
    const char* force = std::getenv("RETORT_INT4_ISA");  // "avx2": test the AVX2 path on an AVX-512 box
    Isa best = detect_isa();
    if (force && std::string(force) == "avx2" && best != Isa::kNone) return Isa::kAvx2;
    return best;
  }();
  return chosen;
}

struct Args {
  const uint8_t* w;    // (N, K/2)
  const float* scale;  // (N, G)
  const float* offset; // (N, G)
  int64_t K, N, G, gs;
};

// ----------------------------------------------------------------------------- AVX-512

T512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// NB output rows x MB input rows, weight-only. Per (row, group) the 16 possible weights
// q * scale + offset form one register; vpermps looks each column's weight up by its code (it reads
// only the low 4 bits of each lane, so the high nibble needs no masking).
template <int NB, int MB>
T512 void f32_tile_512(const Args& a, const float* x, int64_t n0, float* y) {
  __m512 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t kb = a.K / 2;
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 lut[NB];
    for (int i = 0; i < NB; ++i)
      lut[i] = _mm512_fmadd_ps(iota, _mm512_set1_ps(a.scale[(n0 + i) * a.G + g]),
                               _mm512_set1_ps(a.offset[(n0 + i) * a.G + g]));
    for (int64_t k = g * a.gs; k < (g + 1) * a.gs; k += 32) {
      for (int i = 0; i < NB; ++i) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a.w + (n0 + i) * kb + k / 2)));
        __m512 w0 = _mm512_permutexvar_ps(v, lut[i]);                         // cols 0..15
        __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut[i]);  // cols 16..31
        for (int j = 0; j < MB; ++j) {
          acc[i][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * a.K + k), acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j * a.K + k + 16), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) y[j * a.N + n0 + i] = hsum512(acc[i][j]);
}

// 32 int4 codes of one block -> 32 uint8 lanes in column order.
T512 inline __m256i codes_256_vnni(const uint8_t* p) {
  const __m128i low = _mm_set1_epi8(0xF);
  __m128i v = _mm_loadu_si128((const __m128i*)p);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

T512 inline float dot_masked_512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return hsum512(acc);
}

// xq (M, K) int8, xs (M,) per-row scale, xsum (M, G) = xs * per-group sums of xq.
template <int NB, int MB>
T512 void a8_tile_512(const Args& a, const int8_t* xq, const float* xs, const float* xsum, int64_t n0, float* y) {
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t kb = a.K / 2;
  for (int64_t g = 0; g < a.G; ++g) {
    __m256i d[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) d[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * a.gs; k < (g + 1) * a.gs; k += 32) {
      for (int i = 0; i < NB; ++i) {
        __m256i wq = codes_256_vnni(a.w + (n0 + i) * kb + k / 2);
        for (int j = 0; j < MB; ++j)
          d[i][j] = _mm256_dpbusd_epi32(d[i][j], wq, _mm256_loadu_si256((const __m256i*)(xq + j * a.K + k)));
      }
    }
    for (int i = 0; i < NB; ++i) {
      __m256 s = _mm256_set1_ps(a.scale[(n0 + i) * a.G + g]);
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][j]), s, acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i) {
    for (int j = 0; j < MB; ++j) {
      __m256 v = acc[i][j];
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[j * a.N + n0 + i] = xs[j] * _mm_cvtss_f32(h) +
                            dot_masked_512(a.offset + (n0 + i) * a.G, xsum + j * a.G, a.G);
    }
  }
}

// Per-row dynamic int8: s = max(amax / 127, 1e-10); q = clamp(round_half_even(x / s), -127, 127).
T512 void quantize_rows_512(const float* x, int64_t M, int64_t K, int8_t* q, float* s) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
    float sc = std::max(_mm512_reduce_max_ps(mx) / 127.0f, 1e-10f);
    __m512 sv = _mm512_set1_ps(sc), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int64_t k = 0; k < K; k += 16) {
      __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(r + k), sv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      _mm_storeu_si128((__m128i*)(q + m * K + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    s[m] = sc;
  }
}

// ----------------------------------------------------------------------------- AVX2

T256 inline float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

template <int NB, int MB>
T256 void f32_tile_256(const Args& a, const float* x, int64_t n0, float* y) {
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xF);
  const int64_t kb = a.K / 2;
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 s[NB], c[NB];
    for (int i = 0; i < NB; ++i) {
      s[i] = _mm256_set1_ps(a.scale[(n0 + i) * a.G + g]);
      c[i] = _mm256_set1_ps(a.offset[(n0 + i) * a.G + g]);
    }
    for (int64_t k = g * a.gs; k < (g + 1) * a.gs; k += 32) {
      for (int i = 0; i < NB; ++i) {
        __m128i v = _mm_loadu_si128((const __m128i*)(a.w + (n0 + i) * kb + k / 2));
        __m256i va = _mm256_cvtepu8_epi32(v);                     // bytes 0..7
        __m256i vb = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));  // bytes 8..15
        __m256 w[4] = {
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(va, low)), s[i], c[i]),  // cols 0..7
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(vb, low)), s[i], c[i]),  // cols 8..15
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(va, 4)), s[i], c[i]),   // cols 16..23
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(vb, 4)), s[i], c[i]),   // cols 24..31
        };
        for (int j = 0; j < MB; ++j)
          for (int t = 0; t < 4; ++t)
            acc[i][j] = _mm256_fmadd_ps(w[t], _mm256_loadu_ps(x + j * a.K + k + 8 * t), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) y[j * a.N + n0 + i] = hsum256(acc[i][j]);
}

template <int NB, int MB>
T256 void a8_tile_256(const Args& a, const int8_t* xq, const float* xs, const float* xsum, int64_t n0, float* y) {
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(0xF);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t kb = a.K / 2;
  for (int64_t g = 0; g < a.G; ++g) {
    __m256i d[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) d[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * a.gs; k < (g + 1) * a.gs; k += 32) {
      for (int i = 0; i < NB; ++i) {
        __m128i v = _mm_loadu_si128((const __m128i*)(a.w + (n0 + i) * kb + k / 2));
        __m256i wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
        for (int j = 0; j < MB; ++j) {  // u8 x s8 pairs -> s16 (|.| <= 2*15*127, no saturation) -> s32
          __m256i p = _mm256_maddubs_epi16(wq, _mm256_loadu_si256((const __m256i*)(xq + j * a.K + k)));
          d[i][j] = _mm256_add_epi32(d[i][j], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int i = 0; i < NB; ++i) {
      __m256 s = _mm256_set1_ps(a.scale[(n0 + i) * a.G + g]);
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][j]), s, acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      float off = 0.f;
      for (int64_t g = 0; g < a.G; ++g) off += a.offset[(n0 + i) * a.G + g] * xsum[j * a.G + g];
      y[j * a.N + n0 + i] = xs[j] * hsum256(acc[i][j]) + off;
    }
}

// ----------------------------------------------------------------------------- dispatch

// Runs Tile<NB, MB> over output rows [n0, n1) for MB input rows starting at row pointer offsets.
template <int MB, typename Tile>
void rows(int64_t n0, int64_t n1, Tile tile) {
  constexpr int NB = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile.template call<NB, MB>(n);
  for (; n < n1; ++n) tile.template call<1, MB>(n);
}

// Splits M input rows into blocks of 8/4/2/1 and N output rows across threads.
template <typename Make>
void run_blocks(int64_t M, int64_t N, int64_t K, Make make) {
  const int64_t grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(K, 1));  // rows per task
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) rows<8>(n0, n1, make(m));
    for (; m + 4 <= M; m += 4) rows<4>(n0, n1, make(m));
    for (; m + 2 <= M; m += 2) rows<2>(n0, n1, make(m));
    for (; m < M; ++m) rows<1>(n0, n1, make(m));
  });
}

// One (x rows, output rows) tile of each kernel, at the ISA chosen at run time.
struct F32Tile {
  const Args& a; const float* x; float* y; bool wide;
  template <int NB, int MB> void call(int64_t n) const {
    if (wide) f32_tile_512<NB, MB>(a, x, n, y); else f32_tile_256<NB, MB>(a, x, n, y);
  }
};

struct A8Tile {
  const Args& a; const int8_t* xq; const float* xs; const float* xsum; float* y; bool wide;
  template <int NB, int MB> void call(int64_t n) const {
    if (wide) a8_tile_512<NB, MB>(a, xq, xs, xsum, n, y); else a8_tile_256<NB, MB>(a, xq, xs, xsum, n, y);
  }
};

Args check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
           int64_t gs) {
  TORCH_CHECK(isa() != Isa::kNone, "retort int4 kernel: this CPU has neither AVX2+FMA nor AVX-512");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "retort int4 kernel: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2, "w must be contiguous uint8 (N, K/2)");
  const int64_t K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K, "w has ", w.size(1) * 2, " columns, x has ", K);
  TORCH_CHECK(gs % 32 == 0 && gs > 0 && K % gs == 0, "group_size ", gs, " must be a multiple of 32 dividing ", K);
  const int64_t G = K / gs;
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == N && t->size(1) == G,
                "scale/offset must be contiguous float32 (", N, ", ", G, ")");
  return Args{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), K, N, G, gs};
}

at::Tensor int4_f32(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                    int64_t group_size) {
  const Args a = check(x, w, scale, offset, group_size);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, a.N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool wide = isa() == Isa::kAvx512;
  run_blocks(M, a.N, a.K, [&](int64_t m) { return F32Tile{a, xp + m * a.K, yp + m * a.N, wide}; });
  return y;
}

T256 void quantize_rows_256(const float* x, int64_t M, int64_t K, int8_t* q, float* s) {
  for (int64_t m = 0; m < M; ++m) {  // scalar is fine here: AVX2 machines are the fallback
    const float* r = x + m * K;
    float mx = 0.f;
    for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    float sc = std::max(mx / 127.0f, 1e-10f);
    for (int64_t k = 0; k < K; ++k) q[m * K + k] = (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint(r[k] / sc)));
    s[m] = sc;
  }
}

at::Tensor int4_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& offset,
                   int64_t group_size) {
  const Args a = check(x, w, scale, offset, group_size);
  const int64_t M = x.size(0);
  at::Tensor xq = at::empty({M, a.K}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M}, x.options());
  at::Tensor xsum = at::empty({M, a.G}, x.options());
  const bool wide = isa() == Isa::kAvx512;
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  float* gp = xsum.data_ptr<float>();
  if (wide) quantize_rows_512(x.data_ptr<float>(), M, a.K, qp, sp); else quantize_rows_256(x.data_ptr<float>(), M, a.K, qp, sp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < a.G; ++g) {
      int32_t t = 0;
      for (int64_t k = g * a.gs; k < (g + 1) * a.gs; ++k) t += qp[m * a.K + k];
      gp[m * a.G + g] = sp[m] * (float)t;
    }
  at::Tensor y = at::empty({M, a.N}, x.options());
  float* yp = y.data_ptr<float>();
  run_blocks(M, a.N, a.K, [&](int64_t m) { return A8Tile{a, qp + m * a.K, sp + m, gp + m * a.G, yp + m * a.N, wide}; });
  return y;
}

std::string int4_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

}  // namespace

TORCH_LIBRARY(retort_int4, m) {
  m.def("int4_f32(Tensor x, Tensor w, Tensor scale, Tensor offset, int group_size) -> Tensor", &int4_f32);
  m.def("int4_a8(Tensor x, Tensor w, Tensor scale, Tensor offset, int group_size) -> Tensor", &int4_a8);
  m.def("isa() -> str", &int4_isa);
}
