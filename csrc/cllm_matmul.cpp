// The GEMM everything else uses, and the linear layer (forward/backward) built on it.
//
// A packed, cache-blocked GEMM in the classic (Goto/BLIS) structure: op(B) is packed into KC x NR column
// panels, op(A) into MR x KC row slivers, and an MR x NR register-tile micro-kernel does the FMAs. The
// micro-kernel uses GCC vector types sized to the widest unit the build targets (AVX-512: 16 floats,
// otherwise 8), so -march picks AVX-512 or AVX2 code at build time with one source.
// Each C tile belongs to one thread and is summed over K in a fixed order: results do not depend on the
// thread count.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cllm.h"

namespace cllm {

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float)), aligned(VL * sizeof(float))));
typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(4)));  // unaligned access

constexpr int MR = 8;        // rows of C per micro-tile (2 x 8 accumulator vectors)
constexpr int NR = 2 * VL;   // columns of C per micro-tile (two vectors)
constexpr int KC = 192;      // depth of a packed block: the KC x NR panel of B stays in L1
constexpr int MC = 96;       // rows of C per thread task (multiple of MR): its A block stays in L2
constexpr int NCB = 1024;    // columns of C per thread task (multiple of NR)

// C[0:MR, 0:NR] += Ap[k][0:MR] * Bp[k][0:NR], k < kc. Writes only rows < m and columns < n.
inline void micro_kernel(int kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int ldc,
                         int m, int n) {
    vf c0[MR], c1[MR];
    for (int r = 0; r < MR; r++) c0[r] = c1[r] = (vf){};
    for (int k = 0; k < kc; k++) {
        const vf b0 = *(const vf*)(Bp + k * NR);
        const vf b1 = *(const vf*)(Bp + k * NR + VL);
        const float* a = Ap + k * MR;
        for (int r = 0; r < MR; r++) {
            c0[r] += a[r] * b0;
            c1[r] += a[r] * b1;
        }
    }
    if (m == MR && n == NR) {
        for (int r = 0; r < MR; r++) {
            vf_u* cr = (vf_u*)(C + (size_t)r * ldc);
            cr[0] += c0[r];
            cr[1] += c1[r];
        }
    } else {
        alignas(64) float t[MR][NR];
        for (int r = 0; r < MR; r++) {
            *(vf*)&t[r][0] = c0[r];
            *(vf*)&t[r][VL] = c1[r];
        }
        for (int r = 0; r < m; r++)
            for (int j = 0; j < n; j++) C[(size_t)r * ldc + j] += t[r][j];
    }
}

// Pack op(B)[k0:k0+kc, j0:j0+nc] into NR-wide panels, zero-padded: panel p holds Bp[p][k][0:NR].
void pack_B(float* Bp, const float* B, int ldb, bool trans_b, int k0, int kc, int j0, int nc) {
    const int panels = (nc + NR - 1) / NR;
    for (int p = 0; p < panels; p++) {
        float* dst = Bp + (size_t)p * kc * NR;
        const int jb = j0 + p * NR, w = std::min(NR, j0 + nc - jb);
        if (!trans_b) {
            for (int k = 0; k < kc; k++) {
                const float* src = B + (size_t)(k0 + k) * ldb + jb;
                float* d = dst + k * NR;
                int j = 0;
                for (; j < w; j++) d[j] = src[j];
                for (; j < NR; j++) d[j] = 0.0f;
            }
        } else {  // B is [N, K]: op(B)[k][j] = B[j][k], read along k
            for (int j = 0; j < NR; j++) {
                if (j < w) {
                    const float* src = B + (size_t)(jb + j) * ldb + k0;
                    for (int k = 0; k < kc; k++) dst[k * NR + j] = src[k];
                } else {
                    for (int k = 0; k < kc; k++) dst[k * NR + j] = 0.0f;
                }
            }
        }
    }
}

// Pack op(A)[i0:i0+mc, k0:k0+kc] into MR-high slivers, zero-padded: sliver s holds Ap[s][k][0:MR].
void pack_A(float* Ap, const float* A, int lda, bool trans_a, int i0, int mc, int k0, int kc) {
    const int slivers = (mc + MR - 1) / MR;
    for (int s = 0; s < slivers; s++) {
        float* dst = Ap + (size_t)s * kc * MR;
        const int ib = i0 + s * MR, h = std::min(MR, i0 + mc - ib);
        if (trans_a) {  // A is [K, M]: op(A)[i][k] = A[k][i], rows contiguous along i
            for (int k = 0; k < kc; k++) {
                const float* src = A + (size_t)(k0 + k) * lda + ib;
                float* d = dst + k * MR;
                int r = 0;
                for (; r < h; r++) d[r] = src[r];
                for (; r < MR; r++) d[r] = 0.0f;
            }
        } else {
            for (int r = 0; r < MR; r++) {
                if (r < h) {
                    const float* src = A + (size_t)(ib + r) * lda + k0;
                    for (int k = 0; k < kc; k++) dst[k * MR + r] = src[k];
                } else {
                    for (int k = 0; k < kc; k++) dst[k * MR + r] = 0.0f;
                }
            }
        }
    }
}

// 64-byte aligned scratch that grows once and is reused (no allocation in the steady state).
struct Scratch {
    FloatBuffer buf;
    size_t n = 0;
    float* get(size_t need) {
        if (need > n) {
            buf = alloc_floats(need);
            n = need;
        }
        return buf.get();
    }
};

}  // namespace

void gemm(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int N, int K, bool trans_a,
          bool trans_b, bool accumulate, bool parallel) {
    if (!accumulate)
        for (int i = 0; i < M; i++) std::memset(C + (size_t)i * ldc, 0, (size_t)N * sizeof(float));
    if (K == 0 || M == 0 || N == 0) return;
    thread_local Scratch bscratch;
    const int n_panels = (N + NR - 1) / NR;
    float* Bp = bscratch.get((size_t)n_panels * KC * NR);
    const int mblocks = (M + MC - 1) / MC, nblocks = (N + NCB - 1) / NCB;
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = std::min(KC, K - k0);
        #pragma omp parallel if (parallel)
        {
            // pack all of op(B)[k0:k0+kc, :], panels split across threads
            #pragma omp for schedule(static)
            for (int p = 0; p < n_panels; p++)
                pack_B(Bp + (size_t)p * kc * NR, B, ldb, trans_b, k0, kc, p * NR, std::min(NR, N - p * NR));
            thread_local Scratch ascratch;
            float* Ap = ascratch.get((size_t)MC * KC);
            #pragma omp for schedule(static) collapse(2)
            for (int ib = 0; ib < mblocks; ib++)
                for (int jb = 0; jb < nblocks; jb++) {
                    const int i0 = ib * MC, mc = std::min(MC, M - i0);
                    const int j0 = jb * NCB, nc = std::min(NCB, N - j0);
                    pack_A(Ap, A, lda, trans_a, i0, mc, k0, kc);
                    for (int jr = 0; jr < nc; jr += NR) {
                        const float* bp = Bp + (size_t)((j0 + jr) / NR) * kc * NR;
                        for (int ir = 0; ir < mc; ir += MR)
                            micro_kernel(kc, Ap + (size_t)(ir / MR) * kc * MR, bp,
                                         C + (size_t)(i0 + ir) * ldc + j0 + jr, ldc, std::min(MR, mc - ir),
                                         std::min(NR, nc - jr));
                    }
                }
        }
    }
}

void matmul(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a, bool trans_b,
            bool accumulate) {
    gemm(C, N, A, trans_a ? M : K, B, trans_b ? K : N, M, N, K, trans_a, trans_b, accumulate, true);
}

void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC) {
    if (bias) {  // start from the bias and let the GEMM accumulate: no separate pass over out
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) std::memcpy(out + (size_t)n * OC, bias, OC * sizeof(float));
    }
    matmul(out, inp, w, N, OC, IC, false, false, bias != nullptr);
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
