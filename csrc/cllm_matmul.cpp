// The GEMM everything else uses, and the linear layer (forward/backward) built on it.
//
// A packed, cache-blocked GEMM in the classic (Goto/BLIS) structure: op(B) is packed into KC x NR column
// panels, op(A) into MR x KC row slivers, and an MR x NR register-tile micro-kernel does the FMAs. Each A
// sliver (broadcast operand, 12 KB) stays in L1 while it runs across NCS columns of packed B (vector operand,
// in L2): the BLIS loop order, mirrored for row-major C. The micro-kernel uses GCC vector types sized to the
// widest unit the build targets (AVX-512: 16 floats, otherwise 8), so -march picks AVX-512 or AVX2 code at
// build time with one source.
// Three strategies, gemm_impl picks one:
//   gemm_serial        all on the calling thread (a caller inside its own parallel loop: attention's blocks)
//   gemm_column_split  the columns split between the threads, each packing its own B (few row blocks: weight
//                      gradients)
//   gemm_shared_b      MC x NCB tiles of C as thread tasks over a packed B that all threads share, packed in
//                      chunks sized for a large C
// Each C tile belongs to one thread and is summed over K in a fixed order: results do not depend on the
// thread count.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include <omp.h>
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

// Brings the next block of op(A) toward L2 a few cache lines at a time while the current block computes,
// so that packing it finds it there rather than in memory.
struct BlockPrefetch {
    const char* base = nullptr;
    size_t ld = 0;  // bytes between rows
    int lines = 0, total = 0, next = 0;
    // op(A)[i0:i0+mc, K block]
    void start(const Operand& a, int i0, int mc, const KBlock& blk) {
        const int rows = a.trans ? blk.kc : mc, width = a.trans ? mc : blk.kc;
        base = (const char*)(a.trans ? a.data + (size_t)blk.k0 * a.ld + i0 : a.data + (size_t)i0 * a.ld + blk.k0);
        ld = (size_t)a.ld * sizeof(float);
        lines = (width * (int)sizeof(float) + 63) / 64;
        total = rows * lines;
        next = 0;
    }
    void step(int n) {
        for (; n > 0 && next < total; n--, next++)
            __builtin_prefetch(base + (next / lines) * ld + (next % lines) * 64, 0, 2);
    }
};

// One micro-tile of C, rows [i, i + m) and columns [j, j + n), over a K block: (add false) stores or (add
// true) adds the packed sliver Ap times the packed panel Bp. Under a causal structure, runs the micro-kernel
// over the part of the K block that can be non-zero only, or nothing where the tile is not wanted.
// INLINE: the micro-kernel inlined (the serial path), else called.
template <class K, bool INLINE>
[[gnu::always_inline]] inline void causal_tile(const Gemm& g, const KBlock& blk, int i, int m, int j, int n,
                                               const typename K::T* Ap, const typename K::T* Bp, bool add) {
    const Causal& cz = g.causal;
    int kb = 0, ke = blk.kpad;
    if (cz.kind == Causal::OUT_LOWER && j > i + m - 1 + cz.diag) return;
    if (cz.kind == Causal::A_LOWER) ke = std::clamp(padded_k<K::KSTEP>(i + m + cz.diag - blk.k0), 0, ke);
    if (cz.kind == Causal::A_UPPER) kb = std::clamp((i - cz.diag - blk.k0) / K::KSTEP * K::KSTEP, 0, ke);
    if (ke <= kb && add) return;  // nothing to add (a first K block still stores its zeros)
    const int kc = std::max(0, std::min(blk.kc, ke) - kb);
    const typename K::T *ap = Ap + (size_t)kb * MR, *bp = Bp + (size_t)kb * NR;
    float* c = g.c + (size_t)i * g.ldc + j;
    const float* bias = g.bias ? g.bias + j : nullptr;
    if constexpr (INLINE)
        K::tile(kc, ap, bp, c, g.ldc, m, n, add, bias);
    else
        tile_outlined<K>(kc, ap, bp, c, g.ldc, m, n, add, bias);
}

// C[i0:i0+mc, j0:j0+nc] (+)= a packed block of A (Ap: its MR-high slivers) times packed B panels (Bp: the
// panel of column j0 first, the next ones bstride elements apart) over a K block, in the BLIS order: each A sliver
// (in L1) runs across an NCS-wide slab of B panels (in L2). before_tile() runs before each micro-tile.
template <class K, bool INLINE, class Hook>
[[gnu::always_inline]] inline void block_product(const Gemm& g, const KBlock& blk, int i0, int mc, int j0, int nc,
                                                 const typename K::T* Ap, const typename K::T* Bp, size_t bstride,
                                                 bool add, Hook&& before_tile) {
    for (int js = 0; js < nc; js += NCS)
        for (int ir = 0; ir < mc; ir += MR)
            for (int jr = js; jr < std::min(nc, js + NCS); jr += NR) {
                before_tile();
                causal_tile<K, INLINE>(g, blk, i0 + ir, std::min(MR, mc - ir), j0 + jr, std::min(NR, nc - jr),
                                       Ap + (size_t)(ir / MR) * blk.kpad * MR, Bp + (size_t)(jr / NR) * bstride, add);
            }
}

// gelu_out[i0:i0+mc, j0:j0+nc] = gelu(C[...]): the epilogue of a finished C tile, still in cache.
inline void gelu_tile(const Gemm& g, int i0, int mc, int j0, int nc) {
    for (int i = i0; i < i0 + mc; i++) {
        const float* c = g.c + (size_t)i * g.ldc + j0;
        float* out = g.gelu_out + (size_t)i * g.ldc + j0;
        #pragma omp simd
        for (int j = 0; j < nc; j++) out[j] = gelu(c[j]);
    }
}

// K = 0, an empty sum: C = bias (or 0), or C as it is when accumulating.
void empty_sum(const Gemm& g) {
    if (!g.accumulate)
        for (int i = 0; i < g.m; i++)
            for (int j = 0; j < g.n; j++) g.c[(size_t)i * g.ldc + j] = g.bias ? g.bias[j] : 0.0f;
    if (g.gelu_out) gelu_tile(g, 0, g.m, 0, g.n);
}

// ---- the strategies -------------------------------------------------------------------------------------

// The buffers of a thread that packs the A blocks and B panels it uses itself (column_block, in both its uses).
struct OwnPacking {
    Scratch a, b;
};
template <class K>
OwnPacking& own_packing() {
    thread_local OwnPacking p;
    return p;
}

// A PackedOperand's layout: K block after K block (KC deep but the last), each its column panels, kpad x NR
// elements each. A GEMM over a leading part [0:k', 0:n'] reads its K blocks' leading panels and, in each panel,
// the leading k' rows.
template <class K>
size_t operand_block_offset(const PackedOperand& p, int kb) { return (size_t)kb * col_panels(p.n) * K::KC * NR; }
template <class K>
size_t operand_panel_stride(const PackedOperand& p, int kb) { return (size_t)k_block<K>(kb, p.k).kpad * NR; }

// C[:, j0:j0+nc] (+)= op(A)[:, K block kb] op(B)[K block kb, j0:j0+nc], on the calling thread, which packs
// the B panels it uses itself, or reads them from g.packed_b. INLINE: see causal_tile.
template <class K, bool INLINE>
void column_block(const Gemm& g, int j0, int nc, int kb) {
    using T = typename K::T;
    const KBlock blk = k_block<K>(kb, g.k);
    OwnPacking& own = own_packing<K>();
    T* Ap = own.a.get<T>((size_t)MC * K::KC);
    const T* Bp;
    size_t bstride = (size_t)blk.kpad * NR;
    if (g.packed_b) {
        bstride = operand_panel_stride<K>(*g.packed_b, kb);
        Bp = (const T*)g.packed_b->buf.get() + operand_block_offset<K>(*g.packed_b, kb) + (size_t)(j0 / NR) * bstride;
    } else {
        T* own_b = own.b.get<T>((size_t)col_panels(nc) * K::KC * NR);
        pack_B<K>(own_b, g.b, j0, nc, blk);
        Bp = own_b;
    }
    for (int i0 = 0; i0 < g.m; i0 += MC) {
        const int mc = std::min(MC, g.m - i0);
        pack_A<K>(Ap, g.a, i0, mc, blk);
        block_product<K, INLINE>(g, blk, i0, mc, j0, nc, Ap, Bp, bstride, g.accumulate || kb > 0, [] {});
        if (g.gelu_out && kb == k_blocks<K>(g.k) - 1) gelu_tile(g, i0, mc, j0, nc);
    }
}

template <class K>
void pack_operand_impl(PackedOperand& p, const Operand& b, int k, int n) {
    using T = typename K::T;
    const int kblocks = k_blocks<K>(k);
    p.k = k, p.n = n;
    const size_t elems = kblocks == 0 ? 0 : operand_block_offset<K>(p, kblocks - 1) +
                                                (size_t)col_panels(n) * operand_panel_stride<K>(p, kblocks - 1);
    const size_t floats = (elems * sizeof(T) + sizeof(float) - 1) / sizeof(float);
    if (floats > p.capacity) {
        p.buf = alloc_floats(floats);
        p.capacity = floats;
    }
    for (int kb = 0; kb < kblocks; kb++)
        pack_B<K>((T*)p.buf.get() + operand_block_offset<K>(p, kb), b, 0, n, k_block<K>(kb, k));
}

// All of C on the calling thread, one K block at a time, the micro-kernel inlined.
template <class K>
void gemm_serial(const Gemm& g) {
    for (int kb = 0; kb < k_blocks<K>(g.k); kb++) column_block<K, true>(g, 0, g.n, kb);
}

// The columns split between the threads, each packing only the B panels it uses, so no packed B moves
// between cores. A thread's packed panels stay within its share of PACK_BUDGET (more, narrower column blocks
// for a huge N). A column block is one thread's for all of K: one parallel region, no barrier between K blocks.
template <class K>
void gemm_column_split(const Gemm& g, int threads) {
    const size_t panel_bytes = (size_t)K::KC * NR * sizeof(typename K::T);
    const int max_panels = (int)std::max<size_t>(1, PACK_BUDGET / threads / panel_bytes);
    const int cols = std::min((col_panels(g.n) + threads - 1) / threads, max_panels) * NR;
    const int cblocks = (g.n + cols - 1) / cols, kblocks = k_blocks<K>(g.k);
    #pragma omp parallel for schedule(static)
    for (int cb = 0; cb < cblocks; cb++)
        for (int kb = 0; kb < kblocks; kb++)
            column_block<K, false>(g, cb * cols, std::min(cols, g.n - cb * cols), kb);
}

// A chunk of packed op(B) shared by all threads: K blocks [kb0, kb1) of columns [c0, c1), K block after K
// block, `stride` elements apart.
template <class K>
struct PackedB {
    typename K::T* data;
    size_t stride;
    int kb0, kb1, c0, c1;
    // the packed panel of column j (a multiple of NR) in K block kb
    typename K::T* panel(int kb, int j, int kpad) const {
        return data + (kb - kb0) * stride + (size_t)((j - c0) / NR) * kpad * NR;
    }
};

// A thread's packed blocks of op(A), one per K block of the chunk when they fit in A_BUDGET (else one): its
// consecutive tasks, the same row block's next columns, share them instead of packing them again.
constexpr size_t A_BUDGET = 2u << 20;  // bytes
template <class K>
struct PackedA {
    typename K::T* data;
    int slots;
    static constexpr int MAX_SLOTS = A_BUDGET / (MC * K::KC * sizeof(typename K::T));
    int packed_i0[MAX_SLOTS], packed_kb[MAX_SLOTS];  // per slot: the block in it (-1: none)
    PackedA(typename K::T* data, int slots) : data(data), slots(slots) { std::fill_n(packed_i0, slots, -1); }
    static int slots_for(int kblocks) { return std::clamp(kblocks, 1, MAX_SLOTS); }
    bool holds(int i0, int kb) const { return packed_i0[kb % slots] == i0 && packed_kb[kb % slots] == kb; }
    // op(A)[i0:i0+mc, K block kb], packed unless it already is
    const typename K::T* get(const Operand& a, int i0, int mc, int kb, const KBlock& blk) {
        const int slot = kb % slots;
        typename K::T* d = data + (size_t)slot * MC * K::KC;
        if (!holds(i0, kb)) {
            pack_A<K>(d, a, i0, mc, blk);
            packed_i0[slot] = i0, packed_kb[slot] = kb;
        }
        return d;
    }
};

// One thread task: C[i0:i0+mc, j0:j0+nc] over the K blocks of the packed B chunk. While a K block computes,
// the A block this thread most likely packs next (this row block's next K block, else the next row block's
// first) is prefetched, unless the thread already holds it packed.
template <class K>
void tile_task(const Gemm& g, const PackedB<K>& B, PackedA<K>& A, int i0, int mc, int j0, int nc) {
    for (int kb = B.kb0; kb < B.kb1; kb++) {
        const KBlock blk = k_block<K>(kb, g.k);
        const typename K::T* Ap = A.get(g.a, i0, mc, kb, blk);
        BlockPrefetch next_a;
        const int next_kb = kb + 1 < B.kb1 ? kb + 1 : B.kb0, next_i0 = kb + 1 < B.kb1 ? i0 : i0 + MC;
        if (next_i0 < g.m && !A.holds(next_i0, next_kb))
            next_a.start(g.a, next_i0, std::min(MC, g.m - next_i0), k_block<K>(next_kb, g.k));
        const int calls = ((mc + MR - 1) / MR) * col_panels(nc);
        const int per_call = (next_a.total + calls - 1) / calls;
        block_product<K, false>(g, blk, i0, mc, j0, nc, Ap, B.panel(kb, j0, blk.kpad), (size_t)blk.kpad * NR,
                                g.accumulate || kb > 0,
                                [&] { next_a.step(per_call); });
    }
    if (g.gelu_out && B.kb1 == k_blocks<K>(g.k)) gelu_tile(g, i0, mc, j0, nc);
}

// op(B) packed once per chunk of K blocks and column panels, shared by all threads; the thread tasks are
// MC x NCB tiles of C, each run over the chunk's K blocks. A large C (the LM head's logits) takes all of K in
// one chunk where it fits (column strips of a 50k vocabulary), so its tiles are read and written once while
// they sit in L2, not once per K block from memory. A small C stays cached anyway: there one K block at a time,
// all columns, keeps the packed B in L2.
template <class K>
void gemm_shared_b(const Gemm& g) {
    using T = typename K::T;
    const int n_panels = col_panels(g.n), kblocks = k_blocks<K>(g.k), mblocks = row_blocks(g.m);
    const bool c_large = (size_t)g.m * g.n * sizeof(float) >= C_LARGE;
    const size_t panel_block = (size_t)K::KC * NR;  // elements of one packed panel of one K block
    const int chunk = c_large ? (int)std::clamp<size_t>(PACK_BUDGET / (panel_block * sizeof(T)), 1, kblocks) : 1;
    int strip = c_large ? (int)std::clamp<size_t>(PACK_BUDGET / (chunk * panel_block * sizeof(T)), 1, n_panels)
                        : n_panels;
    if (strip < n_panels && strip >= NCB / NR) strip -= strip % (NCB / NR);  // whole NCB-wide task columns
    thread_local Scratch bscratch;
    const size_t stride = (size_t)strip * panel_block;
    T* Bp = bscratch.get<T>((size_t)chunk * stride);
    for (int kb0 = 0; kb0 < kblocks; kb0 += chunk)
        for (int p0 = 0; p0 < n_panels; p0 += strip) {
            const int p1 = std::min(n_panels, p0 + strip);
            const PackedB<K> B{Bp, stride, kb0, std::min(kblocks, kb0 + chunk), p0 * NR, std::min(g.n, p1 * NR)};
            const int nblocks = (B.c1 - B.c0 + NCB - 1) / NCB;
            #pragma omp parallel
            {
                #pragma omp for schedule(static) collapse(2)
                for (int kb = B.kb0; kb < B.kb1; kb++)
                    for (int p = p0; p < p1; p++) {
                        const KBlock blk = k_block<K>(kb, g.k);
                        pack_B<K>(B.panel(kb, p * NR, blk.kpad), g.b, p * NR, std::min(NR, g.n - p * NR), blk);
                    }
                thread_local Scratch ascratch;
                const int slots = PackedA<K>::slots_for(B.kb1 - B.kb0);
                PackedA<K> A(ascratch.get<T>((size_t)slots * MC * K::KC), slots);
                #pragma omp for schedule(static) collapse(2)
                for (int ib = 0; ib < mblocks; ib++)
                    for (int jb = 0; jb < nblocks; jb++) {
                        const int i0 = ib * MC, j0 = B.c0 + jb * NCB;
                        tile_task<K>(g, B, A, i0, std::min(MC, g.m - i0), j0, std::min(NCB, B.c1 - j0));
                    }
            }
        }
}

template <class K>
void gemm_impl(const Gemm& g) {
    if (g.m == 0 || g.n == 0) return;  // empty output: nothing to write (and C may be null)
    if (g.k == 0) return empty_sum(g);
    // inside an outer parallel loop (attention's blocks): no OpenMP region at all
    if (!g.parallel) return gemm_serial<K>(g);
    // few row blocks for the threads but enough columns (a weight gradient: M = input features, K = tokens)
    const int threads = omp_get_max_threads();
    if (threads > 1 && row_blocks(g.m) < 4 * threads && col_panels(g.n) >= threads)
        return gemm_column_split<K>(g, threads);
    gemm_shared_b<K>(g);
}

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

void pack_operand(PackedOperand& p, const Operand& b, int k, int n, bool bf16) {
    p.bf16 = bf16;
    if (bf16)
        pack_operand_impl<KernelBF16>(p, b, k, n);
    else
        pack_operand_impl<KernelF32>(p, b, k, n);
}

void gemm(const Gemm& g) {
    if (g.packed_b && g.parallel) throw std::invalid_argument("gemm: packed_b is for serial GEMMs (parallel = false)");
    if (g.packed_b && (g.packed_b->bf16 != g.bf16 || g.k > g.packed_b->k || g.n > g.packed_b->n))
        throw std::invalid_argument("gemm: packed_b does not hold op(b) [k, n] in this precision");
    if (g.bf16)
        gemm_impl<KernelBF16>(g);
    else
        gemm_impl<KernelF32>(g);
}

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
