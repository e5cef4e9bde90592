/* Fused CPU kernels for group-wise quantized experts (quant/cpu_kernels.py builds and loads this file).
 *
 * A weight W [N, K] is stored as quant/quantize.py and quant/pack.py lay it out: per row, K codes of
 * `bits` bits (code i at bits [i*bits, (i+1)*bits) of the row's bytes, little-endian), and per group of G
 * columns an fp16 scale s and zero z:  W[n, k] = (code - z) * s.  The kernels compute y = x @ W.T for
 * T tokens reading each packed byte once and never writing a dequantized matrix:
 *
 *     y[t, n] = sum_g s[n, g] * sum_{k in g} code[n, k] * x[t, k]  -  sum_g z[n, g] * s[n, g] * xsum[t, g]
 *
 * where xsum[t, g] is the sum of x[t] over group g (computed once per call). Codes become floats in
 * registers; the sums are float32 (the result equals dequantize-then-matmul up to float rounding).
 *
 * With AVX-512 (F, BW) and F16C the inner loops are written with intrinsics, two rows and up to four
 * tokens at a time; elsewhere a portable loop computes the same sums (slower, same results up to rounding).
 * Threads: OpenMP over blocks of rows, `nthreads` per call, handed out "guided" (large chunks first, then
 * smaller ones) so that a thread slowed by other work on its core does not hold the call up. Each row is
 * summed by one thread in a fixed order, so results do not depend on the thread count or the schedule.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define MOE_AVX512 1
#include <immintrin.h>
#else
#define MOE_AVX512 0
#endif

#define ROW_BLOCK 16  /* rows per OpenMP work item */
#define TOKEN_TILE 4  /* tokens that share one decode of a row's codes */
/* How far ahead of the codes being read to ask for cache lines: the hardware prefetcher alone left a
 * thread waiting on RAM (a 4-bit Mixtral matrix took 1.5x as long on one thread without it). A few rows
 * ahead, in the rows this thread goes on to read. */
#define PREFETCH_BYTES 8192

int moe_isa(void) { return MOE_AVX512 ? 512 : 0; }

typedef struct {
    int bits, G, N, K;
    const uint8_t *q;
    int64_t qrow; /* bytes per row of codes */
    const uint16_t *scale, *zero;
    const uint8_t *mx_scale; /* MXFP4 (bits 4, G 32, no zero point): E8M0 scales [N, K / 32]; else NULL */
} Mat;

/* MXFP4's values: E2M1 codes (sign, 2 exponent bits, 1 mantissa bit), as quant/mxfp4.py's FP4_VALUES. */
static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Whether the 4-bit kernel reads x in "split" order: within every 32 columns, the 16 even columns, then
 * the 16 odd ones (the low and high nibbles of 16 bytes). */
static int split4(const Mat *m) { return MOE_AVX512 && m->bits == 4 && m->G % 32 == 0; }

/* float16 bits -> float, without F16C (the portable build; AVX-512 builds use _cvtsh_ss / vcvtph2ps). */
static inline float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023, bits;
    if (e == 0) {
        float v = ldexpf((float)mant, -24);
        return sign ? -v : v;
    }
    bits = e == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((e + 112) << 23) | (mant << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* h = silu(gate) * up over n values; an `omp for` shared by the threads of the caller's parallel region. */
static void swiglu(const float *gate, const float *up, float *h, int64_t n)
{
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) h[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static int ngroups_padded(const Mat *m) { return (m->K / m->G + 15) / 16 * 16; }

/* x [T, K] -> xp [T, K] in the order the kernel reads, and xsum [T, NGpad] (zero past the last group). */
static void prepare_input(const Mat *m, int T, const float *x, float *xp, float *xsum)
{
    int NG = m->K / m->G, NGp = ngroups_padded(m);
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * m->K;
        float *pt = xp + (int64_t)t * m->K;
        if (split4(m)) {
            for (int b = 0; b < m->K; b += 32)
                for (int j = 0; j < 16; j++) { pt[b + j] = xt[b + 2 * j]; pt[b + 16 + j] = xt[b + 2 * j + 1]; }
        } else {
            memcpy(pt, xt, sizeof(float) * m->K);
        }
        float *st = xsum + (int64_t)t * NGp;
        for (int g = 0; g < NGp; g++) {
            float s = 0.0f;
            if (g < NG)
                for (int k = 0; k < m->G; k++) s += xt[g * m->G + k];
            st[g] = s;
        }
    }
}

#if MOE_AVX512

/* Codes become floats by a table lookup: vpermps takes the low 4 bits of each lane as the index, so a
 * lane holding a code in its low bits (and anything above them) maps to the code's value without a mask
 * or an int -> float conversion (table[i] = i & (2^bits - 1)). */

/* 16 codes starting at byte p, in natural order, as floats (3-bit: 6 bytes; the generic byte shuffle). */
static inline __m512 codes3(const uint8_t *p, __m512i ctl, __m512i shift, __m512 table)
{
    int lo;
    uint16_t hi;
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 2);
    __m128i raw = _mm_insert_epi16(_mm_cvtsi32_si128(lo), hi, 2);
    __m512i pairs = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), ctl);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(pairs, shift), table);
}

static inline __m512 codes2(const uint8_t *p, __m512i shift, __m512 table)
{
    int v;
    memcpy(&v, p, 4);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(v), shift), table);
}

static inline __m512 codes4_generic(const uint8_t *p, __m512i ctl, __m512i shift, __m512 table)
{
    __m512i pairs = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadl_epi64((const __m128i *)p)), ctl);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(pairs, shift), table);
}

static inline __m512 mx_scales(__m128i e)
{
    const __m512i s = _mm512_cvtepu8_epi32(e);
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(s, 23), _mm512_cmpeq_epi32_mask(s, _mm512_setzero_si512()),
                                               _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(bits);
}

/* Rows [n0, n1) for TT tokens (a constant after inlining). acc: one vector per (row of the pair, token),
 * summed across lanes at the end; a group's partial sums (gacc) are scaled once per group. */
static inline __attribute__((always_inline)) void
rows_avx512(const Mat *m, int BITS, int SPLIT, int MX, int TT, int n0, int n1, const float *xp, const float *xsum,
            int T, float *y)
{
    const int K = m->K, G = m->G, N = m->N, NG = K / G, NGp = ngroups_padded(m), NA = TT <= 2 ? 2 : 1;
    int8_t ctl_b[64];
    int32_t sh[16], sh2[16];
    for (int i = 0; i < 16; i++) {
        int bit = i * BITS, byte = bit / 8;
        ctl_b[4 * i] = (int8_t)byte;
        ctl_b[4 * i + 1] = (int8_t)(byte + 1);
        ctl_b[4 * i + 2] = ctl_b[4 * i + 3] = (int8_t)0x80;
        sh[i] = bit % 8;
        sh2[i] = 2 * i;
    }
    const __m512i ctl = _mm512_loadu_si512(ctl_b), shift = _mm512_loadu_si512(sh), shift2 = _mm512_loadu_si512(sh2);
    float tab[16];
    for (int i = 0; i < 16; i++) tab[i] = MX ? FP4[i] : (float)(i & ((1 << BITS) - 1));
    const __m512 table = _mm512_loadu_ps(tab);
    const int64_t group_bytes = (int64_t)G * BITS / 8;
    (void)T;

    for (int n = n0; n < n1; n += 2) {
        const int two = n + 1 < n1;
        const uint8_t *q0 = m->q + (int64_t)n * m->qrow, *q1 = two ? q0 + m->qrow : q0;
        const uint16_t *s0 = m->scale + (int64_t)n * NG, *z0 = m->zero + (int64_t)n * NG;
        const uint16_t *s1 = two ? s0 + NG : s0, *z1 = two ? z0 + NG : z0;
        __m512 a0[TOKEN_TILE], a1[TOKEN_TILE];
        for (int t = 0; t < TT; t++) a0[t] = a1[t] = _mm512_setzero_ps();

        for (int gb = 0; gb < NG; gb += 16) {
            const int ng = NG - gb < 16 ? NG - gb : 16;
            const __mmask16 mk = (__mmask16)((1u << ng) - 1);
            __m512 vs0, vs1;
            if (MX) {  /* E8M0: 2^(s - 127), the float whose exponent field is s (s = 0: 2^-127, a subnormal) */
                const uint8_t *m0 = m->mx_scale + (int64_t)n * NG + gb, *m1 = two ? m0 + NG : m0;
                vs0 = mx_scales(_mm_maskz_loadu_epi8(mk, m0));
                vs1 = mx_scales(_mm_maskz_loadu_epi8(mk, m1));
            } else {
                vs0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s0 + gb));
                vs1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s1 + gb));
                const __m512 zs0 = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, z0 + gb)), vs0);
                const __m512 zs1 = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, z1 + gb)), vs1);
                for (int t = 0; t < TT; t++) {  /* the zero points' share: - sum_g z s xsum, lane by lane */
                    const __m512 xs = _mm512_loadu_ps(xsum + (int64_t)t * NGp + gb);
                    a0[t] = _mm512_fnmadd_ps(zs0, xs, a0[t]);
                    a1[t] = _mm512_fnmadd_ps(zs1, xs, a1[t]);
                }
            }
            for (int gi = 0; gi < ng; gi++) {
                const int g = gb + gi;
                const uint8_t *p0 = q0 + g * group_bytes, *p1 = q1 + g * group_bytes;
                const float *xg = xp + (int64_t)g * G;
                if (((g * group_bytes) & 63) < group_bytes) {  /* once per cache line of codes */
                    _mm_prefetch((const char *)(p0 + PREFETCH_BYTES), _MM_HINT_T0);
                    _mm_prefetch((const char *)(p1 + PREFETCH_BYTES), _MM_HINT_T0);
                }
                /* A group's partial sums, in NA independent sets (two for one or two tokens, so that
                 * consecutive FMAs do not wait on each other's latency; one when more tokens already give
                 * independent chains), added together when the group is done. */
                __m512 g0[2][TOKEN_TILE], g1[2][TOKEN_TILE];
                for (int a = 0; a < NA; a++)
                    for (int t = 0; t < TT; t++) g0[a][t] = g1[a][t] = _mm512_setzero_ps();
#define MOE_ACC(C0, C1, OFF, SET)                                                              \
    do {                                                                                       \
        const __m512 c0_ = (C0), c1_ = (C1);                                                   \
        for (int t = 0; t < TT; t++) {                                                         \
            const __m512 xv_ = _mm512_loadu_ps(xg + (int64_t)t * K + (OFF));                    \
            g0[SET][t] = _mm512_fmadd_ps(c0_, xv_, g0[SET][t]);                                \
            g1[SET][t] = _mm512_fmadd_ps(c1_, xv_, g1[SET][t]);                                \
        }                                                                                      \
    } while (0)
#define MOE_CODES8(P, C) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((P) + (C)))))
#define MOE_CHUNKS(DECODE0, DECODE1)                                                           \
    do {                                                                                       \
        int c = 0;                                                                             \
        for (; c + 32 <= G; c += 32) {                                                         \
            MOE_ACC(DECODE0(p0, c), DECODE0(p1, c), c, 0);                                      \
            MOE_ACC(DECODE1(p0, c + 16), DECODE1(p1, c + 16), c + 16, NA - 1);                  \
        }                                                                                      \
        if (c < G) MOE_ACC(DECODE0(p0, c), DECODE0(p1, c), c, 0);                              \
    } while (0)
#define MOE_CODES4(P, C) codes4_generic((P) + (C) / 2, ctl, shift, table)
#define MOE_CODES2(P, C) codes2((P) + (C) / 4, shift2, table)
#define MOE_CODES3(P, C) codes3((P) + (C) / 16 * 6, ctl, shift, table)
                if (BITS == 8) {
                    MOE_CHUNKS(MOE_CODES8, MOE_CODES8);
                } else if (BITS == 4 && SPLIT) {
                    for (int c = 0; c < G; c += 32) {
                        /* 16 bytes = 32 codes per row: the low nibbles by table, the high ones by a shift */
                        const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p0 + c / 2)));
                        const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p1 + c / 2)));
                        MOE_ACC(_mm512_permutexvar_ps(b0, table), _mm512_permutexvar_ps(b1, table), c, 0);
                        MOE_ACC(MX ? _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table)
                                   : _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)),
                                MX ? _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table)
                                   : _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)),
                                c + 16, NA - 1);
                    }
                } else if (BITS == 4) {
                    MOE_CHUNKS(MOE_CODES4, MOE_CODES4);
                } else if (BITS == 2) {
                    MOE_CHUNKS(MOE_CODES2, MOE_CODES2);
                } else {
                    MOE_CHUNKS(MOE_CODES3, MOE_CODES3);
                }
#undef MOE_ACC
#undef MOE_CODES8
#undef MOE_CHUNKS
#undef MOE_CODES4
#undef MOE_CODES2
#undef MOE_CODES3
                const __m512i lane = _mm512_set1_epi32(gi);
                const __m512 sg0 = _mm512_permutexvar_ps(lane, vs0), sg1 = _mm512_permutexvar_ps(lane, vs1);
                for (int t = 0; t < TT; t++) {
                    if (NA == 2) {
                        g0[0][t] = _mm512_add_ps(g0[0][t], g0[1][t]);
                        g1[0][t] = _mm512_add_ps(g1[0][t], g1[1][t]);
                    }
                    a0[t] = _mm512_fmadd_ps(g0[0][t], sg0, a0[t]);
                    a1[t] = _mm512_fmadd_ps(g1[0][t], sg1, a1[t]);
                }
            }
        }
        for (int t = 0; t < TT; t++) {
            y[(int64_t)t * N + n] = _mm512_reduce_add_ps(a0[t]);
            if (two) y[(int64_t)t * N + n + 1] = _mm512_reduce_add_ps(a1[t]);
        }
    }
}

#define MOE_ROWS(BITS, SPLIT, TT)                                                                  \
    static void rows_##BITS##_##SPLIT##_##TT(const Mat *m, int n0, int n1, const float *xp,         \
                                             const float *xsum, int T, float *y)                   \
    {                                                                                              \
        rows_avx512(m, BITS == 5 ? 4 : BITS, SPLIT, BITS == 5, TT, n0, n1, xp, xsum, T, y);          \
    }
#define MOE_ROWS_T(BITS, SPLIT) MOE_ROWS(BITS, SPLIT, 1) MOE_ROWS(BITS, SPLIT, 2) MOE_ROWS(BITS, SPLIT, 3) MOE_ROWS(BITS, SPLIT, 4)
MOE_ROWS_T(8, 0)
MOE_ROWS_T(4, 1)
MOE_ROWS_T(4, 0)
MOE_ROWS_T(3, 0)
MOE_ROWS_T(2, 0)
MOE_ROWS_T(5, 1) /* MXFP4 */

typedef void (*rows_fn)(const Mat *, int, int, const float *, const float *, int, float *);

static rows_fn pick(const Mat *m, int tt)
{
#define MOE_PICK(BITS, SPLIT)                                                                              \
    {                                                                                                      \
        static const rows_fn f[4] = {rows_##BITS##_##SPLIT##_1, rows_##BITS##_##SPLIT##_2,                 \
                                     rows_##BITS##_##SPLIT##_3, rows_##BITS##_##SPLIT##_4};                \
        return f[tt - 1];                                                                                  \
    }
    if (m->mx_scale) MOE_PICK(5, 1)
    switch (m->bits) {
    case 8: MOE_PICK(8, 0)
    case 4: if (split4(m)) MOE_PICK(4, 1) else MOE_PICK(4, 0)
    case 3: MOE_PICK(3, 0)
    default: MOE_PICK(2, 0)
    }
#undef MOE_PICK
}

/* Rows [n0, n1) of y for all T tokens, in token tiles. */
static void rows(const Mat *m, int n0, int n1, const float *xp, const float *xsum, int T, float *y)
{
    const int NGp = ngroups_padded(m);
    for (int t0 = 0; t0 < T; t0 += TOKEN_TILE) {
        const int tt = T - t0 < TOKEN_TILE ? T - t0 : TOKEN_TILE;
        pick(m, tt)(m, n0, n1, xp + (int64_t)t0 * m->K, xsum + (int64_t)t0 * NGp, tt, y + (int64_t)t0 * m->N);
    }
}

#else /* portable */

static void rows(const Mat *m, int n0, int n1, const float *xp, const float *xsum, int T, float *y)
{
    const int K = m->K, G = m->G, NG = K / G, NGp = ngroups_padded(m), mask = (1 << m->bits) - 1;
    float codes[256];
    for (int n = n0; n < n1; n++) {
        const uint8_t *qr = m->q + (int64_t)n * m->qrow;
        for (int t = 0; t < T; t++) y[(int64_t)t * m->N + n] = 0.0f;
        for (int g = 0; g < NG; g++) {
            float s, z;
            if (m->mx_scale) {
                s = ldexpf(1.0f, (int)m->mx_scale[(int64_t)n * NG + g] - 127);
                z = 0.0f;
            } else {
                s = half_to_float(m->scale[(int64_t)n * NG + g]);
                z = half_to_float(m->zero[(int64_t)n * NG + g]);
            }
            for (int j = 0; j < G; j++) {
                int64_t bit = (int64_t)(g * G + j) * m->bits;
                unsigned v = qr[bit / 8] | (bit / 8 + 1 < m->qrow ? (unsigned)qr[bit / 8 + 1] << 8 : 0u);
                unsigned c = (v >> (bit % 8)) & mask;
                codes[j] = m->mx_scale ? FP4[c] : (float)c;
            }
            for (int t = 0; t < T; t++) {
                const float *xt = xp + (int64_t)t * K + g * G;
                float acc = 0.0f;
                for (int j = 0; j < G; j++) acc += codes[j] * xt[j];
                y[(int64_t)t * m->N + n] += s * acc - z * s * xsum[(int64_t)t * NGp + g];
            }
        }
    }
}

#endif

static int check(const Mat *m, int T)
{
    if (T < 1 || m->G < 16 || m->G > 256 || m->G % 16 || m->K % m->G || m->N < 1) return 1;
    if (m->bits != 8 && m->bits != 4 && m->bits != 3 && m->bits != 2) return 1;
    if (m->qrow * 8 < (int64_t)m->K * m->bits) return 1;
    return 0;
}

/* Floats of workspace `moe_qmatmul` needs for T tokens. */
int64_t moe_qmatmul_work(int bits, int G, int N, int K, int T)
{
    (void)bits; (void)N;
    return (int64_t)T * K + (int64_t)T * ((K / G + 15) / 16 * 16);
}

static void matmul(const Mat *m, int T, const float *x, float *y, float *work, int nthreads)
{
    float *xp = work, *xsum = work + (int64_t)T * m->K;
    prepare_input(m, T, x, xp, xsum);
    const int N = m->N, blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(guided)
    for (int b = 0; b < blocks; b++) {
        const int n1 = (b + 1) * ROW_BLOCK < N ? (b + 1) * ROW_BLOCK : N;
        rows(m, b * ROW_BLOCK, n1, xp, xsum, T, y);
    }
}

/* y [T, N] = x [T, K] @ W.T. Returns 0, or 1 when the shapes are not supported (the caller falls back). */
int moe_qmatmul(int bits, int G, int N, int K, int T, const uint8_t *q, int64_t qrow, const uint16_t *scale,
                const uint16_t *zero, const float *x, float *y, float *work, int nthreads)
{
    Mat m = {bits, G, N, K, q, qrow, scale, zero, NULL};
    if (check(&m, T)) return 1;
    matmul(&m, T, x, y, work, nthreads);
    return 0;
}

/* y [T, N] = x [T, K] @ W.T for an MXFP4 weight: blocks [N, K / 32, 16] (two E2M1 values a byte, the even
 * column in the low nibble) and E8M0 scales [N, K / 32], as quant/mxfp4.py stores them. Workspace:
 * moe_qmatmul_work(4, 32, N, K, T) floats. */
int moe_mxfp4_matmul(int N, int K, int T, const uint8_t *blocks, const uint8_t *scales, const float *x, float *y,
                     float *work, int nthreads)
{
    /* scale and zero point at the E8M0 bytes too, unread: no pointer of the struct is NULL */
    Mat m = {4, 32, N, K, blocks, K / 2, (const uint16_t *)scales, (const uint16_t *)scales, scales};
    if (check(&m, T)) return 1;
    matmul(&m, T, x, y, work, nthreads);
    return 0;
}

/* Floats of workspace `moe_qexperts` needs for T tokens in all. */
int64_t moe_qexpert_work(int bits, int G, int D, int F, int T)
{
    return moe_qmatmul_work(bits, G, F, D, T) + moe_qmatmul_work(bits, G, D, F, T) + 3 * (int64_t)T * F;
}

#define MAX_GROUP 64 /* experts in one moe_qexperts call */

/* SwiGLU experts y [T, D] = w2 (silu(w1 x) * (w3 x)), w1, w3 [F, D] and w2 [D, F] quantized alike, several of
 * one layer in one OpenMP region (a fine-grained model's token uses 8 small experts a layer, where one region per
 * expert pays its fork and barriers 8 times): the gate and up rows of all of them, then the products, then
 * their down rows. Expert e (all alike: bits, G, D, F) reads tokens [t0, t0 + Ts[e]) of x [sum Ts, D] and
 * writes the same rows of y; its 12 pointer-sized arguments (q, qrow, scale, zero for w1, w2, w3) are
 * p[12e .. 12e + 11]. Each row is summed by one thread in one order, whatever the other experts of the call:
 * an expert's output is the same alone or in a group. Workspace: moe_qexpert_work(bits, G, D, F, sum Ts). */
int moe_qexperts(int n, int bits, int G, int D, int F, const int *Ts, const int64_t *p, const float *x, float *y,
                 float *work, int nthreads)
{
    Mat w1[MAX_GROUP], w2[MAX_GROUP], w3[MAX_GROUP];
    int64_t t0[MAX_GROUP + 1];
    if (n < 1 || n > MAX_GROUP) return 1;
    t0[0] = 0;
    for (int e = 0; e < n; e++) {
        const int64_t *a = p + 12 * e;
        Mat m1 = {bits, G, F, D, (const uint8_t *)a[0], a[1], (const uint16_t *)a[2], (const uint16_t *)a[3], NULL};
        Mat m2 = {bits, G, D, F, (const uint8_t *)a[4], a[5], (const uint16_t *)a[6], (const uint16_t *)a[7], NULL};
        Mat m3 = {bits, G, F, D, (const uint8_t *)a[8], a[9], (const uint16_t *)a[10], (const uint16_t *)a[11], NULL};
        w1[e] = m1, w2[e] = m2, w3[e] = m3;
        if (check(&m1, Ts[e]) || check(&m2, Ts[e]) || check(&m3, Ts[e])) return 1;
        t0[e + 1] = t0[e] + Ts[e];
    }
    const int64_t S = t0[n];
    const int NG1 = ngroups_padded(&w1[0]), NG2 = ngroups_padded(&w2[0]);
    float *xp = work, *xsum = xp + S * D, *hp = xsum + S * NG1, *hsum = hp + S * F;
    float *gate = hsum + S * NG2, *up = gate + S * F, *h = up + S * F;
    const int up_blocks = (F + ROW_BLOCK - 1) / ROW_BLOCK, down_blocks = (D + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int e = 0; e < n; e++) prepare_input(&w1[e], Ts[e], x + t0[e] * D, xp + t0[e] * D, xsum + t0[e] * NG1);
#pragma omp for schedule(guided)
        for (int b = 0; b < 2 * up_blocks * n; b++) {
            const int e = b / (2 * up_blocks), i = b % (2 * up_blocks), r = i % up_blocks;
            const int n0 = r * ROW_BLOCK, n1 = n0 + ROW_BLOCK < F ? n0 + ROW_BLOCK : F;
            rows(i < up_blocks ? &w1[e] : &w3[e], n0, n1, xp + t0[e] * D, xsum + t0[e] * NG1, Ts[e],
                 (i < up_blocks ? gate : up) + t0[e] * F);
        }
        swiglu(gate, up, h, S * F);
#pragma omp for schedule(static)
        for (int e = 0; e < n; e++) prepare_input(&w2[e], Ts[e], h + t0[e] * F, hp + t0[e] * F, hsum + t0[e] * NG2);
#pragma omp for schedule(guided)
        for (int b = 0; b < down_blocks * n; b++) {
            const int e = b / down_blocks, r = b % down_blocks;
            const int n1 = (r + 1) * ROW_BLOCK < D ? (r + 1) * ROW_BLOCK : D;
            rows(&w2[e], r * ROW_BLOCK, n1, hp + t0[e] * F, hsum + t0[e] * NG2, Ts[e], y + t0[e] * D);
        }
    }
    return 0;
}

/* ---- half-precision (bfloat16 / float16) dense experts ------------------------------------------
 * torch's bf16 matrix-vector product for one token runs at 1.7x the time of reading the weights here (a
 * second token costs nothing more: it takes another path); this one reads each weight once for 1..16
 * tokens and sums in float32. kind 0: bfloat16 weights, 1: float16. */

static inline float half_weight(int kind, uint16_t h)
{
    if (kind == 1) {
#if MOE_AVX512
        return _cvtsh_ss(h);
#else
        return half_to_float(h);
#endif
    }
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if MOE_AVX512
static inline __m512 half16(int kind, const uint16_t *p, __mmask16 mk)
{
    const __m256i raw = _mm256_maskz_loadu_epi16(mk, p);
    return kind == 1 ? _mm512_cvtph_ps(raw) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

/* y[t, n] for rows [n0, n1) of W [N, K] (row stride K) and x [T, K]. */
static void half_rows(int kind, const uint16_t *w, int N, int K, int n0, int n1, const float *x, int T, float *y)
{
    for (int n = n0; n < n1; n++) {
        const uint16_t *wr = w + (int64_t)n * K;
        for (int t0 = 0; t0 < T; t0 += TOKEN_TILE) {
            const int tt = T - t0 < TOKEN_TILE ? T - t0 : TOKEN_TILE;
#if MOE_AVX512
            __m512 acc[TOKEN_TILE][2];
            for (int t = 0; t < TOKEN_TILE; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            int k = 0;
            for (; k + 32 <= K; k += 32) {
                _mm_prefetch((const char *)(wr + k + PREFETCH_BYTES / 2), _MM_HINT_T0);  /* 32 weights: a line */
                const __m512 w0 = half16(kind, wr + k, 0xFFFF), w1 = half16(kind, wr + k + 16, 0xFFFF);
                for (int t = 0; t < tt; t++) {
                    const float *xt = x + (int64_t)(t0 + t) * K + k;
                    acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
                }
            }
            for (; k < K; k += 16) {
                const __mmask16 mk = (__mmask16)(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
                const __m512 w0 = half16(kind, wr + k, mk);
                for (int t = 0; t < tt; t++)
                    acc[t][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + (int64_t)(t0 + t) * K + k), acc[t][0]);
            }
            for (int t = 0; t < tt; t++)
                y[(int64_t)(t0 + t) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
#else
            for (int t = 0; t < tt; t++) {
                const float *xt = x + (int64_t)(t0 + t) * K;
                float acc = 0.0f;
                for (int k = 0; k < K; k++) acc += half_weight(kind, wr[k]) * xt[k];
                y[(int64_t)(t0 + t) * N + n] = acc;
            }
#endif
        }
    }
}

/* One SwiGLU expert with half-precision weights: y [T, D] = w2 (silu(w1 x) * (w3 x)); w1, w3 [F, D],
 * w2 [D, F]; x [T, D] float32; work: 3 T F floats. Returns 0, or 1 for an unknown kind. */
int moe_hexpert(int kind, int D, int F, int T, const uint16_t *w1, const uint16_t *w2, const uint16_t *w3,
                const float *x, float *y, float *work, int nthreads)
{
    if ((kind != 0 && kind != 1) || T < 1 || D < 1 || F < 1) return 1;
    float *gate = work, *up = work + (int64_t)T * F, *h = up + (int64_t)T * F;
    const int up_blocks = (F + ROW_BLOCK - 1) / ROW_BLOCK, down_blocks = (D + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(guided)
        for (int b = 0; b < 2 * up_blocks; b++) {
            const int r = b % up_blocks, n0 = r * ROW_BLOCK, n1 = n0 + ROW_BLOCK < F ? n0 + ROW_BLOCK : F;
            if (b < up_blocks) half_rows(kind, w1, F, D, n0, n1, x, T, gate);
            else half_rows(kind, w3, F, D, n0, n1, x, T, up);
        }
        swiglu(gate, up, h, (int64_t)T * F);
#pragma omp for schedule(guided)
        for (int b = 0; b < down_blocks; b++) {
            const int n1 = (b + 1) * ROW_BLOCK < D ? (b + 1) * ROW_BLOCK : D;
            half_rows(kind, w2, D, F, b * ROW_BLOCK, n1, h, T, y);
        }
    }
    return 0;
}

/* Bytes per second of reading `n` bytes (a multiple of 64) with `nthreads` threads, `repeats` times: the
 * memory-read bound the benchmark compares the kernels with. Returns the best of the repeats. */
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

double moe_read_bandwidth(const uint8_t *buf, int64_t n, int nthreads, int repeats)
{
    double best = 0.0;
    volatile uint64_t sink = 0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        uint64_t total = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(^ : total)
        for (int64_t i = 0; i < n / 4096; i++) {
#if MOE_AVX512
            __m512i acc = _mm512_setzero_si512();
            for (int j = 0; j < 4096; j += 64)
                acc = _mm512_xor_si512(acc, _mm512_loadu_si512((const void *)(buf + i * 4096 + j)));
            total ^= (uint64_t)_mm512_reduce_add_epi64(acc);
#else
            const uint64_t *p = (const uint64_t *)(buf + i * 4096);
            uint64_t acc = 0;
            for (int j = 0; j < 512; j++) acc ^= p[j];
            total ^= acc;
#endif
        }
        double dt = now() - t0;
        sink ^= total;
        if (dt > 0 && n / dt > best) best = n / dt;
    }
    (void)sink;
    return best;
}
