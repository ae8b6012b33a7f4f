/* One decode step of attention over a bf16 KV cache, for x86 CPUs with AVX-512 BF16 (nanor1/decode_attention.py).

   Each query row attends to its cache row's keys up to its position, its own new key included, and reads a
   prompt that several rows share from one copy. At decode's sizes the work is a few dot products per cached key:
   eager torch ops (batched matmuls of one row each, a mask, a softmax) spend most of their time around them, so
   this kernel reads each key and value row once per query group, straight from the cache. */
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

/* q (B, KV, G, D): G query heads share each kv head. key_cache, value_cache: one layer's whole cache
   (n_slots, KV, C, D) with slot stride slot_stride and head stride head_stride (elements), the last two dims
   contiguous. Query row b is slot rows[b], at position pos[b], where its new key and value new_k, new_v
   (B, KV, D) are written first; its first shared[b] positions are read from slot source[b] instead (a prompt
   that several rows share is kept once). out: like q. D is a multiple of 32, at most 256. */
void decode_attention(const uint16_t *q, uint16_t *key_cache, uint16_t *value_cache, const uint16_t *new_k,
                      const uint16_t *new_v, const int64_t *rows, const int64_t *source, const int64_t *shared, const int64_t *pos,
                      uint16_t *out, int B, int KV, int G, int D, int64_t slot_stride, int64_t head_stride,
                      float scale) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; b++)
    for (int h = 0; h < KV; h++) {
      const int n = (int)pos[b], W = D / 32, P = shared[b] < n + 1 ? (int)shared[b] : n + 1;
      const int64_t own = rows[b] * slot_stride + h * head_stride, src = source[b] * slot_stride + h * head_stride;
      /* the write lands in lines this row reads next, unlike a scattered index_put over the whole cache */
      memcpy(key_cache + own + (int64_t)n * D, new_k + ((int64_t)b * KV + h) * D, D * sizeof(uint16_t));
      memcpy(value_cache + own + (int64_t)n * D, new_v + ((int64_t)b * KV + h) * D, D * sizeof(uint16_t));
      float s[n + 1];
      for (int g = 0; g < G; g++) {
        const int64_t row = ((int64_t)b * KV + h) * G + g;
        __m512bh qv[8];
        for (int w = 0; w < W; w++) qv[w] = (__m512bh)_mm512_loadu_si512(q + row * D + 32 * w);
        /* scores: bf16 pairs multiplied and summed in float32 (vdpbf16ps), as oneDNN's bf16 matmul does */
        for (int j = 0; j <= n; j++) {
          const int64_t at = (j < P ? src : own) + (int64_t)j * D;
          for (int w = 0; w < W; w++) _mm_prefetch((const char *)(value_cache + at + 32 * w), _MM_HINT_T0);
          __m512 acc = _mm512_setzero_ps();
          for (int w = 0; w < W; w++)
            acc = _mm512_dpbf16_ps(acc, qv[w], (__m512bh)_mm512_loadu_si512(key_cache + at + 32 * w));
          s[j] = _mm512_reduce_add_ps(acc) * scale;
        }
        float m = s[n], z = 0.f;
        for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        for (int j = 0; j <= n; j++) z += s[j] = expf(s[j] - m);
        const float inv_z = 1.f / z;
        __m512 o[16];
        for (int w = 0; w < 2 * W; w++) o[w] = _mm512_setzero_ps();
        for (int j = 0; j <= n; j++) {
          const uint16_t *v = value_cache + (j < P ? src : own) + (int64_t)j * D;
          if (j >= P) /* the next head's own keys, while these values are summed */
            for (int w = 0; w < W; w++)
              _mm_prefetch((const char *)(key_cache + own + head_stride + (int64_t)j * D + 32 * w), _MM_HINT_T0);
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
