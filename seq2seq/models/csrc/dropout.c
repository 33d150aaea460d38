/* Dropout on float32 CPU tensors, one pass each way (see seq2seq/models/dropout.py, which compiles this file on
 * first use and calls it through ctypes).
 *
 * Element i is kept where its 16-bit draw, the top half of a hash of (i, seed), is at least `dropped`
 * (probability (65536 - dropped) / 65536), and then scaled by `scale`. The draw depends on nothing but i and
 * the seed, so the backward pass makes the same mask again from the seed instead of keeping it, and the
 * result does not depend on how many threads ran it. The hash is Chris Wellons's "lowbias32" applied twice,
 * once with each half of the 64-bit seed: 32-bit multiplies and shifts, vectorised 16 lanes wide on AVX-512.
 */
#include <stdint.h>

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* out[i] = x[i] * scale where element i is kept, else 0, for 0 <= i < n (out may be x). */
void dropout_apply(const float *x, float *out, uint64_t seed, int64_t n, int64_t dropped, float scale,
                   int64_t threads) {
    const uint32_t low = (uint32_t)seed, high = (uint32_t)(seed >> 32);
    const uint32_t threshold = (uint32_t)dropped;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t draw = lowbias32(lowbias32((uint32_t)i ^ low) ^ high ^ (uint32_t)(i >> 32)) >> 16;
        out[i] = draw >= threshold ? x[i] * scale : 0.f;
    }
}
