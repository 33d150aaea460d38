/* The additive attention's scores, forward and backward, one pass each over [B, T, S, A] (see
 * seq2seq/models/additive_kernel.py, which compiles this file on first use and calls it through ctypes).
 *
 *   score[b, t, s] = sum_a v[a] tanh(q[b, t, a] + k[b, s, a])
 *
 * ATen computes this as a [B, T, S, A] sum, a tanh and a product with v, and its gradient in as many
 * passes again, saving the tanh for the backward pass. Here each element is formed, used and dropped in
 * registers, the backward pass recomputes the tanh, and masked (padding) positions are skipped. The
 * sentences are shared out over ``threads`` OpenMP threads (built with -fopenmp, the process's one OpenMP
 * runtime, torch's; otherwise the pragmas are ignored and one thread runs it all): sentence b's results
 * are computed by one thread, the same whatever the thread count. All tensors are contiguous float32.
 */
#include <stdint.h>
#include <string.h>

/* tanh as a rational function of degree 13 / 6 on [-7.9053, 7.9053] (clamped outside, where tanh(x) is
   within float rounding of +-1): the form Eigen uses for float, a few ulp from tanhf. Written without
   branches so that the compiler vectorises the loops that call it. */
static inline float tanh_rational(float x) {
    const float limit = 7.90531110763549805f;
    x = x < limit ? x : limit;
    x = x > -limit ? x : -limit;
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}

/* q [B, T, A], k [B, S, A], v [A], mask [B, S] (1 = real) -> scores [B, T, S]; 0 at masked positions. */
void additive_scores_forward(const float *restrict q, const float *restrict k, const float *restrict v,
                             const uint8_t *restrict mask, float *restrict scores,
                             int64_t B, int64_t T, int64_t S, int64_t A, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const float *restrict qt = q + (b * T + t) * A;
            float *restrict out = scores + (b * T + t) * S;
            for (int64_t s = 0; s < S; ++s) {
                float score = 0.f;
                if (mask[b * S + s]) {
                    const float *restrict ks = k + (b * S + s) * A;
#pragma omp simd reduction(+ : score)
                    for (int64_t a = 0; a < A; ++a) score += v[a] * tanh_rational(qt[a] + ks[a]);
                }
                out[s] = score;
            }
        }
    }
}

/* Given g = dL/dscores [B, T, S] (0 at masked positions), with y = tanh(q + k) and
 * d = g v (1 - y^2): grad_q[b, t] = sum_s d, grad_k[b, s] = sum_t d (both written, not added to), and
 * v's gradient sum_{b, t, s} g y in parts: grad_v_parts[p] (written) sums the sentences
 * p * SENTENCES_PER_PART <= b < (p + 1) * SENTENCES_PER_PART, so that the caller's sum of the parts does
 * not depend on how many threads ran them. */
#define SENTENCES_PER_PART 8
void additive_scores_backward(const float *restrict q, const float *restrict k, const float *restrict v,
                              const uint8_t *restrict mask, const float *restrict g,
                              float *restrict grad_q, float *restrict grad_k, float *restrict grad_v_parts,
                              int64_t B, int64_t T, int64_t S, int64_t A, int64_t threads) {
    const int64_t parts = (B + SENTENCES_PER_PART - 1) / SENTENCES_PER_PART;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t part = 0; part < parts; ++part) {
        float *restrict gv = grad_v_parts + part * A;
        memset(gv, 0, (size_t)A * sizeof(float));
        const int64_t b_end = (part + 1) * SENTENCES_PER_PART < B ? (part + 1) * SENTENCES_PER_PART : B;
        for (int64_t b = part * SENTENCES_PER_PART; b < b_end; ++b) {
            memset(grad_q + b * T * A, 0, (size_t)(T * A) * sizeof(float));
            for (int64_t s = 0; s < S; ++s) {
                float *restrict gk = grad_k + (b * S + s) * A;
                memset(gk, 0, (size_t)A * sizeof(float));
                if (!mask[b * S + s]) continue;
                const float *restrict ks = k + (b * S + s) * A;
                for (int64_t t = 0; t < T; ++t) {
                    const float gs = g[(b * T + t) * S + s];
                    if (gs == 0.f) continue;
                    const float *restrict qt = q + (b * T + t) * A;
                    float *restrict gq = grad_q + (b * T + t) * A;
#pragma omp simd
                    for (int64_t a = 0; a < A; ++a) {
                        const float y = tanh_rational(qt[a] + ks[a]);
                        const float d = gs * v[a] * (1.f - y * y);
                        gv[a] += gs * y;
                        gq[a] += d;
                        gk[a] += d;
                    }
                }
            }
        }
    }
}
