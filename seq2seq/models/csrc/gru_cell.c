/* The GRU cell's elementwise half, forward and backward (see seq2seq/models/gru_kernel.py, which compiles this
 * file on first use and calls it through ctypes). With the input's and the state's products given, as
 * torch.nn.GRU defines them (gates [r, z, n] in that order, the state's product with its bias):
 *
 *   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r gh_n),  h' = n + z (h - n)
 *
 * ATen runs this as a dozen elementwise operations forward and two dozen backward, each a pass over memory
 * and a dispatch (~580 us per step at 160 sentences x 256 here, against the step's matrix products). Here it
 * is one pass each way. Rows are shared out over ``threads`` OpenMP threads (built with -fopenmp: the process's
 * one OpenMP runtime, torch's); every element's result is computed alone, so results do not depend on the
 * thread count. All arrays are float32 and contiguous, except that gi's rows are gi_stride floats apart (a time
 * step of a [B, T, 3H] tensor): gi, gh [B, 3H], h, h_new [B, H], saved [B, 4H] (r, z, n, gh_n: what the backward
 * pass needs).
 */
#include <stddef.h>
#include <stdint.h>

#include "tanh_rational.h"

/* sigmoid(x) = (1 + tanh(x / 2)) / 2 */
static inline float sigmoid_rational(float x) { return 0.5f + 0.5f * tanh_rational(0.5f * x); }

void gru_cell_forward(const float *restrict gi, int64_t gi_stride, const float *restrict gh, const float *restrict h,
                      float *restrict h_new, float *restrict saved, int64_t B, int64_t H, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        const float *restrict gib = gi + b * gi_stride, *restrict ghb = gh + b * 3 * H, *restrict hb = h + b * H;
        float *restrict out = h_new + b * H, *restrict s = saved + b * 4 * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            const float r = sigmoid_rational(gib[j] + ghb[j]);
            const float z = sigmoid_rational(gib[H + j] + ghb[H + j]);
            const float hn = ghb[2 * H + j];
            const float n = tanh_rational(gib[2 * H + j] + r * hn);
            out[j] = n + z * (hb[j] - n);
            s[j] = r;
            s[H + j] = z;
            s[2 * H + j] = n;
            s[3 * H + j] = hn;
        }
    }
}

/* grad_h_new [B, H] -> grad_gi, grad_gh [B, 3H] and grad_h [B, H] (written, not added to). grad_h_new's rows are
 * grad_stride floats apart, and carry [B, H] (contiguous; NULL: none) is added to it: the gradient a state gets
 * from the next step, where a whole sequence's backward pass runs here (``gru_kernel.gru_recurrence``). grad_gi's
 * rows are grad_gi_stride floats apart (a time step of a [B, T, 3H] tensor). */
void gru_cell_backward(const float *restrict grad_h_new, int64_t grad_stride, const float *restrict carry,
                       const float *restrict h, const float *restrict saved, float *restrict grad_gi,
                       int64_t grad_gi_stride, float *restrict grad_gh, float *restrict grad_h, int64_t B,
                       int64_t H, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        const float *restrict go = grad_h_new + b * grad_stride, *restrict hb = h + b * H;
        const float *restrict s = saved + b * 4 * H, *restrict cb = carry ? carry + b * H : NULL;
        float *restrict gib = grad_gi + b * grad_gi_stride, *restrict ghb = grad_gh + b * 3 * H;
        float *restrict dh = grad_h + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
            const float g = cb ? go[j] + cb[j] : go[j];
            const float r = s[j], z = s[H + j], n = s[2 * H + j], hn = s[3 * H + j];
            const float d_n = g * (1.f - z) * (1.f - n * n);  /* through tanh: the gradient of n's argument */
            const float d_r = d_n * hn * r * (1.f - r);
            const float d_z = g * (hb[j] - n) * z * (1.f - z);
            gib[j] = ghb[j] = d_r;
            gib[H + j] = ghb[H + j] = d_z;
            gib[2 * H + j] = d_n;
            ghb[2 * H + j] = d_n * r;
            dh[j] = g * z;
        }
    }
}
