/* Beam search's candidate selection on float32 CPU tensors (see seq2seq/search_kernel.py, which compiles this file
 * on first use and calls it through ctypes).
 *
 * For each sentence: its W best extensions (beam score + token log-probability) over its K beams and V tokens,
 * best first, ties in (beam, token) order: the result of search._top_candidates_thresholded, bit for bit (the
 * totals are the same one float addition), and where that does not apply (fewer than W blocks with a finite
 * maximum) the same ranking over every finite extension. Each beam's row is read in blocks of BLOCK tokens: one vectorised
 * maximum per block, and only the blocks whose maximum reaches the sentence's W-th best block are searched.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64
#define PART 16 /* a searched block is read in parts of this many tokens */

/* Insert (total, beam, token) into the sorted list of n (< w, or == w and dropping the last) entries, after every
 * entry that is at least as good. */
static inline int64_t insert(float *best, int64_t *beams, int64_t *tokens, int64_t n, int64_t w, float total,
                             int64_t beam, int64_t token) {
    int64_t i = n < w ? n : w - 1;
    while (i > 0 && best[i - 1] < total) {
        best[i] = best[i - 1];
        beams[i] = beams[i - 1];
        tokens[i] = tokens[i - 1];
        --i;
    }
    best[i] = total;
    beams[i] = beam;
    tokens[i] = token;
    return n < w ? n + 1 : w;
}

/* The maximum of x[0 .. min(n, BLOCK)): a full block's loop has a constant trip count, so that it compiles to a few
 * vector maxima. */
static inline float block_max(const float *x, int64_t n) {
    float top = -INFINITY;
    if (n >= BLOCK) {
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < BLOCK; ++t)
            top = x[t] > top ? x[t] : top;
    } else {
        for (int64_t t = 0; t < n; ++t)
            top = x[t] > top ? x[t] : top;
    }
    return top;
}

/* The maximum of x[0 .. PART). */
static inline float part_max(const float *x) {
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < PART; ++t)
        top = x[t] > top ? x[t] : top;
    return top;
}

/* log_probs [b * k, v], scores [b, k] -> out_scores [b, w], out_beams [b, w] (0 <= beam < k), out_tokens [b, w].
 * Returns how many sentences have fewer than w extensions with a finite total (their rows are then incomplete:
 * the caller takes its exact path), or -1 where a thread's buffer could not be allocated. */
int64_t beam_candidates(const float *log_probs, const float *scores, float *out_scores, int64_t *out_beams,
                        int64_t *out_tokens, int64_t b, int64_t k, int64_t v, int64_t w, int64_t threads) {
    const int64_t blocks = (v + BLOCK - 1) / BLOCK;
    int64_t short_rows = 0, failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : short_rows, failed)
    {
        /* per sentence: each beam's block maxima plus its score [k * blocks], and the w best of them [w] */
        float *block_totals = malloc((size_t)(k * blocks + w) * sizeof(float));
        float *top_blocks = block_totals + k * blocks;
        failed += block_totals == NULL;
#pragma omp for schedule(static)
        for (int64_t sentence = 0; sentence < b; ++sentence) {
            if (block_totals == NULL)
                continue;
            float *best = out_scores + sentence * w;
            int64_t *beams = out_beams + sentence * w, *tokens = out_tokens + sentence * w;
            /* the threshold: the w-th best block total, which at least w extensions reach, and so does each of
             * the w best (fl(s + x) <= fl(s + max)): only blocks that reach it are searched */
            int64_t found = 0;
            for (int64_t beam = 0; beam < k; ++beam) {
                const float score = scores[sentence * k + beam];
                const float *row = log_probs + (sentence * k + beam) * v;
                for (int64_t block = 0; block < blocks; ++block) {
                    const float top = block_max(row + block * BLOCK, v - block * BLOCK);
                    const float total = score > -INFINITY ? score + top : -INFINITY; /* dead beams: -inf */
                    block_totals[beam * blocks + block] = total;
                    if (total > -INFINITY && (found < w || total > top_blocks[w - 1])) {
                        int64_t i = found < w ? found++ : w - 1;
                        for (; i > 0 && top_blocks[i - 1] < total; --i)
                            top_blocks[i] = top_blocks[i - 1];
                        top_blocks[i] = total;
                    }
                }
            }
            /* fewer than w blocks with a finite maximum (e.g. at the first step, one live beam and a sentence's own
             * shortlist): every finite block is searched */
            const float threshold = found < w ? -INFINITY : top_blocks[w - 1];
            int64_t n = 0;
            for (int64_t beam = 0; beam < k; ++beam) {
                const float score = scores[sentence * k + beam];
                const float *row = log_probs + (sentence * k + beam) * v;
                for (int64_t block = 0; block < blocks; ++block) {
                    const float block_total = block_totals[beam * blocks + block];
                    if (!(block_total >= threshold && block_total > -INFINITY))
                        continue;
                    const int64_t end = (block + 1) * BLOCK < v ? (block + 1) * BLOCK : v;
                    for (int64_t start = block * BLOCK; start < end; start += PART) { /* parts below the threshold: skipped */
                        if (end - start >= PART && !(score + part_max(row + start) >= threshold))
                            continue;
                        for (int64_t t = start; t < start + PART && t < end; ++t) {
                            const float total = score + row[t];
                            if (total >= threshold && total > -INFINITY && (n < w || total > best[w - 1]))
                                n = insert(best, beams, tokens, n, w, total, beam, t);
                        }
                    }
                }
            }
            short_rows += n < w; /* fewer than w extensions with a finite total */
        }
        free(block_totals);
    }
    return failed ? -1 : short_rows;
}
