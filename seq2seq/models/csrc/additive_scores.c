/* The additive attention's scores, forward and backward, one pass each over [B, T, S, A] (see
 * seq2seq/models/additive_kernel.py, which compiles this file on first use and calls it through ctypes).
 *
 *   score[b, t, s] = sum_a v[a] tanh(q[b, t, a] + k[b, s, a])
 *
 * ATen computes this as a [B, T, S, A] sum, a tanh and a product with v, and its gradient in as many
 * passes again, saving the tanh for the backward pass. Here each element is formed, used and dropped in
 * registers, the backward pass recomputes the tanh, and masked (padding) positions are skipped. Each call
 * handles the sentences b0 <= b < b1. All tensors are contiguous float32.
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
                             int64_t b0, int64_t b1, int64_t T, int64_t S, int64_t A) {
    for (int64_t b = b0; b < b1; ++b) {
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
 * grad_v += sum_{b, t, s} g y (added to: callers give each thread its own). */
void additive_scores_backward(const float *restrict q, const float *restrict k, const float *restrict v,
                              const uint8_t *restrict mask, const float *restrict g,
                              float *restrict grad_q, float *restrict grad_k, float *restrict grad_v,
                              int64_t b0, int64_t b1, int64_t T, int64_t S, int64_t A) {
    memset(grad_q + b0 * T * A, 0, (size_t)((b1 - b0) * T * A) * sizeof(float));
    for (int64_t b = b0; b < b1; ++b) {
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
                    grad_v[a] += gs * y;
                    gq[a] += d;
                    gk[a] += d;
                }
            }
        }
    }
}
