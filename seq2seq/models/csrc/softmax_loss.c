/* The output layer's softmax and cross-entropy over one chunk of rows, in place (see
 * seq2seq/models/loss_kernel.py, which compiles this file on first use and calls it through ctypes):
 *
 *   z[i] = logits[i] + bias,   p[i] = softmax(z[i]),   logits[i] <- p[i] + target_share at target[i]
 *   lse[i] = log sum_v exp z[i, v],   target_logit[i] = z[i, target[i]],   logit_sum[i] = sum_v z[i, v]
 *   bias_parts[part] = sum over the part's rows of what logits[i] ends up holding (the bias's gradient)
 *
 * ATen needs a pass over the chunk for each of these (the bias broadcast into the product's output, the
 * softmax, the gathers, the target's share, the bias gradient's column sums); here each row (8,000 floats,
 * 32 KB) is read from memory once and written once, its three passes in the L1/L2 cache. Rows are shared out
 * over ``threads`` OpenMP threads (built with -fopenmp: the process's one OpenMP runtime, torch's) in parts of
 * ROWS_PER_PART rows, and each part's bias sums are its own, so results do not depend on the thread count.
 * Probabilities below FLT_MIN are written as 0: denormal floats make the gradient's matrix products several
 * times slower on x86, and the OpenMP threads need not flush them. All arrays are contiguous; logits float32
 * [N, V], target int64 [N], bias [V] or NULL, bias_parts [ceil(N / ROWS_PER_PART), V] or NULL.
 *
 * softmax_loss_bf16 does the same for a bfloat16 product's logits [N, V]: each row is widened into a float32
 * row of the thread's own, the bias added there (in float32, not bfloat16), and the result rounded to bfloat16
 * (to nearest even, as torch rounds) into grad [N, V], which may be the logits themselves. That saves the
 * bfloat16 path its two conversions of the whole chunk besides ATen's passes.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS_PER_PART 64

/* e^x for x <= 0 (a softmax's x - max): 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r a degree-6
   polynomial (Cephes' coefficients), within 2 ulp of expf. Below -87 (e^-87 ~ FLT_MIN) x is clamped, so that
   2^n stays a normal float; the caller takes such results as 0. Written without branches so that the loops
   that call it vectorise. */
static inline float exp_nonpositive(float x) {
    x = x > -87.0f ? x : -87.0f;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;  /* ln 2 in two parts, so that r is exact */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* The passes after the first, on a float32 row z [V] that holds the logits with the bias: z becomes the
   softmax plus target_share at target (probabilities below FLT_MIN as 0), added into sums [V] when not NULL.
   Returns the log-sum-exp. */
static inline float softmax_row(float *restrict z, int64_t V, float highest, int64_t target, float target_share,
                                float *restrict sums) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; ++v) {
        const float d = z[v] - highest;
        const float e = d >= -87.0f ? exp_nonpositive(d) : 0.f;
        z[v] = e;
        sum += e;
    }
    const float scale = 1.f / sum;
    if (sums) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            const float p = z[v] * scale;
            z[v] = p >= FLT_MIN ? p : 0.f;
            sums[v] += z[v];
        }
        sums[target] += target_share;
    } else {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            const float p = z[v] * scale;
            z[v] = p >= FLT_MIN ? p : 0.f;
        }
    }
    z[target] += target_share;
    return highest + logf(sum);
}

void softmax_loss(float *restrict logits, const float *restrict bias, const int64_t *restrict target,
                  float target_share, float *restrict lse, float *restrict target_logit, float *restrict logit_sum,
                  float *restrict bias_parts, int64_t N, int64_t V, int64_t threads) {
    const int64_t parts = (N + ROWS_PER_PART - 1) / ROWS_PER_PART;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t part = 0; part < parts; ++part) {
        float *restrict sums = bias_parts ? bias_parts + part * V : NULL;
        if (sums) memset(sums, 0, (size_t)V * sizeof(float));
        const int64_t end = (part + 1) * ROWS_PER_PART < N ? (part + 1) * ROWS_PER_PART : N;
        for (int64_t i = part * ROWS_PER_PART; i < end; ++i) {
            float *restrict z = logits + i * V;
            float highest = -FLT_MAX, total = 0.f;
            if (bias) {
#pragma omp simd reduction(max : highest) reduction(+ : total)
                for (int64_t v = 0; v < V; ++v) {
                    const float zv = z[v] + bias[v];
                    z[v] = zv;
                    highest = zv > highest ? zv : highest;
                    total += zv;
                }
            } else {
#pragma omp simd reduction(max : highest) reduction(+ : total)
                for (int64_t v = 0; v < V; ++v) {
                    highest = z[v] > highest ? z[v] : highest;
                    total += z[v];
                }
            }
            target_logit[i] = z[target[i]];
            logit_sum[i] = total;
            lse[i] = softmax_row(z, V, highest, target[i], target_share, sums);
        }
    }
}

static inline float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)b << 16;
    return x.f;
}

static inline uint16_t to_bf16(float f) {  /* to nearest, ties to even (finite values) */
    union { float f; uint32_t u; } x;
    x.f = f;
    return (uint16_t)((x.u + 0x7FFFu + ((x.u >> 16) & 1u)) >> 16);
}

/* As softmax_loss, for bfloat16 logits [N, V] (raw 16-bit patterns), the result rounded into grad [N, V]
   (may be logits). Returns nonzero where a thread's float32 row could not be allocated. */
int softmax_loss_bf16(const uint16_t *logits, const float *restrict bias, const int64_t *restrict target,
                      float target_share, float *restrict lse, float *restrict target_logit,
                      float *restrict logit_sum, float *restrict bias_parts, uint16_t *grad, int64_t N, int64_t V,
                      int64_t threads) {
    const int64_t parts = (N + ROWS_PER_PART - 1) / ROWS_PER_PART;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *restrict z = malloc((size_t)V * sizeof(float));  /* this thread's float32 row */
        if (!z) failed = 1;
#pragma omp for schedule(static)
        for (int64_t part = 0; part < parts; ++part) {
            if (!z) continue;
            float *restrict sums = bias_parts ? bias_parts + part * V : NULL;
            if (sums) memset(sums, 0, (size_t)V * sizeof(float));
            const int64_t end = (part + 1) * ROWS_PER_PART < N ? (part + 1) * ROWS_PER_PART : N;
            for (int64_t i = part * ROWS_PER_PART; i < end; ++i) {
                const uint16_t *row = logits + i * V;
                float highest = -FLT_MAX, total = 0.f;
#pragma omp simd reduction(max : highest) reduction(+ : total)
                for (int64_t v = 0; v < V; ++v) {
                    const float zv = from_bf16(row[v]) + (bias ? bias[v] : 0.f);
                    z[v] = zv;
                    highest = zv > highest ? zv : highest;
                    total += zv;
                }
                target_logit[i] = z[target[i]];
                logit_sum[i] = total;
                lse[i] = softmax_row(z, V, highest, target[i], target_share, sums);
                uint16_t *out = grad + i * V;
#pragma omp simd
                for (int64_t v = 0; v < V; ++v) out[v] = to_bf16(z[v]);
            }
        }
        free(z);
    }
    return failed;
}
