// The linear layers on the GEMM: linear_forward/backward (GPT-2's Conv1D layout w [in, out], with bias) and
// projection_forward/backward (nn.Linear's w [out, in]), and the few-rows products of a decode step, which read
// the weight in place instead of packing it.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include <omp.h>

#include "gemm_tiles.h"

namespace cllm {

namespace {

// dbias += the column sums of dout[N, OC]. Rows in fixed chunks (whatever the thread count), each summed in
// order into its own partial row with contiguous full-width reads; the partials then summed in chunk order:
// deterministic, and one streaming pass over dout.
void bias_backward(float* dbias, const float* dout, int N, int OC) {
    constexpr int ROWS = 128;
    const int chunks = (N + ROWS - 1) / ROWS;
    thread_local Scratch partial_buf;
    float* partial = partial_buf.get<float>((size_t)chunks * OC);
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; c++) {
        float* acc = partial + (size_t)c * OC;
        std::memcpy(acc, dout + (size_t)c * ROWS * OC, OC * sizeof(float));
        for (int n = c * ROWS + 1; n < std::min(N, (c + 1) * ROWS); n++) {
            const float* d = dout + (size_t)n * OC;
            #pragma omp simd
            for (int j = 0; j < OC; j++) acc[j] += d[j];
        }
    }
    for (int c = 0; c < chunks; c++) {
        const float* acc = partial + (size_t)c * OC;
        #pragma omp simd
        for (int j = 0; j < OC; j++) dbias[j] += acc[j];
    }
}

// ---- a few rows (a decode step: one row per sequence) ----------------------------------------------------------
// The GEMM would pack all of the weight for them, which costs as much as the product: these paths read the rows
// in place and every weight element once for all of them, so a step costs one pass over the weights. Every output is
// summed over the inputs in a fixed order (rows_dots: in order; rows_forward: in order within fixed chunks, then the
// chunks in order), the same for any number of rows up to ROWS_MAX and any thread count: a sequence's logits do not
// depend on the batch it is decoded in while the batch has at most ROWS_MAX live rows (more take the GEMM).

// f(std::integral_constant<int, R>{}) for R = rows (1..MR): the row count of a group as a compile-time constant,
// so that its accumulators live in registers.
template <class F>
inline void with_rows(int rows, F&& f) {
    switch (rows) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        case 5: return f(std::integral_constant<int, 5>{});
        case 6: return f(std::integral_constant<int, 6>{});
        case 7: return f(std::integral_constant<int, 7>{});
        default: return f(std::integral_constant<int, MR>{});
    }
}

// out[r, j0 : j0 + NR] += x[r, k0 : k1] @ w[k0 : k1, j0 : j0 + NR] for the R rows (w [K, *] row stride ldw)
template <int R>
void rows_strip(float* out, int ldo, const float* x, int ldx, const float* w, int ldw, int k0, int k1, int j0) {
    vf c0[R], c1[R];
    for (int r = 0; r < R; r++) {
        c0[r] = *(const vf_u*)(out + (size_t)r * ldo + j0);
        c1[r] = *(const vf_u*)(out + (size_t)r * ldo + j0 + VL);
    }
    for (int k = k0; k < k1; k++) {
        const vf w0 = *(const vf_u*)(w + (size_t)k * ldw + j0), w1 = *(const vf_u*)(w + (size_t)k * ldw + j0 + VL);
        for (int r = 0; r < R; r++) {
            const float xr = x[(size_t)r * ldx + k];
            c0[r] += xr * w0;
            c1[r] += xr * w1;
        }
    }
    for (int r = 0; r < R; r++) {
        *(vf_u*)(out + (size_t)r * ldo + j0) = c0[r];
        *(vf_u*)(out + (size_t)r * ldo + j0 + VL) = c1[r];
    }
}

// p[j0 : j1] += a * w[j0 : j1] (j1 - j0 a multiple of NR): one row of rows_strip's sums for one k, as a tight loop
inline void rows_axpy(float* __restrict p, float a, const float* __restrict w, int j0, int j1) {
    int j = j0;
    for (; j + 2 * NR <= j1; j += 2 * NR) {
        vf v[4];
        for (int u = 0; u < 4; u++) v[u] = *(const vf_u*)(p + j + u * VL) + a * *(const vf_u*)(w + j + u * VL);
        for (int u = 0; u < 4; u++) *(vf_u*)(p + j + u * VL) = v[u];
    }
    for (; j < j1; j += VL) *(vf_u*)(p + j) += a * *(const vf_u*)(w + j);
}

// out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ w[K, N] (+ bias), for M <= ROWS_MAX. w is cut into
// fixed chunks of KC rows; a chunk's partial sums over its rows, in order, go to a scratch, and each output is
// then the bias plus its chunks' partials in chunk order: the same sums whatever the thread count and the number
// of rows. A thread takes a run of whole chunks, so it reads its part of w front to back as one stream (several
// streams at once, one per row of a block, measured 1.6x slower on weights in huge pages); one or two rows walk
// w a row at a time, more rows in blocks of KB (accumulators in registers over KB rows, the same sums). Only when
// threads outnumber the chunks are a chunk's columns split too.
void rows_forward(float* out, int ldo, const float* x, int ldx, const float* w, const float* bias, int M, int K,
                  int N, float* gelu_out) {
    constexpr int KC = 64;
    const int chunks = std::max(1, (K + KC - 1) / KC), strips = N / NR, KB = M <= 2 ? 1 : 8;
    thread_local Scratch scratch;  // [chunks][M][N] partial sums (the calling thread's)
    float* part = scratch.get<float>((size_t)chunks * M * N);
    #pragma omp parallel
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        const int splits = (T + chunks - 1) / chunks;
        const long tasks = (long)chunks * splits;
        for (int task = (int)(tasks * t / T); task < (int)(tasks * (t + 1) / T); task++) {
            const int c = task / splits, sp = task % splits;
            const int s0 = (int)((long)strips * sp / splits), s1 = (int)((long)strips * (sp + 1) / splits);
            const int j0 = s0 * NR, j1 = sp == splits - 1 ? N : s1 * NR;  // the last split takes the N % NR columns
            float* p = part + (size_t)c * M * N;
            for (int r = 0; r < M; r++) std::fill(p + (size_t)r * N + j0, p + (size_t)r * N + j1, 0.0f);
            for (int k0 = c * KC; k0 < std::min(K, (c + 1) * KC); k0 += KB) {
                const int k1 = std::min({K, k0 + KB, (c + 1) * KC});
                if (M <= 2)
                    for (int r = 0; r < M; r++)
                        rows_axpy(p + (size_t)r * N, x[(size_t)r * ldx + k0], w + (size_t)k0 * N, j0, s1 * NR);
                else
                    for (int s = s0; s < s1; s++)
                        for (int r0 = 0; r0 < M; r0 += MR)
                            with_rows(std::min(MR, M - r0), [&](auto R) {
                                rows_strip<R.value>(p + (size_t)r0 * N, N, x + (size_t)r0 * ldx, ldx, w, N, k0, k1,
                                                    s * NR);
                            });
                // the ragged columns, summed as a vector lane (k outer: GCC would make a k-inner loop an unfused
                // in-order reduction for some block lengths, giving other bits for other row counts)
                for (int r = 0; r < M; r++)
                    for (int k = k0; k < k1; k++) {
                        const float a = x[(size_t)r * ldx + k];
                        for (int j = strips * NR; j < j1; j++) p[(size_t)r * N + j] += a * w[(size_t)k * N + j];
                    }
            }
        }
        #pragma omp barrier
        const int j0 = (int)((long)N * t / T), j1 = (int)((long)N * (t + 1) / T);
        for (int r = 0; r < M; r++) {
            float* o = out + (size_t)r * ldo;
            for (int j = j0; j < j1; j++) o[j] = bias ? bias[j] : 0.0f;
            for (int c = 0; c < chunks; c++) {
                const float* pc = part + ((size_t)c * M + r) * N;
                #pragma omp simd
                for (int j = j0; j < j1; j++) o[j] += pc[j];
            }
            if (gelu_out) {
                float* g = gelu_out + (size_t)r * ldo;
                #pragma omp simd
                for (int j = j0; j < j1; j++) g[j] = gelu(o[j]);
            }
        }
    }
}

// out[r, j] = x[r, :] . w[j, :] for the R rows (w row j contiguous: nn.Linear's layout, the tied head)
template <int R>
void rows_dot(float* out, int ldo, const float* x, int ldx, const float* wj, int K) {
    vf s[R];
    for (int r = 0; r < R; r++) s[r] = vf{};
    const int K0 = K - K % VL;
    for (int k = 0; k < K0; k += VL) {
        const vf wv = *(const vf_u*)(wj + k);
        for (int r = 0; r < R; r++) s[r] += *(const vf_u*)(x + (size_t)r * ldx + k) * wv;
    }
    for (int r = 0; r < R; r++) {
        float acc = 0.0f;
        for (int i = 0; i < VL; i++) acc += s[r][i];
        for (int k = K0; k < K; k++) acc += x[(size_t)r * ldx + k] * wj[k];
        out[(size_t)r * ldo] = acc;
    }
}

// out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ w^T, w [N, K], for M <= ROWS_MAX: one dot per weight row
// and input row, the weight rows split between the threads.
void rows_dots(float* out, int ldo, const float* x, int ldx, const float* w, int M, int K, int N) {
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < N; j++)
        for (int r0 = 0; r0 < M; r0 += MR) {
            float* o = out + (size_t)r0 * ldo + j;
            const float* xr = x + (size_t)r0 * ldx;
            with_rows(std::min(MR, M - r0), [&](auto R) { rows_dot<R.value>(o, ldo, xr, ldx, w + (size_t)j * K, K); });
        }
}

}  // namespace

void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC, bool bf16,
                    float* gelu_out) {
    if (N <= ROWS_MAX && !bf16) return rows_forward(out, OC, inp, IC, w, bias, N, IC, OC, gelu_out);
    // the bias is added as each output tile is first stored, GELU as it is finished: no extra passes over out
    gemm({.c = out, .ldc = OC, .a = {inp, IC}, .b = {w, OC}, .m = N, .n = OC, .k = IC, .bf16 = bf16, .bias = bias,
          .gelu_out = gelu_out});
}

void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC, bool accumulate_dinp, bool bf16) {
    if (dinp)  // dinp (+)= dout w^T
        gemm({.c = dinp, .ldc = IC, .a = {dout, OC}, .b = {w, OC, true}, .m = N, .n = IC, .k = OC,
              .accumulate = accumulate_dinp, .bf16 = bf16});
    if (dw)  // dw += inp^T dout
        gemm({.c = dw, .ldc = OC, .a = {inp, IC, true}, .b = {dout, OC}, .m = IC, .n = OC, .k = N, .accumulate = true,
              .bf16 = bf16});
    if (dbias && N > 0 && OC > 0) bias_backward(dbias, dout, N, OC);  // (no rows or no columns: nothing to add)
}

// nn.Linear's layout w [OC, IC]: out = inp w^T; a few fp32 rows take the dot path, otherwise the GEMM with w as its
// transposed operand.
void projection_forward(float* out, int ldo, const float* inp, int ldi, const float* w, int N, int IC, int OC,
                        bool bf16) {
    if (N <= ROWS_MAX && !bf16) return rows_dots(out, ldo, inp, ldi, w, N, IC, OC);
    gemm({.c = out, .ldc = ldo, .a = {inp, ldi}, .b = {w, IC, true}, .m = N, .n = OC, .k = IC, .bf16 = bf16});
}

void projection_backward(float* dinp, int ldi, float* dw, const float* dout, int ldo, const float* inp,
                         const float* w, int N, int IC, int OC, bool accumulate_dinp, bool bf16) {
    if (dinp)  // dinp (+)= dout w
        gemm({.c = dinp, .ldc = ldi, .a = {dout, ldo}, .b = {w, IC}, .m = N, .n = IC, .k = OC,
              .accumulate = accumulate_dinp, .bf16 = bf16});
    if (dw)  // dw += dout^T inp
        gemm({.c = dw, .ldc = IC, .a = {dout, ldo, true}, .b = {inp, ldi}, .m = OC, .n = IC, .k = N,
              .accumulate = true, .bf16 = bf16});
}

}  // namespace cllm
