// The GEMM everything else uses (its tiles and packing: gemm_tiles.h; the linear layers on it: cllm_linear.cpp).
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
#include <stdexcept>

#include <omp.h>

#include "gemm_tiles.h"

namespace cllm {

namespace {

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

}  // namespace cllm
