/* Hand-written kernels for one decode step of a Llama-family model in bf16 on x86 CPUs with AVX-512 BF16
   (nanor1/cpu_decode.py): the attention, a residual add with the RMSNorm after it, and SwiGLU's product.

   At decode's sizes (a few dozen rows) each of these is little work, and eager torch ops spend most of their time
   around it: a launch, an allocation and a cast per op, a few ops per step of the formula. The attention is a few
   dot products per cached key: it rotates its row's query and new key, writes the key and value into the cache,
   and reads each cached key and value once, a prompt that several rows share from one copy. Each kernel rounds
   to bf16 where torch's bf16 ops round. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
#error "this kernel needs AVX-512 BF16"
#endif

static inline float from_bf16(uint16_t x) {
  uint32_t u = (uint32_t)x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* x rounded to the nearest bf16 (ties to even), as torch's casts to bf16 do */
static inline uint16_t to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* x_i * cos_i + rotate_half(x)_i * sin_i for one head (D), with torch's bf16 roundings of each product and the sum:
   the Hugging Face Llama family's rotary embedding */
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int D) {
  const int half = D / 2;
  for (int d = 0; d < D; d++) {
    const float other = d < half ? -from_bf16(x[d + half]) : from_bf16(x[d - half]);
    out[d] = to_bf16(from_bf16(to_bf16(from_bf16(x[d]) * from_bf16(cos[d]))) +
                     from_bf16(to_bf16(other * from_bf16(sin[d]))));
  }
}

/* qkv (B, (KV * G + 2 * KV), D): each row's q heads (G per kv head), then its new keys and values, the keys and
   queries before their rotation by cos, sin (B, D). key_cache, value_cache: one layer's whole cache
   (n_slots, KV, C, D) with slot stride slot_stride and head stride head_stride (elements), the last two dims
   contiguous. Query row b is slot rows[b], at position pos[b], where its rotated key and its value are written
   first; its first shared[b] positions are read from slot source[b] instead (a prompt that several rows share
   is kept once). out: (B, KV, G, D). D is a multiple of 32, at most 256. */
void decode_attention(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *key_cache,
                      uint16_t *value_cache, const int64_t *rows, const int64_t *source, const int64_t *shared,
                      const int64_t *pos, uint16_t *out, int B, int KV, int G, int D, int64_t slot_stride,
                      int64_t head_stride, float scale) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; b++)
    for (int h = 0; h < KV; h++) {
      const int n = (int)pos[b], W = D / 32, P = shared[b] < n + 1 ? (int)shared[b] : n + 1;
      const int64_t own = rows[b] * slot_stride + h * head_stride, src = source[b] * slot_stride + h * head_stride;
      const uint16_t *heads = qkv + (int64_t)b * (KV * G + 2 * KV) * D, *cb = cos + (int64_t)b * D,
                     *sb = sin + (int64_t)b * D;
      /* the writes land in lines this row reads next, unlike a scattered index_put over the whole cache */
      rotate(heads + (int64_t)(KV * G + h) * D, cb, sb, key_cache + own + (int64_t)n * D, D);
      memcpy(value_cache + own + (int64_t)n * D, heads + (int64_t)(KV * G + KV + h) * D, D * sizeof(uint16_t));
      float s[n + 1];
      for (int g = 0; g < G; g++) {
        const int64_t row = ((int64_t)b * KV + h) * G + g;
        uint16_t q[256];
        rotate(heads + (int64_t)(h * G + g) * D, cb, sb, q, D);
        __m512bh qv[8];
        for (int w = 0; w < W; w++) qv[w] = (__m512bh)_mm512_loadu_si512(q + 32 * w);
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
          const __m512 p = _mm512_set1_ps(from_bf16(to_bf16(s[j] * inv_z)));
          for (int w = 0; w < 2 * W; w++)
            o[w] = _mm512_fmadd_ps(p, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(v + 16 * w))),
                                   o[w]);
        }
        for (int w = 0; w < 2 * W; w++)
          _mm256_storeu_si256((__m256i *)(out + row * D + 16 * w), (__m256i)_mm512_cvtneps_pbh(o[w]));
      }
    }
}

/* x (N, C) += y (N, C) where y is given (rounded to bf16, as torch's bf16 add), then out = w * bf16(x / rms(x)),
   the Llama family's RMSNorm with its roundings: the normalised row to bf16, then its product with w to bf16. */
void add_rms_norm(uint16_t *x, const uint16_t *y, const uint16_t *w, uint16_t *out, int N, int C, float eps) {
  for (int i = 0; i < N; i++) {
    uint16_t *xi = x + (int64_t)i * C;
    if (y)
      for (int c = 0; c < C; c++) xi[c] = to_bf16(from_bf16(xi[c]) + from_bf16(y[(int64_t)i * C + c]));
    float ss = 0.f;
    for (int c = 0; c < C; c++) ss += from_bf16(xi[c]) * from_bf16(xi[c]);
    const float r = 1.f / sqrtf(ss / C + eps);
    for (int c = 0; c < C; c++)
      out[(int64_t)i * C + c] = to_bf16(from_bf16(w[c]) * from_bf16(to_bf16(from_bf16(xi[c]) * r)));
  }
}

/* gate_up (N, 2F) -> out (N, F) = bf16(bf16(silu(gate)) * up), as torch's bf16 silu and product */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int N, int F) {
  for (int i = 0; i < N; i++) {
    const uint16_t *g = gate_up + (int64_t)i * 2 * F, *u = g + F;
    for (int f = 0; f < F; f++) {
      const float a = from_bf16(g[f]);
      out[(int64_t)i * F + f] = to_bf16(from_bf16(to_bf16(a / (1.f + expf(-a)))) * from_bf16(u[f]));
    }
  }
}
