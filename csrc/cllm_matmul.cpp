// The GEMM everything else uses, and the linear layer (forward/backward) built on it.
// Each output element is owned by one thread and summed over k in a fixed order, so results do not
// depend on the thread count.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cllm.h"

namespace cllm {

namespace {
constexpr int NC = 512;  // columns of C per tile: a 4 x NC block of C stays in L1, a K x NC panel of B in L2
constexpr int MR = 4;    // rows of C updated together, reusing each loaded row of B four times

// C[i0:i0+MR, j0:j1] (+)= A[i0:i0+MR, :] @ B[:, j0:j1] with A rows given as pointers + k stride.
inline void tile(float* C, int ldc, const float* const* a_rows, int a_kstride, int rows, const float* B, int ldb,
                 int K, int j0, int j1) {
    float* c[MR];
    for (int r = 0; r < MR; r++) c[r] = C + (size_t)std::min(r, rows - 1) * ldc;
    for (int k = 0; k < K; k++) {
        const float* b = B + (size_t)k * ldb;
        float a[MR];
        for (int r = 0; r < MR; r++) a[r] = r < rows ? a_rows[r][(size_t)k * a_kstride] : 0.0f;
        if (rows == MR) {
            #pragma omp simd
            for (int j = j0; j < j1; j++) {
                float bj = b[j];
                c[0][j] += a[0] * bj;
                c[1][j] += a[1] * bj;
                c[2][j] += a[2] * bj;
                c[3][j] += a[3] * bj;
            }
        } else {
            for (int r = 0; r < rows; r++) {
                float ar = a[r];
                float* cr = c[r];
                #pragma omp simd
                for (int j = j0; j < j1; j++) cr[j] += ar * b[j];
            }
        }
    }
}

std::vector<float>& scratch() {
    thread_local std::vector<float> s;  // grows once, then reused
    return s;
}
}  // namespace

void matmul(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a, bool trans_b,
            bool accumulate) {
    if (!accumulate) std::memset(C, 0, (size_t)M * N * sizeof(float));
    if (K == 0 || M == 0 || N == 0) return;
    const float* Bk = B;  // [K, N] row-major view of op(B)
    if (trans_b) {        // op(B) = B^T with B [N,K]: transpose once, O(NK) next to the O(MNK) product
        std::vector<float>& t = scratch();
        t.resize((size_t)K * N);
        #pragma omp parallel for schedule(static)
        for (int k = 0; k < K; k++)
            for (int j = 0; j < N; j++) t[(size_t)k * N + j] = B[(size_t)j * K + k];
        Bk = t.data();
    }
    const int row_blocks = (M + MR - 1) / MR, col_blocks = (N + NC - 1) / NC;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int jb = 0; jb < col_blocks; jb++) {
        for (int ib = 0; ib < row_blocks; ib++) {
            int i0 = ib * MR, rows = std::min(MR, M - i0);
            int j0 = jb * NC, j1 = std::min(N, j0 + NC);
            const float* a_rows[MR];
            for (int r = 0; r < MR; r++) {
                int i = i0 + std::min(r, rows - 1);
                a_rows[r] = trans_a ? A + i : A + (size_t)i * K;
            }
            tile(C + (size_t)i0 * N, N, a_rows, trans_a ? M : 1, rows, Bk, N, K, j0, j1);
        }
    }
}

void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
    matmul(out, inp, w, N, OC, IC, false, false, false);
    if (bias) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            float* o = out + (size_t)n * OC;
            #pragma omp simd
            for (int j = 0; j < OC; j++) o[j] += bias[j];
        }
    }
}

void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC, bool accumulate_dinp) {
    if (dinp) matmul(dinp, dout, w, N, IC, OC, false, true, accumulate_dinp);  // dout[N,OC] @ w^T
    if (dw) matmul(dw, inp, dout, IC, OC, N, true, false, true);              // inp^T @ dout
    if (dbias) {
        // columns split across threads; rows summed in order (deterministic)
        #pragma omp parallel for schedule(static)
        for (int j0 = 0; j0 < OC; j0 += 64) {
            int j1 = std::min(OC, j0 + 64);
            for (int n = 0; n < N; n++) {
                const float* d = dout + (size_t)n * OC;
                for (int j = j0; j < j1; j++) dbias[j] += d[j];
            }
        }
    }
}

}  // namespace cllm
