// The GEMM everything else uses, and the linear layer (forward/backward) built on it.
//
// A packed, cache-blocked GEMM in the classic (Goto/BLIS) structure: op(B) is packed into KC x NR column
// panels, op(A) into MR x KC row slivers, and an MR x NR register-tile micro-kernel does the FMAs. Each A
// sliver (broadcast operand, 12 KB) stays in L1 while it runs across NCS columns of packed B (vector operand,
// in L2): the BLIS loop order, mirrored for row-major C (measured 3-8 % faster than B panels outer). The
// micro-kernel uses GCC vector types sized to the widest unit the build targets (AVX-512: 16 floats,
// otherwise 8), so -march picks AVX-512 or AVX2 code at build time with one source.
// Each C tile belongs to one thread and is summed over K in a fixed order: results do not depend on the
// thread count.
#include <algorithm>
#include <cstring>

#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

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
constexpr int MC = 128;       // rows of C per thread task (multiple of MR): its A block stays in L2
constexpr int NCB = 1024;    // columns of C per thread task (multiple of NR)
constexpr int NCS = 256;     // of which the KC x NCS packed B block stays in L2 while each A sliver (L1) runs across it
constexpr size_t PACK_BUDGET = 16u << 20;  // bytes of packed op(B) at a time: fits the L3 cache
constexpr size_t C_LARGE = 4u << 20;       // a C this big no longer stays in the L2 caches between K blocks

// Adds the finished MR x NR register tile to C, or (add false: C's first K block) stores it plus the bias
// row when there is one; writes only rows < m and columns < n.
inline void store_tile(const vf* c0, const vf* c1, float* C, int ldc, int m, int n, bool add, const float* bias) {
    alignas(64) float bt[NR] = {};
    if (!add && bias)
        for (int j = 0; j < n; j++) bt[j] = bias[j];
    const vf b0 = *(const vf*)&bt[0], b1 = *(const vf*)&bt[VL];
    if (m == MR && n == NR) {
        for (int r = 0; r < MR; r++) {
            vf_u* cr = (vf_u*)(C + (size_t)r * ldc);
            if (add) {
                cr[0] += c0[r];
                cr[1] += c1[r];
            } else {
                cr[0] = c0[r] + b0;
                cr[1] = c1[r] + b1;
            }
        }
    } else {
        alignas(64) float t[MR][NR];
        for (int r = 0; r < MR; r++) {
            *(vf*)&t[r][0] = c0[r];
            *(vf*)&t[r][VL] = c1[r];
        }
        for (int r = 0; r < m; r++)
            for (int j = 0; j < n; j++) C[(size_t)r * ldc + j] = (add ? C[(size_t)r * ldc + j] : bt[j]) + t[r][j];
    }
}

// Asks for the C tile's cache lines (write intent) before the K loop, which hides their miss: C is too big
// for the caches and its rows are too far apart for the hardware prefetcher.
inline void prefetch_tile(float* C, int ldc, int m) {
    for (int r = 0; r < m; r++) {
        __builtin_prefetch(C + (size_t)r * ldc, 1, 3);
        __builtin_prefetch(C + (size_t)r * ldc + NR - 1, 1, 3);
    }
}

// fp32: C[0:MR, 0:NR] += Ap[k][0:MR] * Bp[k][0:NR], k < kc.
struct KernelF32 {
    using T = float;
    static constexpr int KSTEP = 1;  // k values per packed step
    static constexpr int KC = 384;   // depth of a packed block: 192, 256, 384 measured, 384 fastest here
    static void run(int kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int ldc, int m, int n,
                    bool add, const float* bias) {
        vf c0[MR], c1[MR];
        for (int r = 0; r < MR; r++) c0[r] = c1[r] = (vf){};
        prefetch_tile(C, ldc, m);
        for (int k = 0; k < kc; k++) {
            const vf b0 = *(const vf*)(Bp + k * NR);
            const vf b1 = *(const vf*)(Bp + k * NR + VL);
            const float* a = Ap + k * MR;
            for (int r = 0; r < MR; r++) {
                c0[r] += a[r] * b0;
                c1[r] += a[r] * b1;
            }
        }
        store_tile(c0, c1, C, ldc, m, n, add, bias);
    }
    static float convert(float x) { return x; }
    static constexpr bool CONVERTS = false;  // convert() is the identity: packing may move raw floats
};

// bf16 inputs, fp32 accumulation. Values are rounded to bf16 (nearest even) while packing; k is packed in
// pairs, Ap[k/2][r][2] and Bp[k/2][j][2], the layout of the AVX-512 BF16 dot product vdpbf16ps, which adds
// a[2k]*b[2k] + a[2k+1]*b[2k+1] into each fp32 lane. Without AVX-512 BF16 the same rounded values run
// through the fp32 kernel, so results agree across CPUs up to summation order.
// Branch-free, so the packing loops vectorise.
inline uint32_t to_bf16(float x) {
    const uint32_t u = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;  // NaN stays NaN
    return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}
#if defined(__AVX512BF16__) && defined(__AVX512F__)
struct KernelBF16 {
    using T = uint16_t;
    static constexpr int KSTEP = 2;
    static constexpr int KC = 768;  // same bytes per packed panel as fp32's 384 (measured faster than 384)
    static void run(int kc, const uint16_t* __restrict Ap, const uint16_t* __restrict Bp, float* C, int ldc, int m,
                    int n, bool add, const float* bias) {
        __m512 c0[MR], c1[MR];
        for (int r = 0; r < MR; r++) c0[r] = c1[r] = _mm512_setzero_ps();
        prefetch_tile(C, ldc, m);
        const int kp = (kc + 1) / 2;
        const uint32_t* a32 = (const uint32_t*)Ap;
        for (int k = 0; k < kp; k++) {
            const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp + (size_t)k * 2 * NR);
            const __m512bh b1 = (__m512bh)_mm512_load_si512(Bp + (size_t)k * 2 * NR + 2 * VL);
            for (int r = 0; r < MR; r++) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)a32[k * MR + r]);
                c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
            }
        }
        vf v0[MR], v1[MR];
        for (int r = 0; r < MR; r++) {
            v0[r] = (vf)c0[r];
            v1[r] = (vf)c1[r];
        }
        store_tile(v0, v1, C, ldc, m, n, add, bias);
    }
    static uint16_t convert(float x) { return (uint16_t)to_bf16(x); }
    static constexpr bool CONVERTS = true;
};
#else
struct KernelBF16 : KernelF32 {  // emulation: bf16-rounded values in fp32
    static float convert(float x) { return __builtin_bit_cast(float, (uint32_t)to_bf16(x) << 16); }
    static constexpr bool CONVERTS = true;
};
#endif

template <int KSTEP>
inline int padded_k(int kc) { return (kc + KSTEP - 1) / KSTEP * KSTEP; }

#if defined(__AVX__)
// dst[k * W + i] = src[i * ld + k] for i, k < 8: one 8 x 8 transpose in registers.
inline void transpose8x8(float* dst, size_t W, const float* src, size_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1 | a5 ...
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * W, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * W, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}
#endif

// Copy a kc x w block into a packed block W wide (zero-padded to W and to whole k steps). The source is
// either k-major (element (k, i) at src[k * ld + i], rows contiguous along i) or i-major (at src[i * ld + k]).
template <class K, bool KMAJOR>
void pack_block(typename K::T* dst, const float* src, size_t ld, int kc, int w, int W) {
    using T = typename K::T;
    const int kpad = padded_k<K::KSTEP>(kc);
    if (w < W || kpad > kc) std::fill(dst, dst + (size_t)kpad * W, K::convert(0.0f));
    if (KMAJOR) {
        for (int k = 0; k < kc; k++) {
            const float* s = src + (size_t)k * ld;
            if (K::KSTEP == 1) {
                T* d = dst + (size_t)k * W;
                #pragma omp simd
                for (int i = 0; i < w; i++) d[i] = K::convert(s[i]);
            } else if ((k & 1) == 0) {  // rows k and k+1 go into one 32-bit pair per column
                uint32_t* d = (uint32_t*)(dst + (size_t)(k >> 1) * W * 2);
                if (k + 1 < kc) {
                    const float* s1 = s + ld;
                    #pragma omp simd
                    for (int i = 0; i < w; i++) d[i] = to_bf16(s[i]) | (to_bf16(s1[i]) << 16);
                } else {
                    #pragma omp simd
                    for (int i = 0; i < w; i++) d[i] = to_bf16(s[i]);  // odd kc: the pair's second half is 0
                }
            }
        }
    } else if (K::KSTEP == 1) {
        int i0 = 0;
#if defined(__AVX__)
        if (!K::CONVERTS)  // transpose 8 x 8 tiles in registers, then the ragged edges one by one
            for (; i0 + 8 <= w; i0 += 8) {
                const float* s = src + (size_t)i0 * ld;
                float* d = (float*)dst + i0;
                int k = 0;
                for (; k + 8 <= kc; k += 8) transpose8x8(d + (size_t)k * W, W, s + k, ld);
                for (; k < kc; k++)
                    for (int i = 0; i < 8; i++) d[(size_t)k * W + i] = s[(size_t)i * ld + k];
            }
#endif
        for (int i = i0; i < w; i++) {
            const float* s = src + (size_t)i * ld;
            for (int k = 0; k < kc; k++) dst[(size_t)k * W + i] = K::convert(s[k]);
        }
    } else {  // (k, k+1) are neighbours in the source: one 32-bit pair each
        uint32_t* d = (uint32_t*)dst;
        int i0 = 0;
#if defined(__AVX__)
        // 8 rows x 16 k: round to 8 pairs per row, then transpose the 8 x 8 pairs like floats
        for (; i0 + 8 <= w && kc >= 16; i0 += 8) {
            int k = 0;
            for (; k + 16 <= kc; k += 16) {
                alignas(32) uint32_t pairs[8][8];
                for (int r = 0; r < 8; r++) {
                    const float* s = src + (size_t)(i0 + r) * ld + k;
                    #pragma omp simd
                    for (int j = 0; j < 8; j++) pairs[r][j] = to_bf16(s[2 * j]) | (to_bf16(s[2 * j + 1]) << 16);
                }
                transpose8x8((float*)(d + (size_t)(k >> 1) * W + i0), W, (const float*)&pairs[0][0], 8);
            }
            for (int i = i0; i < i0 + 8; i++) {
                const float* s = src + (size_t)i * ld;
                for (int kk = k; kk < kc; kk += 2)
                    d[(size_t)(kk >> 1) * W + i] = to_bf16(s[kk]) | (kk + 1 < kc ? to_bf16(s[kk + 1]) << 16 : 0u);
            }
        }
#endif
        for (int i = i0; i < w; i++) {
            const float* s = src + (size_t)i * ld;
            int k = 0;
            for (; k + 1 < kc; k += 2) d[(size_t)(k >> 1) * W + i] = to_bf16(s[k]) | (to_bf16(s[k + 1]) << 16);
            if (k < kc) d[(size_t)(k >> 1) * W + i] = to_bf16(s[k]);
        }
    }
}

// Pack op(B)[k0:k0+kc, j0:j0+nc] into NR-wide panels.
template <class K>
void pack_B(typename K::T* Bp, const float* B, int ldb, bool trans_b, int k0, int kc, int j0, int nc) {
    const int kpad = padded_k<K::KSTEP>(kc), panels = (nc + NR - 1) / NR;
    for (int p = 0; p < panels; p++) {
        const int jb = j0 + p * NR, w = std::min(NR, j0 + nc - jb);
        typename K::T* dst = Bp + (size_t)p * kpad * NR;
        if (trans_b)  // B is [N, K]
            pack_block<K, false>(dst, B + (size_t)jb * ldb + k0, ldb, kc, w, NR);
        else
            pack_block<K, true>(dst, B + (size_t)k0 * ldb + jb, ldb, kc, w, NR);
    }
}

// Pack op(A)[i0:i0+mc, k0:k0+kc] into MR-high slivers.
template <class K>
void pack_A(typename K::T* Ap, const float* A, int lda, bool trans_a, int i0, int mc, int k0, int kc) {
    const int kpad = padded_k<K::KSTEP>(kc), slivers = (mc + MR - 1) / MR;
    for (int s = 0; s < slivers; s++) {
        const int ib = i0 + s * MR, h = std::min(MR, i0 + mc - ib);
        typename K::T* dst = Ap + (size_t)s * kpad * MR;
        if (trans_a)  // A is [K, M]
            pack_block<K, true>(dst, A + (size_t)k0 * lda + ib, lda, kc, h, MR);
        else
            pack_block<K, false>(dst, A + (size_t)ib * lda + k0, lda, kc, h, MR);
    }
}

// 64-byte aligned scratch that grows once and is reused (no allocation in the steady state).
struct Scratch {
    FloatBuffer buf;
    size_t n = 0;
    template <class T>
    T* get(size_t elems) {
        size_t need = (elems * sizeof(T) + sizeof(float) - 1) / sizeof(float);
        if (need > n) {
            buf = alloc_floats(need);
            n = need;
        }
        return reinterpret_cast<T*>(buf.get());
    }
};

// Brings the next block of op(A) toward L2 a few cache lines at a time while the current block computes,
// so that packing it finds it there rather than in memory.
struct BlockPrefetch {
    const char* base = nullptr;
    size_t ld = 0;  // bytes between rows
    int lines = 0, total = 0, next = 0;
    // op(A)[i0:i0+mc, k0:k0+kc], A stored [K, M] if trans_a
    void start(const float* A, int lda, bool trans_a, int i0, int mc, int k0, int kc) {
        const int rows = trans_a ? kc : mc, width = trans_a ? mc : kc;
        base = (const char*)(trans_a ? A + (size_t)k0 * lda + i0 : A + (size_t)i0 * lda + k0);
        ld = (size_t)lda * sizeof(float);
        lines = (width * (int)sizeof(float) + 63) / 64;
        total = rows * lines;
        next = 0;
    }
    void step(int n) {
        for (; n > 0 && next < total; n--, next++)
            __builtin_prefetch(base + (next / lines) * ld + (next % lines) * 64, 0, 2);
    }
};

// One micro-tile under a causal structure (NONE: the whole K block): rows [i, i + m) of C, columns from j, K block
// [k0, k0 + kc). Runs the micro-kernel over the part of the K block that can be non-zero, or nothing where the
// tile is not wanted.
template <class K>
inline void causal_tile(const Causal& cz, int i, int m, int j, int k0, int kc, const typename K::T* Ap,
                        const typename K::T* Bp, float* C, int ldc, int n, bool add, const float* bias) {
    int kb = 0, ke = padded_k<K::KSTEP>(kc);
    if (cz.kind == Causal::OUT_LOWER && j > i + m - 1 + cz.diag) return;
    if (cz.kind == Causal::A_LOWER) ke = std::clamp(padded_k<K::KSTEP>(i + m + cz.diag - k0), 0, ke);
    if (cz.kind == Causal::A_UPPER) kb = std::clamp((i - cz.diag - k0) / K::KSTEP * K::KSTEP, 0, ke);
    if (ke <= kb && add) return;  // nothing to add (a first K block still stores its zeros)
    K::run(std::max(0, std::min(kc, ke) - kb), Ap + (size_t)kb * MR, Bp + (size_t)kb * NR, C, ldc, m, n, add, bias);
}

// G[i0:i0+mc, j0:j0+nc] = gelu(C[...]): the epilogue of a finished C tile, still in cache.
inline void gelu_tile(const float* C, float* G, int ldc, int i0, int mc, int j0, int nc) {
    for (int i = i0; i < i0 + mc; i++) {
        const float* c = C + (size_t)i * ldc + j0;
        float* g = G + (size_t)i * ldc + j0;
        #pragma omp simd
        for (int j = 0; j < nc; j++) g[j] = gelu(c[j]);
    }
}

template <class K>
void gemm_impl(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int N, int K_,
               bool trans_a, bool trans_b, bool accumulate, bool parallel, const float* bias, float* gelu_out,
               Causal causal) {
    using T = typename K::T;
    if (M == 0 || N == 0) return;  // empty output: nothing to write (and C may be null)
    if (K_ == 0) {
        if (!accumulate)
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = bias ? bias[j] : 0.0f;
        if (gelu_out) gelu_tile(C, gelu_out, ldc, 0, M, 0, N);
        return;
    }
    // op(B) is packed for a chunk of K (KC-deep blocks of NR-wide panels); then each thread task (an MC x NCB
    // tile of C) runs over the chunk's K blocks. A large C (the LM head's logits) takes all of K in one chunk
    // where it fits, so its tiles are read and written once while they sit in L2, not once per K block from
    // memory. A small C stays cached anyway; there one K block at a time keeps the packed B in L2, which
    // measures faster (weight-gradient products, 2 threads).
    const int n_panels = (N + NR - 1) / NR, kblocks = (K_ + K::KC - 1) / K::KC;
    const int mblocks = (M + MC - 1) / MC;
    // C[i:i+m, j:j+n] (+)= the packed sliver times the packed panel over the K block at k0
    auto run_tile = [&](int i, int m, int j, int k0, int kc, const T* ap, const T* bp, int n, bool add) {
        causal_tile<K>(causal, i, m, j, k0, kc, ap, bp, C + (size_t)i * ldc + j, ldc, n, add,
                       bias ? bias + j : nullptr);
    };
    // C[:, j0:j0+nc] (+)= op(A)[:, K block kb] op(B)[K block kb, j0:j0+nc], on the calling thread, which
    // packs the B panels it uses itself
    auto column_block = [&](int j0, int nc, int kb) {
        const int k0 = kb * K::KC, kc = std::min(K::KC, K_ - k0), kpad = padded_k<K::KSTEP>(kc);
        thread_local Scratch own_b, own_a;
        T* Bp = own_b.get<T>((size_t)((nc + NR - 1) / NR) * K::KC * NR);
        T* Ap = own_a.get<T>((size_t)MC * K::KC);
        pack_B<K>(Bp, B, ldb, trans_b, k0, kc, j0, nc);
        for (int i0 = 0; i0 < M; i0 += MC) {
            const int mc = std::min(MC, M - i0);
            pack_A<K>(Ap, A, lda, trans_a, i0, mc, k0, kc);
            for (int js = 0; js < nc; js += NCS)
                for (int ir = 0; ir < mc; ir += MR)
                    for (int jr = js; jr < std::min(nc, js + NCS); jr += NR)
                        run_tile(i0 + ir, std::min(MR, mc - ir), j0 + jr, k0, kc, Ap + (size_t)(ir / MR) * kpad * MR,
                                 Bp + (size_t)(jr / NR) * kpad * NR, std::min(NR, nc - jr), accumulate || kb > 0);
            if (gelu_out && kb == kblocks - 1) gelu_tile(C, gelu_out, ldc, i0, mc, j0, nc);
        }
    };
    if (!parallel) {  // inside an outer parallel loop (attention's blocks): no OpenMP region at all
        for (int kb = 0; kb < kblocks; kb++) column_block(0, N, kb);
        return;
    }
    const int threads = omp_get_max_threads();
    if (threads > 1 && mblocks < 4 * threads && n_panels >= threads) {
        // Few row blocks (a weight gradient: M = input features, K = tokens): split the columns instead,
        // each thread packing only the B panels it uses, so no packed B moves between cores. A thread's
        // packed panels stay within its share of PACK_BUDGET (more, narrower column blocks for a huge N).
        const int max_panels = (int)std::max<size_t>(1, PACK_BUDGET / threads / ((size_t)K::KC * NR * sizeof(T)));
        const int cols = std::min((n_panels + threads - 1) / threads, max_panels) * NR;
        const int cblocks = (N + cols - 1) / cols;
        // a column block is one thread's for all of K: one parallel region, no barrier between K blocks
        #pragma omp parallel for schedule(static)
        for (int cb = 0; cb < cblocks; cb++)
            for (int kb = 0; kb < kblocks; kb++) column_block(cb * cols, std::min(cols, N - cb * cols), kb);
        return;
    }
    thread_local Scratch bscratch;
    // A large C: chunks of K blocks and of column panels sized so their packed B fits PACK_BUDGET (all of K
    // and all columns for the small model's LM head; column strips of a 50k vocabulary). A small C: one K
    // block at a time, all columns.
    const bool c_large = (size_t)M * N * sizeof(float) >= C_LARGE;
    const size_t panel_block = (size_t)K::KC * NR;  // elements of one packed panel of one K block
    const int chunk = c_large ? (int)std::clamp<size_t>(PACK_BUDGET / (panel_block * sizeof(T)), 1, kblocks) : 1;
    int strip = c_large ? (int)std::clamp<size_t>(PACK_BUDGET / (chunk * panel_block * sizeof(T)), 1, n_panels)
                        : n_panels;
    if (strip < n_panels && strip >= NCB / NR) strip -= strip % (NCB / NR);  // whole NCB-wide task columns
    const size_t kblock_stride = (size_t)strip * panel_block;
    T* Bp = bscratch.get<T>((size_t)chunk * kblock_stride);
    for (int kb0 = 0; kb0 < kblocks; kb0 += chunk)
        for (int p0 = 0; p0 < n_panels; p0 += strip) {
            const int kb1 = std::min(kblocks, kb0 + chunk), p1 = std::min(n_panels, p0 + strip);
            const int c0 = p0 * NR, c1 = std::min(N, p1 * NR), nblocks = (c1 - c0 + NCB - 1) / NCB;
            #pragma omp parallel
            {
                #pragma omp for schedule(static) collapse(2)
                for (int kb = kb0; kb < kb1; kb++)
                    for (int p = p0; p < p1; p++) {
                        const int k0 = kb * K::KC, kc = std::min(K::KC, K_ - k0), kpad = padded_k<K::KSTEP>(kc);
                        pack_B<K>(Bp + (kb - kb0) * kblock_stride + (size_t)(p - p0) * kpad * NR, B, ldb, trans_b, k0,
                                  kc, p * NR, std::min(NR, N - p * NR));
                    }
                thread_local Scratch ascratch;
                T* Ap = ascratch.get<T>((size_t)MC * K::KC);
                int packed_i0 = -1, packed_k0 = -1;  // the A block in Ap: a thread's consecutive tasks share it
                #pragma omp for schedule(static) collapse(2)
                for (int ib = 0; ib < mblocks; ib++)
                    for (int jb = 0; jb < nblocks; jb++) {
                        const int i0 = ib * MC, mc = std::min(MC, M - i0);
                        const int j0 = c0 + jb * NCB, nc = std::min(NCB, c1 - j0);
                        for (int kb = kb0; kb < kb1; kb++) {
                            const int k0 = kb * K::KC, kc = std::min(K::KC, K_ - k0), kpad = padded_k<K::KSTEP>(kc);
                            const bool add = accumulate || kb > 0;
                            if (i0 != packed_i0 || k0 != packed_k0) {
                                pack_A<K>(Ap, A, lda, trans_a, i0, mc, k0, kc);
                                packed_i0 = i0, packed_k0 = k0;
                            }
                            const T* Bk = Bp + (kb - kb0) * kblock_stride;
                            // the A block this thread most likely packs next: this row block's next K block,
                            // else the next row block's first
                            BlockPrefetch next_a;
                            const int next_kb = kb + 1 < kb1 ? kb + 1 : kb0, next_i0 = kb + 1 < kb1 ? i0 : i0 + MC;
                            if (next_i0 < M)
                                next_a.start(A, lda, trans_a, next_i0, std::min(MC, M - next_i0), next_kb * K::KC,
                                             std::min(K::KC, K_ - next_kb * K::KC));
                            const int calls = ((mc + MR - 1) / MR) * ((nc + NR - 1) / NR);
                            const int per_call = (next_a.total + calls - 1) / calls;
                            for (int js = 0; js < nc; js += NCS)
                                for (int ir = 0; ir < mc; ir += MR)
                                    for (int jr = js; jr < std::min(nc, js + NCS); jr += NR) {
                                        next_a.step(per_call);
                                        run_tile(i0 + ir, std::min(MR, mc - ir), j0 + jr, k0, kc,
                                                 Ap + (size_t)(ir / MR) * kpad * MR,
                                                 Bk + (size_t)((j0 - c0 + jr) / NR) * kpad * NR, std::min(NR, nc - jr),
                                                 add);
                                    }
                        }
                        if (gelu_out && kb1 == kblocks) gelu_tile(C, gelu_out, ldc, i0, mc, j0, nc);
                    }
            }
        }
}

}  // namespace

void gemm(float* C, int ldc, const float* A, int lda, const float* B, int ldb, int M, int N, int K, bool trans_a,
          bool trans_b, bool accumulate, bool parallel, bool bf16, const float* bias, float* gelu_out, Causal causal) {
    if (bf16)
        gemm_impl<KernelBF16>(C, ldc, A, lda, B, ldb, M, N, K, trans_a, trans_b, accumulate, parallel, bias, gelu_out,
                              causal);
    else
        gemm_impl<KernelF32>(C, ldc, A, lda, B, ldb, M, N, K, trans_a, trans_b, accumulate, parallel, bias, gelu_out,
                             causal);
}

void matmul(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a, bool trans_b,
            bool accumulate, bool bf16) {
    gemm(C, N, A, trans_a ? M : K, B, trans_b ? K : N, M, N, K, trans_a, trans_b, accumulate, true, bf16);
}

bool bf16_native() {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return true;
#else
    return false;
#endif
}

void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC, bool bf16,
                    float* gelu_out) {
    if (N == 1 && !bf16) return linear_forward_row(out, inp, w, bias, IC, OC, gelu_out);
    // the bias is added as each output tile is first stored, GELU as it is finished: no extra passes over out
    gemm(out, OC, inp, IC, w, OC, N, OC, IC, false, false, false, true, bf16, bias, gelu_out);
}

void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC, bool accumulate_dinp, bool bf16) {
    if (dinp) matmul(dinp, dout, w, N, IC, OC, false, true, accumulate_dinp, bf16);  // dout[N,OC] @ w^T
    if (dw) matmul(dw, inp, dout, IC, OC, N, true, false, true, bf16);              // inp^T @ dout
    if (dbias && N > 0 && OC > 0) {  // (no rows: dbias gets nothing; no columns: nothing to touch)
        // Rows in fixed chunks (whatever the thread count), each summed in order into its own partial row with
        // contiguous full-width reads; the partials then summed in chunk order: deterministic, and one
        // streaming pass over dout (summing 64-column strips down all rows was 3x slower).
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
}

// Columns in 64-wide strips across threads, each summed over the inputs in order in registers.
void linear_forward_row(float* out, const float* inp, const float* w, const float* bias, int IC, int OC,
                        float* gelu_out) {
    #pragma omp parallel for schedule(static)
    for (int j0 = 0; j0 < OC; j0 += 64) {
        const int j1 = std::min(OC, j0 + 64);
        float acc[64];
        for (int j = j0; j < j1; j++) acc[j - j0] = bias ? bias[j] : 0.0f;
        for (int i = 0; i < IC; i++) {
            const float xi = inp[i];
            const float* wr = w + (size_t)i * OC;
            #pragma omp simd
            for (int j = j0; j < j1; j++) acc[j - j0] += xi * wr[j];
        }
        std::memcpy(out + j0, acc, (j1 - j0) * sizeof(float));
        if (gelu_out) {
            #pragma omp simd
            for (int j = j0; j < j1; j++) gelu_out[j] = gelu(acc[j - j0]);
        }
    }
}

}  // namespace cllm
