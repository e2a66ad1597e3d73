/* DGQ's channel-grouped int8 linear layer on AVX-512 VNNI: one call (`dgq_linear`) per layer call, every group in
   one pass, called by kernels/vnni_fused.py.

   1. The step's tables are read once per call: each column's (or, for pixel groups, each row's) scale, reciprocal
      and zero point.
   2. quantize_rows / quantize_unfolded / quantize_image: float inputs -> uint8 codes in the packed column order
      (each group's columns contiguous, each group padded to a multiple of 4 with code 0), and in the same pass each
      row's sum of dequantized values r[m].
   3. grouped_gemm: out[m, n] = s_w[n] (F[m, n] - a[m] c[n]) - r[m] gap[n] + bias[n] (+ acc[m, n]), where
      c[n] = sum_g s_g z_g sum_{k in g} W[n, k] (channel groups) or sum_k W[n, k] (pixel groups), computed by each
      task for its 32 channels (zero_point_terms), and F[m, n] = sum_g s_mg sum_{k in g} q[m, k] W[n, k],
      accumulated in int32 within a group (vpdpbusd: u8 codes times s8 centred weights, four products per int32
      lane, no saturation) and in float32 across groups; a[m] = 1 (channel groups) or s_m z_m (pixel groups).

   The weight is packed in panels of 16 output channels: byte (p, q, c, j) is W[16 p + c, column 4 q + j], so one
   64-byte load holds four columns of 16 channels, as vpdpbusd reads them. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_ROWS 6   /* rows per register tile: 6 x 2 int32 and 6 x 2 float32 accumulators fit the 32 zmm */
#define PANEL 16
#define BLOCK_ROWS 48 /* rows per task: their codes stay in L2 while the task walks the weight's panel pairs */

static inline __m512 quantize16(__m512 x, __m512 inverse, __m512 zero_point, __m512 qmax) {
    /* One rounding of x * (1/s) + z, half to even, clamped: quantizers.quantize_uniform's codes. */
    __m512 v = _mm512_fmadd_ps(x, inverse, zero_point);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), qmax);
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* The codes of row xr's 16 columns from k0 (those below k), with their parameters from column_tables
   {inverse, zero_point, scale} (per column), or as *iv, *zp, *s hold them (column_tables NULL: one set for the
   row); their dequantized values s (q - z) added to *sum (a lane beyond k reads 0, whose code is z: it adds 0). */
static inline __m128i quantize_chunk(const float *xr, int64_t k0, int64_t k, const float *const *column_tables,
                                     __m512 *iv, __m512 *zp, __m512 *s, __m512 top, __m512 *sum) {
    const int64_t left = k - k0;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    if (column_tables) {
        *iv = _mm512_maskz_loadu_ps(mask, column_tables[0] + k0);
        *zp = _mm512_maskz_loadu_ps(mask, column_tables[1] + k0);
        *s = _mm512_maskz_loadu_ps(mask, column_tables[2] + k0);
    }
    const __m512 q = quantize16(_mm512_maskz_loadu_ps(mask, xr + k0), *iv, *zp, top);
    *sum = _mm512_fmadd_ps(_mm512_sub_ps(q, *zp), *s, *sum);
    return _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(q));
}

/* Rows of float inputs, row m at x + m * stride_row, column k at + k.
   Channel groups: inverse, zero_point, scale per column (k,); row_params NULL. Pixel groups: row m takes entry
   row_params[m % period] of the tables inverse, zero_point, scale (one group, no permutation).
   position_of (k,): where column k goes in a code row of `padded` bytes (NULL: to k); quad_bounds (groups + 1,) of
   the code row; group_masks (groups x windows): the columns of each 64-column window in each group (with
   AVX-512 VBMI2, where each group's columns are packed by `vpcompressb`; a group's columns keep their order).
   codes: (rows_padded, padded), each group's padding columns 0. r (m,): each row's sum of dequantized values,
   s (q - z) over its columns in column order, so that a row's sum depends on nothing but the row. */
static void quantize_rows(const float *x, int64_t stride_row, int64_t m, int64_t k, const float *inverse,
                          const float *zero_point, const float *scale, const int64_t *row_params, int64_t period,
                          float qmax, const int32_t *position_of, const int32_t *quad_bounds, int64_t groups,
                          const uint64_t *group_masks, uint8_t *codes, int64_t padded, float *r, int threads) {
    const __m512 top = _mm512_set1_ps(qmax);
    const float *columns_params[3] = {inverse, zero_point, scale};
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < m; ++row) {
        const float *xr = x + row * stride_row;
        uint8_t *out = codes + row * padded;
        __m512 iv = _mm512_setzero_ps(), zp = iv, s = iv, sum = iv;
        if (row_params) {
            const int64_t p = row_params[row % period];
            iv = _mm512_set1_ps(inverse[p]), zp = _mm512_set1_ps(zero_point[p]), s = _mm512_set1_ps(scale[p]);
        }
        const float *const *column_tables = row_params ? NULL : columns_params;
        if (!position_of) {
            if (padded > k) memset(out + k, 0, (size_t)(padded - k));
            for (int64_t k0 = 0; k0 < k; k0 += 16) {
                const __m128i bytes = quantize_chunk(xr, k0, k, column_tables, &iv, &zp, &s, top, &sum);
                const int64_t left = k - k0;
                _mm_mask_storeu_epi8(out + k0, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1), bytes);
            }
            r[row] = _mm512_reduce_add_ps(sum);
            continue;
        }
#ifdef __AVX512VBMI2__
        /* 64 columns' codes at a time in a register, each group's packed by vpcompressb and stored at that group's
           next code column: exactly its codes, so that groups written out of order do not overwrite each other. */
        const int64_t windows = (k + 63) / 64;
        int64_t at[groups];
        for (int64_t g = 0; g < groups; ++g) at[g] = 4 * (int64_t)quad_bounds[g];
        for (int64_t w = 0; w < windows; ++w) {
            const int64_t k0 = 64 * w;
#define CHUNK(offset) quantize_chunk(xr, k0 + (offset), k, column_tables, &iv, &zp, &s, top, &sum)
            __m512i window = _mm512_castsi128_si512(CHUNK(0));
            window = _mm512_inserti32x4(window, CHUNK(16), 1);
            window = _mm512_inserti32x4(window, CHUNK(32), 2);
            window = _mm512_inserti32x4(window, CHUNK(48), 3);
#undef CHUNK
            for (int64_t g = 0; g < groups; ++g) {
                const uint64_t columns = group_masks[g * windows + w];
                if (!columns) continue;
                const int count = __builtin_popcountll(columns);
                const __mmask64 store = count == 64 ? ~(__mmask64)0 : (((__mmask64)1 << count) - 1);
                _mm512_mask_storeu_epi8(out + at[g], store, _mm512_maskz_compress_epi8(columns, window));
                at[g] += count;
            }
        }
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t pos = at[g]; pos < 4 * (int64_t)quad_bounds[g + 1]; ++pos) out[pos] = 0;
#else
        (void)quad_bounds, (void)groups, (void)group_masks;
        memset(out, 0, (size_t)padded);
        for (int64_t k0 = 0; k0 < k; k0 += 16) {
            uint8_t lanes[16];
            _mm_storeu_si128((__m128i *)lanes, quantize_chunk(xr, k0, k, column_tables, &iv, &zp, &s, top, &sum));
            for (int64_t col = k0; col < k && col < k0 + 16; ++col) out[position_of[col]] = lanes[col - k0];
        }
#endif
        r[row] = _mm512_reduce_add_ps(sum);
    }
}

/* *acc += four u8 x s8 products per int32 lane, accumulated in place. */
static inline __attribute__((always_inline)) void dpbusd(__m512i *acc, __m512i codes, __m512i weights) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(*acc) : "v"(codes), "v"(weights));
}

/* One TILE_ROWS x 32 output tile: rows row0.., panels 2 * pair and 2 * pair + 1; c: the tile's 32 zero point terms. */
static inline void tile(const uint8_t *codes, int64_t padded, const int8_t *w0, const int8_t *w1,
                        const int32_t *quad_bounds, int64_t groups, const float *group_scale, const float *row_scale,
                        int64_t row0, int64_t m, int64_t n, int64_t col0, const float *a, float a_const,
                        const float *c, const float *w_scale, const float *r, const float *gap, const float *bias,
                        const float *acc, int64_t positions, float *out) {
    __m512 f[TILE_ROWS][2];
    for (int i = 0; i < TILE_ROWS; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
    const uint8_t *rows = codes + row0 * padded;
    /* The int32 accumulators are named, not an array, and updated in place by `dpbusd`: through the intrinsic,
       GCC 12 copies every accumulator to another register at each step of the loop. */
#define ROW_STEP(i, s0, s1)                                                                                      \
    do {                                                                                                       \
        int32_t quad;                                                                                          \
        memcpy(&quad, rows + (i) * padded + q * 4, 4);                                                         \
        const __m512i codes4 = _mm512_set1_epi32(quad);                                                        \
        dpbusd(&s0, codes4, b0);                                                                               \
        dpbusd(&s1, codes4, b1);                                                                               \
    } while (0)
#define ROW_SCALE(i, s0, s1)                                                                                     \
    do {                                                                                                       \
        const __m512 scale = _mm512_set1_ps(row_scale ? row_scale[row0 + (i)] : group_scale[g]);              \
        f[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), scale, f[i][0]);                                    \
        f[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), scale, f[i][1]);                                    \
    } while (0)
    for (int64_t g = 0; g < groups; ++g) {
        __m512i s00 = _mm512_setzero_si512(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00;
        __m512i s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
        for (int64_t q = quad_bounds[g]; q < quad_bounds[g + 1]; ++q) {
            const __m512i b0 = _mm512_loadu_si512(w0 + q * 64), b1 = _mm512_loadu_si512(w1 + q * 64);
            ROW_STEP(0, s00, s01);
            ROW_STEP(1, s10, s11);
            ROW_STEP(2, s20, s21);
            ROW_STEP(3, s30, s31);
            ROW_STEP(4, s40, s41);
            ROW_STEP(5, s50, s51);
        }
        ROW_SCALE(0, s00, s01);
        ROW_SCALE(1, s10, s11);
        ROW_SCALE(2, s20, s21);
        ROW_SCALE(3, s30, s31);
        ROW_SCALE(4, s40, s41);
        ROW_SCALE(5, s50, s51);
    }
#undef ROW_STEP
#undef ROW_SCALE
    for (int i = 0; i < TILE_ROWS && row0 + i < m; ++i) {
        const int64_t row = row0 + i;
        for (int half = 0; half < 2; ++half) {
            const int64_t col = col0 + half * PANEL;
            if (col >= n) break;
            const int64_t left = n - col;
            const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = f[i][half];
            v = _mm512_fnmadd_ps(_mm512_set1_ps(a ? a[row] : a_const), _mm512_loadu_ps(c + half * PANEL), v);
            v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, w_scale + col));
            if (r && gap) v = _mm512_fnmadd_ps(_mm512_set1_ps(r[row]), _mm512_maskz_loadu_ps(mask, gap + col), v);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + col));
            if (acc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, acc + row * n + col));
            if (positions) { /* images (B, n, positions): the 16 channels of one pixel lie positions apart */
                const __m512i offsets = _mm512_mullo_epi32(
                    _mm512_add_epi32(_mm512_set1_epi32((int32_t)col), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8,
                                                                                       7, 6, 5, 4, 3, 2, 1, 0)),
                    _mm512_set1_epi32((int32_t)positions));
                float *pixel = out + (row / positions) * n * positions + row % positions;
                _mm512_mask_i32scatter_ps(pixel, mask, offsets, v, 4);
            } else {
                _mm512_mask_storeu_ps(out + row * n + col, mask, v);
            }
        }
    }
}

/* r[i] becomes column i of the 16 x 16 bytes (four rounds of interleaving rows i and i + 8). */
static inline void transpose16x16(__m128i r[16]) {
    for (int round = 0; round < 4; ++round) {
        __m128i s[16];
        for (int i = 0; i < 8; ++i) {
            s[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
            s[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = s[i];
    }
}

/* Each code column's input column: column_at[pos] = col, or -1 for a padding column. */
static void code_columns(int64_t k, int64_t padded, const int32_t *position_of, int32_t *column_at) {
    for (int64_t pos = 0; pos < padded; ++pos) column_at[pos] = -1;
    for (int64_t col = 0; col < k; ++col) column_at[position_of ? position_of[col] : col] = (int32_t)col;
}

/* 16 rows' codes of 16 code columns (tile[i]: column pos0 + i's 16 rows), transposed and stored as the rows' codes. */
static inline void store_transposed(__m128i tile[16], uint8_t *out, int64_t padded, int64_t pos0, int64_t count) {
    transpose16x16(tile);
    const int64_t width16 = padded - pos0 < 16 ? padded - pos0 : 16;
    const __mmask16 store = (__mmask16)((1u << width16) - 1);
    for (int64_t j = 0; j < count; ++j) _mm_mask_storeu_epi8(out + j * padded + pos0, store, tile[j]);
}

/* Channel groups' codes of an im2col unfolding (B, K, L): row m is sample m / positions, position m % positions,
   column k at x + sample * stride_sample + position + k * stride_k. Blocks of up to 16 rows of one sample are
   quantized 16 code columns at a time, the 16 rows of one column as one vector, and transposed so that each row's
   16 codes are one store. position_of (k,): where column k goes in a code row of `padded` bytes (NULL: to k);
   inverse, zero_point, scale (k,): each column's parameters; column_at (padded,) scratch. Padding columns get code
   0. r (m,): each row's sum of dequantized values, over its columns in code order. */
static void quantize_unfolded(const float *x, int64_t stride_sample, int64_t stride_k, int64_t positions, int64_t m,
                              int64_t k, const int32_t *position_of, const float *inverse, const float *zero_point,
                              const float *scale, float qmax, uint8_t *codes, int64_t padded, int32_t *column_at,
                              float *r, int threads) {
    const __m512 top = _mm512_set1_ps(qmax);
    code_columns(k, padded, position_of, column_at);
    const int64_t per_sample = (positions + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < m / positions * per_sample; ++task) {
        const int64_t sample = task / per_sample, first = (task % per_sample) * 16;
        const int64_t row0 = sample * positions + first, count = positions - first < 16 ? positions - first : 16;
        const __mmask16 rows = (__mmask16)((1u << count) - 1);
        const float *base = x + sample * stride_sample + first;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t pos0 = 0; pos0 < padded; pos0 += 16) {
            __m128i tile[16];
            for (int i = 0; i < 16; ++i) {
                const int64_t pos = pos0 + i, col = pos < padded ? column_at[pos] : -1;
                if (col < 0) {
                    tile[i] = _mm_setzero_si128();
                    continue;
                }
                const __m512 zp = _mm512_set1_ps(zero_point[col]);
                const __m512 q = quantize16(_mm512_maskz_loadu_ps(rows, base + col * stride_k),
                                            _mm512_set1_ps(inverse[col]), zp, top);
                sum = _mm512_fmadd_ps(_mm512_sub_ps(q, zp), _mm512_set1_ps(scale[col]), sum);
                tile[i] = _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(q));
            }
            store_transposed(tile, codes + row0 * padded, padded, pos0, count);
        }
        _mm512_mask_storeu_ps(r + row0, rows, sum);
    }
}

/* Channel groups' codes of a stride-1 convolution's unfolding, read from its image x (B, C, H, W) contiguous:
   column col = (c * kh + ky) * kw + kx of row m = (b * out_h + oy) * out_w + ox is
   x[b, c, oy + dy, ox + dx] with dy = ky * dil_h - pad_h, dx = kx * dil_w - pad_w, 0 outside the image (F.unfold's
   zero padding, whose code is the group's zero point).

   The image is quantized once per (channel, parameters, dx), not once per tap: into a code plane whose row iy holds
   the codes of x[b, c, iy, ox + dx] for ox < out_w, so that a tap's codes for output pixels (oy, ox) in row-major
   order are contiguous in the plane whichever the image's width (plane rows from the smallest dy to out_h - 1 plus
   the largest). Then blocks of 16 output pixels of one image take each code column's 16 codes as one load, and
   transpose them into the pixels' code rows.
   col_param (k,): each column's parameter index into inverse, zero_point, scale (entries,); position_of as
   quantize_unfolded's. Returns 0, or the bytes it failed to allocate. */
static int64_t quantize_image(const float *x, const int64_t *shape, int64_t k, const int32_t *position_of,
                              const int32_t *col_param, int64_t entries, const float *inverse,
                              const float *zero_point, const float *scale, float qmax, uint8_t *codes,
                              int64_t padded, int32_t *column_at, float *r, int threads) {
    const int64_t batch = shape[0], channels = shape[1], height = shape[2], width = shape[3], kh = shape[4],
                  kw = shape[5], pad_h = shape[6], pad_w = shape[7], dil_h = shape[8], dil_w = shape[9],
                  out_h = shape[10], out_w = shape[11];
    const int64_t taps = kh * kw, pixels = out_h * out_w, first_dy = -pad_h;
    const int64_t plane_rows = out_h + (kh - 1) * dil_h, plane_bytes = plane_rows * out_w;
    code_columns(k, padded, position_of, column_at);
    /* The planes: one per distinct (channel, parameter entry, kx) among the columns. Per code column: its codes'
       offset in an image's planes (-1: a padding column), zero point and scale. Per plane: its channel, parameter
       entry and kx. Per (kx, 16 plane codes): which lanes lie inside the image, and (for the gather) their inputs. */
    const int64_t chunks = (plane_bytes + 15) / 16;
    int32_t *plane_of_key = malloc(sizeof(int32_t) * (size_t)(channels * entries * kw));
    const int64_t table_bytes = (int64_t)(sizeof(int64_t) + 2 * sizeof(float)) * padded +
                                (int64_t)sizeof(int32_t) * (3 * k + kw * chunks * 16) +
                                (int64_t)sizeof(__mmask16) * kw * chunks;
    int64_t *offset_of = malloc((size_t)table_bytes);
    if (!plane_of_key || !offset_of) {
        free(plane_of_key), free(offset_of);
        return (int64_t)sizeof(int32_t) * channels * entries * kw + table_bytes;
    }
    float *zero_point_of = (float *)(offset_of + padded), *scale_of = zero_point_of + padded;
    int32_t *plane_channel = (int32_t *)(scale_of + padded), *plane_param = plane_channel + k;
    int32_t *plane_kx = plane_param + k, *gather_at = plane_kx + k;
    __mmask16 *inside_at = (__mmask16 *)(gather_at + kw * chunks * 16);
    for (int64_t key = 0; key < channels * entries * kw; ++key) plane_of_key[key] = -1;
    int64_t planes = 0;
    for (int64_t pos = 0; pos < padded; ++pos) {
        const int64_t col = column_at[pos];
        offset_of[pos] = -1, zero_point_of[pos] = scale_of[pos] = 0.0f;
        if (col < 0) continue;
        const int64_t c = col / taps, ky = col % taps / kw, kx = col % kw, p = col_param[col];
        const int64_t key = (c * entries + p) * kw + kx;
        if (plane_of_key[key] < 0) {
            plane_channel[planes] = (int32_t)c, plane_param[planes] = (int32_t)p, plane_kx[planes] = (int32_t)kx;
            plane_of_key[key] = (int32_t)planes++;
        }
        offset_of[pos] = plane_of_key[key] * plane_bytes + ky * dil_h * out_w;
        zero_point_of[pos] = zero_point[p], scale_of[pos] = scale[p];
    }
    free(plane_of_key);
    /* Plane code f = row * out_w + ox of kx holds input (row + first_dy, ox + kx * dil_w - pad_w). */
    for (int64_t kx = 0; kx < kw; ++kx) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            __mmask16 inside = 0;
            for (int j = 0; j < 16; ++j) {
                const int64_t f = chunk * 16 + j, iy = f / out_w + first_dy, ix = f % out_w + kx * dil_w - pad_w;
                const int in = f < plane_bytes && iy >= 0 && iy < height && ix >= 0 && ix < width;
                inside |= (__mmask16)(in << j);
                gather_at[(kx * chunks + chunk) * 16 + j] = in ? (int32_t)(iy * width + ix) : 0;
            }
            inside_at[kx * chunks + chunk] = inside;
        }
    }
    /* 16 bytes of slack: a block's 16-byte load may pass its plane's end. */
    uint8_t *plane_codes = malloc((size_t)(batch * planes * plane_bytes + 16));
    if (!plane_codes) {
        free(offset_of);
        return batch * planes * plane_bytes + 16;
    }
    const __m512 top = _mm512_set1_ps(qmax);
    const int64_t per_sample = (pixels + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * planes; ++task) {
            const int64_t b = task / planes, plane_index = task % planes, kx = plane_kx[plane_index];
            const int64_t p = plane_param[plane_index], dx = kx * dil_w - pad_w;
            const __m512 iv = _mm512_set1_ps(inverse[p]), zp = _mm512_set1_ps(zero_point[p]);
            const float *channel = x + (b * channels + plane_channel[plane_index]) * height * width;
            const __mmask16 *inside = inside_at + kx * chunks;
            uint8_t *plane = plane_codes + task * plane_bytes;
            /* 16 plane codes at a time, across plane rows: a narrow image's rows fill the vector. */
            for (int64_t chunk = 0; chunk < chunks; ++chunk) {
                const int64_t f0 = chunk * 16, left = plane_bytes - f0;
                /* With out_w == width (a "same" convolution) code f reads input f + first_dy * width + dx: one load,
                   whose masked lanes are not read, so its address may lie outside the image. */
                const __m512 values =
                    out_w == width
                        ? _mm512_maskz_loadu_ps(inside[chunk], inside[chunk] ? channel + f0 + first_dy * width + dx : x)
                        : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside[chunk],
                                                   _mm512_loadu_si512(gather_at + (kx * chunks + chunk) * 16),
                                                   channel, 4);
                const __m512 q = quantize16(values, iv, zp, top);
                _mm_mask_storeu_epi8(plane + f0, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1),
                                     _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(q)));
            }
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < batch * per_sample; ++task) {
            const int64_t b = task / per_sample, first = (task % per_sample) * 16;
            const int64_t row0 = b * pixels + first, count = pixels - first < 16 ? pixels - first : 16;
            const uint8_t *image_planes = plane_codes + b * planes * plane_bytes + first;
            __m512 sum = _mm512_setzero_ps();
            for (int64_t pos0 = 0; pos0 < padded; pos0 += 16) {
                __m128i tile[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t pos = pos0 + i, offset = pos < padded ? offset_of[pos] : -1;
                    if (offset < 0) {
                        tile[i] = _mm_setzero_si128();
                        continue;
                    }
                    tile[i] = _mm_loadu_si128((const __m128i *)(image_planes + offset));
                    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(tile[i]));
                    sum = _mm512_fmadd_ps(_mm512_sub_ps(q, _mm512_set1_ps(zero_point_of[pos])),
                                          _mm512_set1_ps(scale_of[pos]), sum);
                }
                store_transposed(tile, codes + row0 * padded, padded, pos0, count);
            }
            _mm512_mask_storeu_ps(r + row0, (__mmask16)((1u << count) - 1), sum);
        }
    }
    free(plane_codes);
    free(offset_of);
    return 0;
}

/* c[32]: sum_g coefficient[g] sum_{k in g} W[n, k] of a panel pair's 32 channels (vpdpbusd with codes 1), the
   zero points' term; computed by each task for its pair, which its tiles then read from cache anyway. Not inlined:
   inlined into the task loop it raised the register pressure of `tile`, which then reloaded its two weight vectors
   from the stack for every vpdpbusd (the SD UNet call took 1.5 s instead of 1.1 s). */
static __attribute__((noinline)) void zero_point_terms(const int8_t *w0, const int8_t *w1, const int32_t *quad_bounds,
                                                       int64_t groups, const float *coefficient, float *c) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 terms0 = _mm512_setzero_ps(), terms1 = terms0;
    for (int64_t g = 0; g < groups; ++g) {
        __m512i sums0 = _mm512_setzero_si512(), sums1 = sums0;
        for (int64_t q = quad_bounds[g]; q < quad_bounds[g + 1]; ++q) {
            dpbusd(&sums0, ones, _mm512_loadu_si512(w0 + q * 64));
            dpbusd(&sums1, ones, _mm512_loadu_si512(w1 + q * 64));
        }
        const __m512 weight = _mm512_set1_ps(coefficient[g]);
        terms0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums0), weight, terms0);
        terms1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums1), weight, terms1);
    }
    _mm512_storeu_ps(c, terms0);
    _mm512_storeu_ps(c + PANEL, terms1);
}

/* codes: (rows_padded, padded) with rows_padded a multiple of TILE_ROWS; weight: (n_padded / 16, padded / 4, 16, 4)
   with n_padded a multiple of 32; quad_bounds (groups + 1,): group g is quads quad_bounds[g]:quad_bounds[g + 1].
   group_scale (groups,) or row_scale (rows_padded,) per row (one group); a (m,) or a_const; coefficient (groups,)
   of the zero points' term; w_scale, gap, bias (n,) (gap, bias, r, acc, a may be NULL). acc: (m, n); out: (m, n), or
   with positions > 0 images (m / positions, n, positions) (a convolution's output, row m at pixel m % positions of
   image m / positions). */
static void grouped_gemm(const uint8_t *codes, int64_t m, int64_t padded, const int8_t *weight, int64_t n,
                         int64_t n_padded, const int32_t *quad_bounds, int64_t groups, const float *group_scale,
                         const float *row_scale, const float *a, float a_const, const float *coefficient,
                         const float *w_scale, const float *r, const float *gap, const float *bias, const float *acc,
                         int64_t positions, float *out, int threads) {
    const int64_t pairs = n_padded / (2 * PANEL), blocks = (m + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int64_t panel_bytes = (padded / 4) * 64;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; ++block) {
        for (int64_t pair = 0; pair < pairs; ++pair) {
            const int8_t *w0 = weight + (2 * pair) * panel_bytes, *w1 = w0 + panel_bytes;
            const int64_t end = (block + 1) * BLOCK_ROWS < m ? (block + 1) * BLOCK_ROWS : m;
            float c[2 * PANEL];
            zero_point_terms(w0, w1, quad_bounds, groups, coefficient, c);
            for (int64_t row0 = block * BLOCK_ROWS; row0 < end; row0 += TILE_ROWS)
                tile(codes, padded, w0, w1, quad_bounds, groups, group_scale, row_scale, row0, m, n,
                     pair * 2 * PANEL, a, a_const, c, w_scale, r, gap, bias, acc, positions, out);
        }
    }
}

/* The step's parameter tables scale[entries], zero_point[entries], indexed by group_ids[g] for column group g of
   `groups` (column_group[k]: each input column's group; NULL: one group), or with pixel groups by row_labels[m %
   period] for row m (one column group).

   kind 0: x is float rows, row m at x + m * stride_row, shape = {stride_row, m, k} (quantize_rows);
   kind 1: x is a stride-1 convolution's image, shape = {batch, channels, height, width, kh, kw, pad_h, pad_w,
           dil_h, dil_w, out_h, out_w} (quantize_image);
   kind 2: x is (m, k) uint8 codes already quantized with group 0's parameters, shape = {m, k}: no row sums, no gap
           term;
   kind 3: x is an im2col unfolding (B, k, L), shape = {stride_sample, stride_k, L, m, k} (quantize_unfolded).
   weight: panels of `padded` columns (position_of, quad_bounds as PanelWeight holds them), n outputs in n_padded.
   w_scale, gap, bias, acc as grouped_gemm's (gap, bias, acc may be NULL). out: (m, n) for kinds 0 and 2; a
   convolution's images (B, n, L) for kinds 1 (L = out_h * out_w) and 3.
   Returns 0, or the bytes it failed to allocate. */
int64_t dgq_linear(int kind, const void *x, const int64_t *shape, const float *scale, const float *zero_point,
                int64_t entries, const int32_t *group_ids, const uint8_t *column_group, int64_t groups,
                const int64_t *row_labels, int64_t period, float qmax, const int8_t *weight,
                const int32_t *position_of, const int32_t *quad_bounds, int64_t padded, int64_t n, int64_t n_padded,
                const float *w_scale, const float *gap, const float *bias, const float *acc, float *out,
                int threads) {
    const int64_t m = kind == 0 ? shape[1] : kind == 1 ? shape[0] * shape[10] * shape[11] : kind == 2 ? shape[0]
                                                                                                     : shape[3];
    const int64_t k = kind == 0 ? shape[2] : kind == 1 ? shape[1] * shape[4] * shape[5] : kind == 2 ? shape[1]
                                                                                                   : shape[4];
    const int64_t rows_padded = (m + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS, windows = (k + 63) / 64;
    /* Padding rows of the codes are left as they are: they are not stored. */
    const int64_t codes_bytes = rows_padded * padded;
    const int64_t scratch_bytes = (int64_t)sizeof(uint64_t) * groups * windows +
                                  (int64_t)sizeof(float) *
                                      (4 * k + padded + entries + 3 * groups + 2 * rows_padded + m);
    uint8_t *codes = malloc((size_t)codes_bytes);
    uint64_t *scratch = malloc((size_t)scratch_bytes);
    if (!codes || !scratch) {
        free(codes);
        free(scratch);
        return codes_bytes + scratch_bytes;
    }
    uint64_t *group_masks = scratch;
    float *inverse = (float *)(group_masks + groups * windows), *zp = inverse + k, *col_scale = zp + k;
    int32_t *col_param = (int32_t *)(col_scale + k), *column_at = col_param + k;
    float *table_inverse = (float *)(column_at + padded);
    float *group_scale = table_inverse + entries, *group_zero_point = group_scale + groups;
    float *coefficient = group_zero_point + groups;
    float *row_scale = coefficient + groups, *a = row_scale + rows_padded, *r = a + rows_padded;
    for (int64_t p = 0; p < entries; ++p) table_inverse[p] = 1.0f / scale[p]; /* correctly rounded: torch's too */
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t p = group_ids[g];
        group_scale[g] = scale[p], group_zero_point[g] = zero_point[p];
        coefficient[g] = row_labels ? 1.0f : scale[p] * zero_point[p];
    }
    if (row_labels) {
        for (int64_t row = 0; row < rows_padded; ++row) {
            const int64_t p = row_labels[row % period];
            row_scale[row] = scale[p];
            a[row] = scale[p] * zero_point[p];
        }
    } else if (kind != 2) {
        memset(group_masks, 0, sizeof(uint64_t) * (size_t)(groups * windows));
        for (int64_t col = 0; col < k; ++col) {
            const int64_t g = column_group ? column_group[col] : 0, p = group_ids[g];
            inverse[col] = table_inverse[p], zp[col] = zero_point[p], col_scale[col] = scale[p];
            col_param[col] = (int32_t)p;
            group_masks[g * windows + col / 64] |= (uint64_t)1 << (col % 64);
        }
    }
    if (kind == 0) {
        quantize_rows((const float *)x, shape[0], m, k, row_labels ? table_inverse : inverse,
                      row_labels ? zero_point : zp, row_labels ? scale : col_scale, row_labels, period, qmax,
                      position_of, quad_bounds, groups, group_masks, codes, padded, r, threads);
    } else if (kind == 2) {
        for (int64_t row = 0; row < m; ++row) memcpy(codes + row * padded, (const uint8_t *)x + row * k, (size_t)k);
    } else if (kind == 3) {
        quantize_unfolded((const float *)x, shape[0], shape[1], shape[2], m, k, position_of, inverse, zp, col_scale,
                          qmax, codes, padded, column_at, r, threads);
    } else {
        const int64_t failed = quantize_image((const float *)x, shape, k, position_of, col_param, entries,
                                              table_inverse, zero_point, scale, qmax, codes, padded, column_at, r,
                                              threads);
        if (failed) {
            free(scratch);
            free(codes);
            return failed;
        }
    }
    grouped_gemm(codes, m, padded, weight, n, n_padded, quad_bounds, groups, group_scale,
                 row_labels ? row_scale : NULL, row_labels ? a : NULL, 1.0f, coefficient, w_scale,
                 kind == 2 ? NULL : r, gap, bias, acc, kind == 1 ? shape[10] * shape[11] : kind == 3 ? shape[2] : 0,
                 out, threads);
    free(scratch);
    free(codes);
    return 0;
}
