// Peak multiply-accumulate rate of the inner-loop instructions an x86 AVX2 GEMM can use, one core:
//   fp32:  vfmadd231ps                                   (8 MACs)
//   int16: vpmaddwd + vpaddd                             (16 MACs, exact for 8-bit codes x 8-bit weights)
//   u8s8:  vpmaddubsw + vpmaddwd(ones) + vpaddd          (32 MACs; the pair sum saturates in int16 above 32767:
//          exact only for codes <= 127 or weights within +-64)
// Eight independent accumulators in registers, fed by eight distinct operand pairs that an empty asm makes opaque
// every iteration, so nothing is hoisted out of the loop or shared between accumulators.
// Build and run: g++ -O2 -mavx2 -mfma bench/isa_peak.cpp -o runs/isa_peak && runs/isa_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

constexpr long kIters = 200000000;

template <class Body>
double seconds(Body body) {
  auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < kIters; ++i) body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

#define OPAQUE4(a, b, c, d) asm volatile("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d))

int main() {
  __m256 f0 = _mm256_set1_ps(1e-9f), f1 = _mm256_set1_ps(2e-9f), f2 = _mm256_set1_ps(3e-9f), f3 = _mm256_set1_ps(4e-9f);
  __m256 fx = _mm256_set1_ps(1.0f), fy = _mm256_set1_ps(0.5f);
  __m256 fa0 = _mm256_setzero_ps(), fa1 = fa0, fa2 = fa0, fa3 = fa0, fa4 = fa0, fa5 = fa0, fa6 = fa0, fa7 = fa0;
  double t_fp32 = seconds([&] {
    OPAQUE4(f0, f1, f2, f3);
    fa0 = _mm256_fmadd_ps(f0, fx, fa0); fa1 = _mm256_fmadd_ps(f1, fx, fa1);
    fa2 = _mm256_fmadd_ps(f2, fx, fa2); fa3 = _mm256_fmadd_ps(f3, fx, fa3);
    fa4 = _mm256_fmadd_ps(f0, fy, fa4); fa5 = _mm256_fmadd_ps(f1, fy, fa5);
    fa6 = _mm256_fmadd_ps(f2, fy, fa6); fa7 = _mm256_fmadd_ps(f3, fy, fa7);
  });

  __m256i s0 = _mm256_set1_epi16(1), s1 = _mm256_set1_epi16(2), s2 = _mm256_set1_epi16(3), s3 = _mm256_set1_epi16(4);
  __m256i sx = _mm256_set1_epi16(5), sy = _mm256_set1_epi16(6);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  double t_int16 = seconds([&] {
    OPAQUE4(s0, s1, s2, s3);
    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(s0, sx)); a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(s1, sx));
    a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(s2, sx)); a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(s3, sx));
    a4 = _mm256_add_epi32(a4, _mm256_madd_epi16(s0, sy)); a5 = _mm256_add_epi32(a5, _mm256_madd_epi16(s1, sy));
    a6 = _mm256_add_epi32(a6, _mm256_madd_epi16(s2, sy)); a7 = _mm256_add_epi32(a7, _mm256_madd_epi16(s3, sy));
  });

  __m256i u0 = _mm256_set1_epi8(1), u1 = _mm256_set1_epi8(2), u2 = _mm256_set1_epi8(3), u3 = _mm256_set1_epi8(4);
  __m256i ux = _mm256_set1_epi8(5), uy = _mm256_set1_epi8(6), ones = _mm256_set1_epi16(1);
  __m256i b0 = _mm256_setzero_si256(), b1 = b0, b2 = b0, b3 = b0, b4 = b0, b5 = b0, b6 = b0, b7 = b0;
#define U8S8(acc, u, x) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones))
  double t_u8s8 = seconds([&] {
    OPAQUE4(u0, u1, u2, u3);
    U8S8(b0, u0, ux); U8S8(b1, u1, ux); U8S8(b2, u2, ux); U8S8(b3, u3, ux);
    U8S8(b4, u0, uy); U8S8(b5, u1, uy); U8S8(b6, u2, uy); U8S8(b7, u3, uy);
  });

  float fsum = _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(fa0, fa1), _mm256_add_ps(fa2, fa3)),
                                              _mm256_add_ps(_mm256_add_ps(fa4, fa5), _mm256_add_ps(fa6, fa7))));
  __m256i isum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                                  _mm256_add_epi32(_mm256_add_epi32(a4, a5), _mm256_add_epi32(a6, a7)));
  isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(b0, b1), _mm256_add_epi32(b2, b3)),
                                                 _mm256_add_epi32(_mm256_add_epi32(b4, b5), _mm256_add_epi32(b6, b7))));
  const double calls = static_cast<double>(kIters) * 8;
  std::printf("fp32  vfmadd231ps:             %6.1f GMAC/s\n", calls * 8 / t_fp32 / 1e9);
  std::printf("int16 vpmaddwd+vpaddd:         %6.1f GMAC/s\n", calls * 16 / t_int16 / 1e9);
  std::printf("u8s8  vpmaddubsw+vpmaddwd+add: %6.1f GMAC/s\n", calls * 32 / t_u8s8 / 1e9);
  std::fprintf(stderr, "(checksums %g %d)\n", fsum, _mm256_extract_epi32(isum, 0));
}
