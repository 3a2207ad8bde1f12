// The GEMM's building blocks, shared by the GEMM (cllm_gemm.cpp) and the few-rows products (cllm_linear.cpp):
// the register-tile micro-kernels (fp32 FMAs, or bf16 pairs on AVX-512 BF16), the packing of op(A) and op(B)
// into their slivers and panels, the blocking constants and a reusable scratch buffer. Internal to the kernel
// variants: everything has internal linkage.
#pragma once
#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cllm.h"

namespace cllm {
namespace {


typedef float vf_u __attribute__((vector_size(VL * sizeof(float)), aligned(4)));  // unaligned access

constexpr int MR = 8;        // rows of C per micro-tile (2 x 8 accumulator vectors)
constexpr int NR = 2 * VL;   // columns of C per micro-tile (two vectors)
constexpr int MC = 128;       // rows of C per thread task (multiple of MR): its A block stays in L2
constexpr int NCB = 1024;    // columns of C per thread task (multiple of NR)
constexpr int NCS = 256;     // of which the KC x NCS packed B block stays in L2 while each A sliver (L1) runs across it
constexpr size_t PACK_BUDGET = 16u << 20;  // bytes of packed op(B) at a time: fits the L3 cache
constexpr size_t C_LARGE = 4u << 20;       // a C this big no longer stays in the L2 caches between K blocks
constexpr int ROWS_MAX = 16;  // products of up to this many rows (decode steps) read the weight in place

// Adds the finished MR x NR register tile to C, or (add false: C's first K block) stores it plus the bias
// row when there is one; writes only rows < m and columns < n. The loops over the tile's rows are unrolled so
// that every accumulator is a register by name: indexed at run time, GCC would zero the tile in memory before
// the K loop and spill it there after.
inline void store_tile(const vf* c0, const vf* c1, float* C, int ldc, int m, int n, bool add, const float* bias) {
    if (m == MR && n == NR) {
        vf b0 = {}, b1 = {};
        if (!add && bias) {
            b0 = *(const vf_u*)bias;
            b1 = *(const vf_u*)(bias + VL);
        }
        #pragma GCC unroll 8
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
        return;
    }
    alignas(64) float t[MR][NR];
    #pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        *(vf*)&t[r][0] = c0[r];
        *(vf*)&t[r][VL] = c1[r];
    }
    for (int r = 0; r < m; r++) {
        float* cr = C + (size_t)r * ldc;
        for (int j = 0; j < n; j++) cr[j] = (add ? cr[j] : bias ? bias[j] : 0.0f) + t[r][j];
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

// The micro-kernels: tile() sums one MR x NR tile of C over kc packed k values and stores or adds it.
// It is always inlined; tile_outlined() below is its out-of-line copy.

// fp32: C[0:MR, 0:NR] += Ap[k][0:MR] * Bp[k][0:NR], k < kc.
struct KernelF32 {
    using T = float;
    static constexpr int KSTEP = 1;  // k values per packed step
    static constexpr int KC = 384;   // depth of a packed block
    [[gnu::always_inline]] static inline void tile(int kc, const float* __restrict Ap, const float* __restrict Bp,
                                                   float* C, int ldc, int m, int n, bool add, const float* bias) {
        vf c0[MR], c1[MR];
        #pragma GCC unroll 8
        for (int r = 0; r < MR; r++) c0[r] = c1[r] = (vf){};
        prefetch_tile(C, ldc, m);
        for (int k = 0; k < kc; k++) {
            const vf b0 = *(const vf*)(Bp + k * NR);
            const vf b1 = *(const vf*)(Bp + k * NR + VL);
            const float* a = Ap + k * MR;
            #pragma GCC unroll 8
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
// to_bf16 (cllm.h) is branch-free, so the packing loops vectorise.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
struct KernelBF16 {
    using T = uint16_t;
    static constexpr int KSTEP = 2;
    static constexpr int KC = 768;  // same bytes per packed panel as fp32's 384
    [[gnu::always_inline]] static inline void tile(int kc, const uint16_t* __restrict Ap,
                                                   const uint16_t* __restrict Bp, float* C, int ldc, int m, int n,
                                                   bool add, const float* bias) {
        __m512 c0[MR], c1[MR];
        #pragma GCC unroll 8
        for (int r = 0; r < MR; r++) c0[r] = c1[r] = _mm512_setzero_ps();
        prefetch_tile(C, ldc, m);
        const int kp = (kc + 1) / 2;
        const uint32_t* a32 = (const uint32_t*)Ap;
        for (int k = 0; k < kp; k++) {
            const __m512bh b0 = (__m512bh)_mm512_load_si512(Bp + (size_t)k * 2 * NR);
            const __m512bh b1 = (__m512bh)_mm512_load_si512(Bp + (size_t)k * 2 * NR + 2 * VL);
            #pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)a32[k * MR + r]);
                c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
            }
        }
        vf v0[MR], v1[MR];
        #pragma GCC unroll 8
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

// The micro-kernel as a call: what the threaded paths run per micro-tile. The serial path inlines K::tile
// instead: its blocks (attention's) can be as short in K as one head, and there the call would show.
template <class K>
[[gnu::noinline]] void tile_outlined(int kc, const typename K::T* __restrict Ap, const typename K::T* __restrict Bp,
                                     float* C, int ldc, int m, int n, bool add, const float* bias) {
    K::tile(kc, Ap, Bp, C, ldc, m, n, add, bias);
}

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

// One KC-deep block of the summed index: [k0, k0 + kc); kpad is kc padded to whole k steps (the packed depth).
struct KBlock {
    int k0, kc, kpad;
};
template <class K>
int k_blocks(int depth) { return (depth + K::KC - 1) / K::KC; }
template <class K>
KBlock k_block(int kb, int depth) {
    const int k0 = kb * K::KC, kc = std::min(K::KC, depth - k0);
    return {k0, kc, padded_k<K::KSTEP>(kc)};
}

inline int row_blocks(int m) { return (m + MC - 1) / MC; }
inline int col_panels(int n) { return (n + NR - 1) / NR; }

// Pack the block of an operand at (i0, k0), w x kc of its (non-summed index i, summed index k), into W-wide
// strips along i. The operand is k-major (element (i, k) at X[k * ld + i]) or i-major (at X[i * ld + k]).
template <class K, int W>
void pack_strips(typename K::T* dst, const float* X, int ld, bool kmajor, int i0, int w, const KBlock& blk) {
    for (int s = 0; s < (w + W - 1) / W; s++) {
        const int ib = i0 + s * W, sw = std::min(W, i0 + w - ib);
        typename K::T* d = dst + (size_t)s * blk.kpad * W;
        if (kmajor)
            pack_block<K, true>(d, X + (size_t)blk.k0 * ld + ib, ld, blk.kc, sw, W);
        else
            pack_block<K, false>(d, X + (size_t)ib * ld + blk.k0, ld, blk.kc, sw, W);
    }
}
// op(A)[i0:i0+mc, K block] into MR-high slivers (a transposed A is k-major).
template <class K>
void pack_A(typename K::T* Ap, const Operand& a, int i0, int mc, const KBlock& blk) {
    pack_strips<K, MR>(Ap, a.data, a.ld, a.trans, i0, mc, blk);
}
// op(B)[K block, j0:j0+nc] into NR-wide panels (an untransposed B is k-major).
template <class K>
void pack_B(typename K::T* Bp, const Operand& b, int j0, int nc, const KBlock& blk) {
    pack_strips<K, NR>(Bp, b.data, b.ld, !b.trans, j0, nc, blk);
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

}  // namespace
}  // namespace cllm
