/* The additive attention, forward and backward, one pass each (see seq2seq/models/additive_kernel.py, which
 * compiles this file on first use and calls it through ctypes):
 *
 *   score[b, t, s] = sum_a v[a] tanh(q[b, t, a] + k[b, s, a]),   masked positions left out
 *   weights[b, t] = softmax_s(score[b, t]),   context[b, t] = sum_s weights[b, t, s] memory[b, s]
 *
 * ATen computes the scores as a [B, T, S, A] sum, a tanh and a product with v, then a masked softmax and a
 * batched product with the memory, and their gradients in as many passes again (the memory's gradient a
 * batched outer product that ran at 1-5 GFLOP/s), saving the tanh for the backward pass. Here each element is
 * formed, used and dropped in registers, the backward pass recomputes the tanh, and masked (padding) positions
 * are skipped. The sentences are shared out over ``threads`` OpenMP threads (built with -fopenmp, the
 * process's one OpenMP runtime, torch's; otherwise the pragmas are ignored and one thread runs it all):
 * sentence b's results are computed by one thread, the same whatever the thread count. All tensors are
 * contiguous float32.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tanh_rational.h"

/* q [B, T, A], k [B, S, A], v [A], mask [B, S] (1 = real), memory [B, S, H] -> weights [B, T, S] (0 at masked
 * positions), context [B, T, H]. Every row has a real position (sources are never empty). */
void additive_attention_forward(const float *restrict q, const float *restrict k, const float *restrict v,
                                const uint8_t *restrict mask, const float *restrict memory,
                                float *restrict weights, float *restrict context,
                                int64_t B, int64_t T, int64_t S, int64_t A, int64_t H, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const float *restrict qt = q + (b * T + t) * A;
            float *restrict w = weights + (b * T + t) * S;
            float highest = -FLT_MAX;
            for (int64_t s = 0; s < S; ++s) {
                if (!mask[b * S + s]) continue;
                const float *restrict ks = k + (b * S + s) * A;
                float score = 0.f;
#pragma omp simd reduction(+ : score)
                for (int64_t a = 0; a < A; ++a) score += v[a] * tanh_rational(qt[a] + ks[a]);
                w[s] = score;
                highest = score > highest ? score : highest;
            }
            float total = 0.f;
            for (int64_t s = 0; s < S; ++s) {
                w[s] = mask[b * S + s] ? expf(w[s] - highest) : 0.f;
                total += w[s];
            }
            const float scale = 1.f / total;
            float *restrict c = context + (b * T + t) * H;
            memset(c, 0, (size_t)H * sizeof(float));
            for (int64_t s = 0; s < S; ++s) {
                if (!mask[b * S + s]) continue;
                const float ws = (w[s] *= scale);
                const float *restrict ms = memory + (b * S + s) * H;
#pragma omp simd
                for (int64_t h = 0; h < H; ++h) c[h] += ws * ms[h];
            }
        }
    }
}

/* The gradients, given the forward pass's weights and dL/dcontext [B, T, H] and dL/dweights [B, T, S] (NULL: 0).
 * grad_q [B, T, A], grad_k [B, S, A] and grad_memory [B, S, H] are written (not added to); the scores'
 * gradient goes through grad_scores [B, T, S]; v's gradient comes in parts: grad_v_parts[p] sums the
 * sentences p * SENTENCES_PER_PART <= b < (p + 1) * SENTENCES_PER_PART, so that the caller's sum of the parts
 * does not depend on how many threads ran them. With y = tanh(q + k) and d = g_score v (1 - y^2):
 * grad_q[b, t] = sum_s d, grad_k[b, s] = sum_t d, grad_v = sum g_score y.
 *
 * Any of grad_q, grad_k, grad_v_parts and grad_memory may be NULL (not computed), and with scores_given the
 * scores' gradient is read from grad_scores rather than computed (dL/dcontext then only serves grad_memory).
 * Training's step-by-step loop uses this to split the work (additive_kernel.py, StepGradients): each step's
 * backward pass computes grad_scores and grad_q only, and one call after the last step the keys', v's and
 * the memory's gradients of all steps, which are then summed in registers rather than written per step. */
#define SENTENCES_PER_PART 8
void additive_attention_backward(const float *restrict q, const float *restrict k, const float *restrict v,
                                 const uint8_t *restrict mask, const float *restrict memory,
                                 const float *restrict weights, const float *restrict grad_context,
                                 const float *restrict grad_weights, float *restrict grad_scores,
                                 int64_t scores_given, float *restrict grad_q, float *restrict grad_k,
                                 float *restrict grad_v_parts, float *restrict grad_memory,
                                 int64_t B, int64_t T, int64_t S, int64_t A, int64_t H, int64_t threads) {
    const int64_t parts = (B + SENTENCES_PER_PART - 1) / SENTENCES_PER_PART;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t part = 0; part < parts; ++part) {
        float *restrict gv = grad_v_parts ? grad_v_parts + part * A : NULL;
        if (gv) memset(gv, 0, (size_t)A * sizeof(float));
        const int64_t b_end = (part + 1) * SENTENCES_PER_PART < B ? (part + 1) * SENTENCES_PER_PART : B;
        for (int64_t b = part * SENTENCES_PER_PART; b < b_end; ++b) {
            if (grad_q) memset(grad_q + b * T * A, 0, (size_t)(T * A) * sizeof(float));
            if (grad_k) memset(grad_k + b * S * A, 0, (size_t)(S * A) * sizeof(float));
            if (grad_memory) memset(grad_memory + b * S * H, 0, (size_t)(S * H) * sizeof(float));
            /* the context's product and the softmax, backwards: the scores' gradient (and the memory's) */
            for (int64_t t = 0; t < T && (grad_memory || !scores_given); ++t) {
                const float *restrict w = weights + (b * T + t) * S;
                const float *restrict gc = grad_context + (b * T + t) * H;
                float *restrict gs = grad_scores + (b * T + t) * S;
                float weighted = 0.f;
                for (int64_t s = 0; s < S; ++s) {
                    if (!scores_given) gs[s] = 0.f;
                    if (!mask[b * S + s]) continue;
                    const float ws = w[s];
                    if (grad_memory) {
                        float *restrict gm = grad_memory + (b * S + s) * H;
#pragma omp simd
                        for (int64_t h = 0; h < H; ++h) gm[h] += ws * gc[h];
                    }
                    if (scores_given) continue;
                    const float *restrict ms = memory + (b * S + s) * H;
                    float gw = grad_weights ? grad_weights[(b * T + t) * S + s] : 0.f;
#pragma omp simd reduction(+ : gw)
                    for (int64_t h = 0; h < H; ++h) gw += gc[h] * ms[h];
                    gs[s] = gw;
                    weighted += ws * gw;
                }
                if (!scores_given)
                    for (int64_t s = 0; s < S; ++s) gs[s] = w[s] * (gs[s] - weighted);
            }
            /* the scores, backwards */
            if (!grad_q && !grad_k && !gv) continue;
            for (int64_t s = 0; s < S; ++s) {
                if (!mask[b * S + s]) continue;
                const float *restrict ks = k + (b * S + s) * A;
                float *restrict gk = grad_k ? grad_k + (b * S + s) * A : NULL;
                for (int64_t t = 0; t < T; ++t) {
                    const float g = grad_scores[(b * T + t) * S + s];
                    if (g == 0.f) continue;
                    const float *restrict qt = q + (b * T + t) * A;
                    float *restrict gq = grad_q ? grad_q + (b * T + t) * A : NULL;
                    if (gq && gk && gv) {
#pragma omp simd
                        for (int64_t a = 0; a < A; ++a) {
                            const float y = tanh_rational(qt[a] + ks[a]);
                            const float d = g * v[a] * (1.f - y * y);
                            gv[a] += g * y;
                            gq[a] += d;
                            gk[a] += d;
                        }
                    } else if (gq && !gk && !gv) {  /* a training step: the query's gradient only */
#pragma omp simd
                        for (int64_t a = 0; a < A; ++a) {
                            const float y = tanh_rational(qt[a] + ks[a]);
                            gq[a] += g * v[a] * (1.f - y * y);
                        }
                    } else if (!gq && gk && gv) {  /* after training's last step: the keys' and v's */
#pragma omp simd
                        for (int64_t a = 0; a < A; ++a) {
                            const float y = tanh_rational(qt[a] + ks[a]);
                            gv[a] += g * y;
                            gk[a] += g * v[a] * (1.f - y * y);
                        }
                    } else {
                        for (int64_t a = 0; a < A; ++a) {
                            const float y = tanh_rational(qt[a] + ks[a]);
                            const float d = g * v[a] * (1.f - y * y);
                            if (gv) gv[a] += g * y;
                            if (gq) gq[a] += d;
                            if (gk) gk[a] += d;
                        }
                    }
                }
            }
        }
    }
}
