// Decoding with bf16 weights (generate with precision bf16). A decode step multiplies a few rows by every weight,
// so its time is the time to read the weights: the bf16 copies made here once per generate call halve it.
// Each weight op(w) [K, N] becomes column panels of NR columns; a panel holds its ceil(K/2) k pairs one after the
// other, NR 32-bit words each (bf16 of k = 2i in the low half, 2i+1 in the high), so a thread streams a panel
// front to back. bf16_product rounds the rows to bf16 pairs the same way and sums in fp32 registers: with
// AVX-512 BF16 by vdpbf16ps; otherwise each word becomes two floats (a shift and a mask) for two FMAs, the same
// products summed in another order.
#include <algorithm>
#include <vector>

#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cllm.h"

namespace cllm {

namespace {

typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t)), aligned(VL * sizeof(uint32_t))));
constexpr int NR = 2 * VL;  // columns per panel: two vectors
constexpr int MR = 8;       // rows per tile

inline int pairs(int K) { return (K + 1) / 2; }
inline int panel_count(int N) { return (N + NR - 1) / NR; }
inline uint32_t pair(float lo, float hi) { return to_bf16(lo) | (to_bf16(hi) << 16); }

// t[r][0:NR] = sum over the kp pairs of a[k][r] . b[k][0:NR] for rows r < R (a: [kp][MR] pairs, b: [kp][NR] pairs).
template <int R>
void panel_tile(int kp, const uint32_t* __restrict a, const uint32_t* __restrict b, float (*t)[NR]) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    __m512 c0[R], c1[R];
    for (int r = 0; r < R; r++) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int k = 0; k < kp; k++) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512(b + (size_t)k * NR);
        const __m512bh b1 = (__m512bh)_mm512_load_si512(b + (size_t)k * NR + VL);
        for (int r = 0; r < R; r++) {
            const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[k * MR + r]);
            c0[r] = _mm512_dpbf16_ps(c0[r], ar, b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], ar, b1);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_store_ps(t[r], c0[r]);
        _mm512_store_ps(t[r] + VL, c1[r]);
    }
#else
    vf c0[R], c1[R];
    for (int r = 0; r < R; r++) c0[r] = c1[r] = (vf){};
    const vu high = (vu){} + 0xffff0000u;
    for (int k = 0; k < kp; k++) {
        const vu w0 = *(const vu*)(b + (size_t)k * NR), w1 = *(const vu*)(b + (size_t)k * NR + VL);
        const vf e0 = (vf)(w0 << 16), o0 = (vf)(w0 & high), e1 = (vf)(w1 << 16), o1 = (vf)(w1 & high);
        for (int r = 0; r < R; r++) {
            const uint32_t p = a[k * MR + r];
            const float ae = from_bf16(p & 0xffffu), ao = __builtin_bit_cast(float, p & 0xffff0000u);
            c0[r] += ae * e0;
            c0[r] += ao * o0;
            c1[r] += ae * e1;
            c1[r] += ao * o1;
        }
    }
    for (int r = 0; r < R; r++) {
        *(vf*)t[r] = c0[r];
        *(vf*)(t[r] + VL) = c1[r];
    }
#endif
}

// The rows as bf16 pairs, in groups of MR rows: a[g][k][r] (rows past m and the odd K's last high half are 0).
const uint32_t* pack_rows(const float* x, int ldx, int m, int K) {
    thread_local std::vector<uint32_t> buf;
    const int kp = pairs(K), groups = (m + MR - 1) / MR;
    buf.assign((size_t)groups * kp * MR, 0u);
    for (int i = 0; i < m; i++) {
        const float* row = x + (size_t)i * ldx;
        uint32_t* d = buf.data() + (size_t)(i / MR) * kp * MR + i % MR;
        for (int k = 0; k < kp; k++) d[(size_t)k * MR] = pair(row[2 * k], 2 * k + 1 < K ? row[2 * k + 1] : 0.0f);
    }
    return buf.data();
}

// Rows [0, rows) of the tile t into columns [j0, j0 + n) of out, plus the bias; gelu_out gets gelu of them.
void store_rows(float* out, int ldo, const float (*t)[NR], int rows, int j0, int n, const float* bias,
                float* gelu_out) {
    for (int r = 0; r < rows; r++) {
        float* o = out + (size_t)r * ldo + j0;
        for (int j = 0; j < n; j++) o[j] = t[r][j] + (bias ? bias[j0 + j] : 0.0f);
        if (gelu_out) {
            float* g = gelu_out + (size_t)r * ldo + j0;
            #pragma omp simd
            for (int j = 0; j < n; j++) g[j] = gelu(o[j]);
        }
    }
}

}  // namespace

int decode_panel_width() { return NR; }

size_t packed_bf16_floats(int K, int N) { return (size_t)panel_count(N) * pairs(K) * NR; }

PackedBF16 pack_bf16(int K, const std::vector<WeightPart>& parts, float* out) {
    // where each column of op(w) starts, and the step from one k to the next
    std::vector<const float*> col;
    std::vector<size_t> kstep;
    for (const WeightPart& p : parts)
        for (int j = 0; j < p.n; j++) {
            col.push_back(p.w.trans ? p.w.data + (size_t)j * p.w.ld : p.w.data + j);
            kstep.push_back(p.w.trans ? 1 : (size_t)p.w.ld);
        }
    PackedBF16 w;
    w.K = K;
    w.N = (int)col.size();
    w.data = (const uint32_t*)out;
    uint32_t* dst = (uint32_t*)out;
    const int kp = pairs(K);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panel_count(w.N); p++) {
        const int j0 = p * NR, n = std::min(NR, w.N - j0);
        uint32_t* d = dst + (size_t)p * kp * NR;
        if (n < NR)  // the last panel's missing columns are zeros
            for (int k = 0; k < kp; k++) std::fill(d + (size_t)k * NR + n, d + (size_t)(k + 1) * NR, 0u);
        bool side_by_side = true;  // the panel's columns lie next to each other in the rows of one [K, *] weight
        for (int j = 1; j < n; j++) side_by_side &= col[j0 + j] == col[j0] + j && kstep[j0 + j] == kstep[j0];
        if (side_by_side) {  // a row pair at a time (vectorised)
            const size_t s = kstep[j0];
            for (int k = 0; k < kp; k++) {
                const float* lo = col[j0] + 2 * k * s;
                uint32_t* dk = d + (size_t)k * NR;
                if (2 * k + 1 < K)
                    for (int j = 0; j < n; j++) dk[j] = pair(lo[j], lo[s + j]);
                else
                    for (int j = 0; j < n; j++) dk[j] = pair(lo[j], 0.0f);
            }
        } else {  // a column at a time (op(w) transposed: each column contiguous)
            for (int j = 0; j < n; j++) {
                const float* c = col[j0 + j];
                const size_t s = kstep[j0 + j];
                for (int k = 0; k < kp; k++)
                    d[(size_t)k * NR + j] = pair(c[2 * k * s], 2 * k + 1 < K ? c[(2 * k + 1) * s] : 0.0f);
            }
        }
    }
    return w;
}

void bf16_product(float* out, int ldo, const float* x, int ldx, int m, const PackedBF16& w, const float* bias,
                  float* gelu_out) {
    if (m <= 0 || w.N == 0) return;
    const int kp = pairs(w.K), groups = (m + MR - 1) / MR;
    const uint32_t* a = pack_rows(x, ldx, m, w.K);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panel_count(w.N); p++) {
        const uint32_t* b = w.panels() + (size_t)p * kp * NR;
        const int j0 = p * NR, n = std::min(NR, w.N - j0);
        for (int g = 0; g < groups; g++) {  // the panel read from memory once, then from cache for the next rows
            alignas(64) float t[MR][NR];
            const int rows = std::min(MR, m - g * MR);
            const uint32_t* ag = a + (size_t)g * kp * MR;
            if (rows == 1)
                panel_tile<1>(kp, ag, b, t);
            else if (rows == 2)
                panel_tile<2>(kp, ag, b, t);
            else if (rows <= 4)
                panel_tile<4>(kp, ag, b, t);
            else
                panel_tile<8>(kp, ag, b, t);
            const size_t at = (size_t)g * MR * ldo;
            store_rows(out + at, ldo, t, rows, j0, n, bias, gelu_out ? gelu_out + at : nullptr);
        }
    }
}

}  // namespace cllm
