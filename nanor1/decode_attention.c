/* One decode step of attention over a bf16 KV cache, for x86 CPUs with AVX-512 BF16 (nanor1/decode_attention.py).

   Each query row attends to its cache row's keys 0..pos[b], its own new key at pos[b] included. At decode's sizes the work is a few dot products per
   cached key: the generic kernels (batched matmuls, or Inductor's fused reduction) spend most of their time
   around them, so this kernel reads each key and value row once per query group, straight from the cache. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "this kernel needs AVX-512 BF16"
#endif

/* x rounded to the nearest bf16 (ties to even), as torch's cast of the probabilities to bf16 does */
static inline float round_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  memcpy(&x, &u, 4);
  return x;
}

/* q (B, KV, G, D): G query heads share each kv head. key_cache, value_cache: (B, KV, C, D) with row stride
   row_stride and head stride head_stride (elements), the last two dims contiguous. pos: (B,) each row's new
   position, its key and value already written there. out: like q. D is a multiple of 32, at most 256. */
void decode_attention(const uint16_t *q, const uint16_t *key_cache, const uint16_t *value_cache,
                      const int64_t *pos, uint16_t *out, int B, int KV, int G, int D, int64_t row_stride,
                      int64_t head_stride, float scale) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; b++)
    for (int h = 0; h < KV; h++) {
      const int n = (int)pos[b], W = D / 32;
      const uint16_t *K = key_cache + b * row_stride + h * head_stride;
      const uint16_t *V = value_cache + b * row_stride + h * head_stride;
      float s[n + 1];
      for (int g = 0; g < G; g++) {
        const int64_t row = ((int64_t)b * KV + h) * G + g;
        __m512bh qv[8];
        for (int w = 0; w < W; w++) qv[w] = (__m512bh)_mm512_loadu_si512(q + row * D + 32 * w);
        /* scores: bf16 pairs multiplied and summed in float32 (vdpbf16ps), as oneDNN's bf16 matmul does */
        for (int j = 0; j <= n; j++) {
          const uint16_t *k = K + (int64_t)j * D;
          for (int w = 0; w < W; w++) _mm_prefetch((const char *)(V + (int64_t)j * D + 32 * w), _MM_HINT_T0);
          __m512 acc = _mm512_setzero_ps();
          for (int w = 0; w < W; w++) acc = _mm512_dpbf16_ps(acc, qv[w], (__m512bh)_mm512_loadu_si512(k + 32 * w));
          s[j] = _mm512_reduce_add_ps(acc) * scale;
        }
        float m = s[n], z = 0.f;
        for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        for (int j = 0; j <= n; j++) z += s[j] = expf(s[j] - m);
        const float inv_z = 1.f / z;
        __m512 o[16];
        for (int w = 0; w < 2 * W; w++) o[w] = _mm512_setzero_ps();
        for (int j = 0; j <= n; j++) {
          const uint16_t *v = V + (int64_t)j * D;
          for (int w = 0; w < W; w++) _mm_prefetch((const char *)(K + head_stride + (int64_t)j * D + 32 * w), _MM_HINT_T0);
          const __m512 p = _mm512_set1_ps(round_bf16(s[j] * inv_z));
          for (int w = 0; w < 2 * W; w++)
            o[w] = _mm512_fmadd_ps(p, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(v + 16 * w))),
                                   o[w]);
        }
        for (int w = 0; w < 2 * W; w++)
          _mm256_storeu_si256((__m256i *)(out + row * D + 16 * w), (__m256i)_mm512_cvtneps_pbh(o[w]));
      }
    }
}
