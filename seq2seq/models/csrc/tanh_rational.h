/* tanh for float kernels (included by additive_attention.c and gru_cell.c; seq2seq/models/clib.py rebuilds a
 * library when this file changes). */
#ifndef SEQ2SEQ_TANH_RATIONAL_H
#define SEQ2SEQ_TANH_RATIONAL_H

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

#endif
