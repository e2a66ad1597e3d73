/* DGQ attention on CPUs with AVX-512: cpu_attention.py says what it computes and why it is laid out this way. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Query rows per tile; key (score) and head-dim (output) vectors per register tile. */
#define ROWS 8
#define LANES 16
#define TILE_VECTORS 3

enum { LOG2 = 0, LOG_SQRT2 = 1, UNIFORM = 2 };

static inline __mmask16 lanes_below(int64_t count) {
    return count >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

/* exp(x) for x <= 0 (scores minus their row's maximum), Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6
   polynomial for e^r, then the exponent added by vscalefps (which takes the result down through the subnormals to
   zero). Within 1 ulp of glibc's expf wherever that is a normal float (every seventh float of [-104, 0] checked):
   a probability's code changes only next to a code boundary. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f)); /* e^-150 is 0 in float32; keeps -inf out of the reduction */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* The quantizer of one sample's probabilities (cpu_attention.py: the arithmetic of dgq_core.quantizers). */
typedef struct {
    int kind;
    float scale, inverse_scale, step, inverse_step, qmax, smallest;
    uint32_t carry, exponent;
} ProbQuantizer;

static inline __m512 quantize(__m512 p, const ProbQuantizer *q) {
    if (q->kind == UNIFORM) {
        __m512 codes = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(p, _mm512_set1_ps(q->inverse_step)),
                                                   _mm512_setzero_ps()), _mm512_set1_ps(q->qmax));
        codes = _mm512_roundscale_ps(codes, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm512_mul_ps(codes, _mm512_set1_ps(q->step));
    }
    __m512 ratio = _mm512_mul_ps(p, _mm512_set1_ps(q->inverse_scale));
    if (q->kind == LOG_SQRT2) ratio = _mm512_mul_ps(ratio, ratio);
    __m512i bits = _mm512_add_epi32(_mm512_castps_si512(ratio), _mm512_set1_epi32((int)q->carry));
    __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)q->exponent)));
    rounded = _mm512_min_ps(_mm512_max_ps(rounded, _mm512_set1_ps(q->smallest)), _mm512_set1_ps(1.0f));
    if (q->kind == LOG_SQRT2) rounded = _mm512_sqrt_ps(rounded);
    return _mm512_mul_ps(rounded, _mm512_set1_ps(q->scale));
}

/* K^T of one (sample, head) in panels of 16 keys, zero-padded to `padded` keys: key j's dim d at
   kt[(j / 16 * head_dim + d) * 16 + j % 16], so that a score tile reads its keys' panels contiguously. */
static void pack_keys(const float *k, int64_t stride_kn, int64_t n_keys, int64_t head_dim, int64_t padded, float *kt) {
    for (int64_t j = 0; j < padded; ++j) {
        float *panel = kt + j / LANES * head_dim * LANES + j % LANES;
        for (int64_t d = 0; d < head_dim; ++d) panel[d * LANES] = j < n_keys ? k[j * stride_kn + d] : 0.0f;
    }
}

/* s[r * ld + j] = scale * (q_r . k_j) for the tile's ROWS rows and the VECTORS key panels from kt (qt: the tile's
   queries transposed, qt[d * ROWS + r]); rows at or past `rows` are not stored. */
static inline __attribute__((always_inline)) void score_block(const float *qt, const float *kt, int64_t head_dim,
                                                              float scale, float *s, int64_t ld, int rows,
                                                              const int VECTORS) {
    __m512 acc[ROWS][TILE_VECTORS];
    for (int r = 0; r < ROWS; ++r)
        for (int u = 0; u < VECTORS; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; ++d) {
        __m512 keys[TILE_VECTORS];
        for (int u = 0; u < VECTORS; ++u) keys[u] = _mm512_loadu_ps(kt + (u * head_dim + d) * LANES);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 query = _mm512_set1_ps(qt[d * ROWS + r]);
            for (int u = 0; u < VECTORS; ++u) acc[r][u] = _mm512_fmadd_ps(query, keys[u], acc[r][u]);
        }
    }
    const __m512 scales = _mm512_set1_ps(scale);
    for (int r = 0; r < ROWS; ++r)  /* constant bounds: the accumulators stay in registers */
        for (int u = 0; u < VECTORS; ++u)
            if (r < rows) _mm512_storeu_ps(s + r * ld + u * LANES, _mm512_mul_ps(acc[r][u], scales));
}

/* The scores of a tile's `rows` queries (from `queries`, stride_qn apart) against a plane's keys into s (rows of ld);
   qt: scratch for the queries transposed (the register rows past `rows` repeat the last query). */
static void scores(const float *queries, int64_t stride_qn, int rows, float *qt, const float *kt, int64_t padded,
                   int64_t head_dim, float scale, float *s, int64_t ld) {
    for (int r = 0; r < ROWS; ++r) {
        const float *query = queries + (r < rows ? r : rows - 1) * stride_qn;
        for (int64_t d = 0; d < head_dim; ++d) qt[d * ROWS + r] = query[d];
    }
    int64_t j = 0;
    for (; j + TILE_VECTORS * LANES <= padded; j += TILE_VECTORS * LANES)
        score_block(qt, kt + j * head_dim, head_dim, scale, s + j, ld, rows, TILE_VECTORS);
    for (; j < padded; j += LANES) score_block(qt, kt + j * head_dim, head_dim, scale, s + j, ld, rows, 1);
}

/* e = exp(x - row_max) over a row's keys in place; returns their sum. */
static float exponentiate(float *row, int64_t n_keys, float row_max) {
    const __m512 shift = _mm512_set1_ps(row_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_keys; j += LANES) {
        const __mmask16 valid = lanes_below(n_keys - j);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, row + j), shift));
        _mm512_mask_storeu_ps(row + j, valid, e);
        sum = _mm512_mask_add_ps(sum, valid, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

static float row_maximum(const float *row, int64_t n_keys, int64_t from) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n_keys; j += LANES) {
        __mmask16 valid = lanes_below(n_keys - j);
        if (j < from) valid &= (__mmask16)(0xFFFFu << from);
        best = _mm512_mask_max_ps(best, valid, best, _mm512_maskz_loadu_ps(valid, row + j));
    }
    return _mm512_reduce_max_ps(best);
}

/* A row's exponentials become its quantized probabilities p = e / l in place; the <start> column keeps p exact. */
static void quantize_row(float *row, int64_t n_keys, float inverse_sum, int keep_start, const ProbQuantizer *q) {
    const float start = row[0] * inverse_sum;
    const __m512 inverse = _mm512_set1_ps(inverse_sum);
    for (int64_t j = 0; j < n_keys; j += LANES) {
        const __mmask16 valid = lanes_below(n_keys - j);
        const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + j), inverse);
        _mm512_mask_storeu_ps(row + j, valid, quantize(p, q));
    }
    if (keep_start) row[0] = start;
}

/* out_r[d0 .. d0 + 16 VECTORS) = sum_j p[r][j] v_j over the tile's rows (p: rows of ld; v rows stride_vn); the
   register rows at or past `rows` repeat the last row and are not stored. */
static inline __attribute__((always_inline)) void weigh_values(const float *p, int64_t ld, int rows, const float *v,
                                                               int64_t stride_vn, int64_t n_keys, int64_t d0,
                                                               int64_t head_dim, float *out, int64_t stride_om,
                                                               const int VECTORS) {
    __mmask16 dims[TILE_VECTORS];
    for (int u = 0; u < VECTORS; ++u) dims[u] = lanes_below(head_dim - d0 - u * LANES);
    const float *weights[ROWS];
    for (int r = 0; r < ROWS; ++r) weights[r] = p + (r < rows ? r : rows - 1) * ld;
    __m512 acc[ROWS][TILE_VECTORS];
    for (int r = 0; r < ROWS; ++r)
        for (int u = 0; u < VECTORS; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_keys; ++j) {
        __m512 values[TILE_VECTORS];
        for (int u = 0; u < VECTORS; ++u)
            values[u] = _mm512_maskz_loadu_ps(dims[u], v + j * stride_vn + d0 + u * LANES);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 weight = _mm512_set1_ps(weights[r][j]);
            for (int u = 0; u < VECTORS; ++u) acc[r][u] = _mm512_fmadd_ps(weight, values[u], acc[r][u]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int u = 0; u < VECTORS; ++u)
            if (r < rows) _mm512_mask_storeu_ps(out + r * stride_om + d0 + u * LANES, dims[u], acc[r][u]);
}

static void attend_values(const float *p, int64_t ld, int rows, const float *v, int64_t stride_vn, int64_t n_keys,
                          int64_t head_dim, float *out, int64_t stride_om) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += TILE_VECTORS * LANES) {
        const int64_t left = (head_dim - d0 + LANES - 1) / LANES;
        if (left >= 3) weigh_values(p, ld, rows, v, stride_vn, n_keys, d0, head_dim, out, stride_om, 3);
        else if (left == 2) weigh_values(p, ld, rows, v, stride_vn, n_keys, d0, head_dim, out, stride_om, 2);
        else weigh_values(p, ld, rows, v, stride_vn, n_keys, d0, head_dim, out, stride_om, 1);
    }
}

/* One call's attention (cpu_attention.py's dgq_attention). q, k, v: (batch, heads, rows, head_dim) with element
   strides stride_*b, stride_*h, stride_*n and a unit last stride; out: (batch, queries, heads, head_dim) contiguous.
   padded: n_keys rounded up to 16; kt: batch * heads * head_dim * padded floats; exps: stored_planes * n_queries rows
   of padded + 16 floats (a row stride off the 4 KiB that the 8 rows of a tile would otherwise share a cache set at),
   the exponentials of the first stored_planes (sample, head) planes kept between the passes (the others are computed
   again);
   stats: 3 * batch * heads * n_queries floats. Returns 0, or -1 where its scratch could not be allocated. */
int32_t dgq_attention_f32(const float *q, const float *k, const float *v, float *out, float *kt, float *exps,
                       float *stats, int64_t batch, int64_t heads, int64_t n_queries,
                       int64_t n_keys, int64_t head_dim, int64_t stride_qb, int64_t stride_qh, int64_t stride_qn,
                       int64_t stride_kb, int64_t stride_kh, int64_t stride_kn, int64_t stride_vb, int64_t stride_vh,
                       int64_t stride_vn, float scale, float qmax, int32_t kind, int32_t keep_start,
                       int64_t stored_planes, uint32_t carry, uint32_t exponent) {
    const int64_t planes = batch * heads, padded = (n_keys + LANES - 1) / LANES * LANES, ld = padded + LANES;
    const int64_t plane_keys = head_dim * padded;
    const int64_t tiles = (n_queries + ROWS - 1) / ROWS, tasks = planes * tiles, plane_stats = planes * n_queries;
    float *row_max = stats, *inverse_sum = stats + plane_stats, *largest = stats + 2 * plane_stats;
    /* Each thread's score tile (ROWS rows of ld) and transposed query tile, allocated before the threads start so
       that a failed allocation is an error code, not a crash. */
    const int threads = omp_get_max_threads();
    const size_t thread_floats = (size_t)(ROWS * ld + (ROWS * head_dim + LANES - 1) / LANES * LANES);  /* 64 B */
    ProbQuantizer *quantizers = malloc(sizeof(ProbQuantizer) * (size_t)batch);
    float *thread_scratch = aligned_alloc(64, sizeof(float) * thread_floats * (size_t)threads);
    if (quantizers == NULL || thread_scratch == NULL) {
        free(quantizers);
        free(thread_scratch);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        float *scratch = thread_scratch + thread_floats * (size_t)omp_get_thread_num();
        float *qt = scratch + ROWS * ld;
#pragma omp for schedule(static)
        for (int64_t plane = 0; plane < planes; ++plane) {
            const int64_t b = plane / heads, h = plane % heads;
            pack_keys(k + b * stride_kb + h * stride_kh, stride_kn, n_keys, head_dim, padded, kt + plane * plane_keys);
        }
        /* Pass 1: each row's maximum, 1 / sum of exponentials and largest quantized probability. */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t plane = task / tiles, first = task % tiles * ROWS, b = plane / heads, h = plane % heads;
            const int rows = (int)(n_queries - first < ROWS ? n_queries - first : ROWS);
            float *tile = plane < stored_planes ? exps + (plane * n_queries + first) * ld : scratch;
            scores(q + b * stride_qb + h * stride_qh + first * stride_qn, stride_qn, rows, qt, kt + plane * plane_keys,
                   padded, head_dim, scale, tile, ld);
            for (int r = 0; r < rows; ++r) {
                float *row = tile + r * ld;
                const int64_t at = plane * n_queries + first + r;
                const float maximum = row_maximum(row, n_keys, 0);
                const float quantized_max = keep_start ? row_maximum(row, n_keys, 1) : maximum;
                const float inverse = 1.0f / exponentiate(row, n_keys, maximum);
                row_max[at] = maximum;
                inverse_sum[at] = inverse;
                largest[at] = expf(quantized_max - maximum) * inverse;
            }
        }
#pragma omp single
        for (int64_t b = 0; b < batch; ++b) {
            float s = -INFINITY;
            for (int64_t at = b * heads * n_queries; at < (b + 1) * heads * n_queries; ++at)
                s = largest[at] > s ? largest[at] : s;
            const float step = fmaxf(s / qmax, 1.17549435e-38f);
            quantizers[b] = (ProbQuantizer){kind, s, 1.0f / s, step, 1.0f / step, qmax,
                                            fmaxf(exp2f(-qmax), 1.17549435e-38f), carry, exponent};
        }
        /* Pass 2: the probabilities again (kept, or from the scores), quantized with the sample's scale, times V. */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t plane = task / tiles, first = task % tiles * ROWS, b = plane / heads, h = plane % heads;
            const int rows = (int)(n_queries - first < ROWS ? n_queries - first : ROWS);
            const int64_t at = plane * n_queries + first;
            float *tile = scratch;
            if (plane < stored_planes) {
                tile = exps + at * ld;
            } else {
                scores(q + b * stride_qb + h * stride_qh + first * stride_qn, stride_qn, rows, qt,
                       kt + plane * plane_keys, padded, head_dim, scale, tile, ld);
                for (int r = 0; r < rows; ++r) exponentiate(tile + r * ld, n_keys, row_max[at + r]);
            }
            for (int r = 0; r < rows; ++r)
                quantize_row(tile + r * ld, n_keys, inverse_sum[at + r], keep_start, &quantizers[b]);
            const int64_t stride_om = heads * head_dim;
            attend_values(tile, ld, rows, v + b * stride_vb + h * stride_vh, stride_vn, n_keys, head_dim,
                          out + (b * n_queries + first) * stride_om + h * head_dim, stride_om);
        }
    }
    free(thread_scratch);
    free(quantizers);
    return 0;
}
