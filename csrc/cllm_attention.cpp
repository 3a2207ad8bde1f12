// Causal grouped-query self-attention, scale 1/sqrt(head_dim), over qkv [B,T,(H+2KV)hs]: q = [:, :, 0:H*hs],
// k = [H*hs:(H+KV)hs], v = [(H+KV)hs:], head h in columns h*hs:(h+1)*hs of its part. Query head h reads K/V head
// h / (H/KV). With KV = H this is GPT-2's c_attn output, q | k | v of C columns each.
//
// Tiled in blocks of query rows (flash-attention style): for a block, the scores against all earlier keys
// live in a per-thread scratch of BQ x T floats, never a T x T matrix, and the forward keeps only each row's
// log-sum-exp, so activation memory is O(B*H*T). The backward recomputes the probabilities from it. All
// block products run on the GEMM micro-kernel (bf16 inputs when the model's precision is bf16, as the
// linear layers), told the causal structure so that micro-tiles above the diagonal are skipped. A thread task
// is a whole head (a K/V head's group in the backward): its K and V operands are packed once (pack_operand) and
// each query block reads the leading keys it needs, instead of packing them again per block (which cost as
// much as the products at T = 2048). Attention dropout regenerates its mask from the counter RNG.
#include <algorithm>
#include <cmath>

#include "cllm.h"

namespace cllm {

namespace {
constexpr int BQ = 64;  // query rows per block

inline size_t drop_index(int b, int h, int t, int j, int H, int T) {
    return (((size_t)b * H + h) * T + t) * T + j;
}

// What the forward and the backward share: the shape of the heads, the softmax scale, dropout's constants.
struct Heads {
    int T, H, KV, group, hs, ld;  // sequence length, query and K/V heads, H/KV, head size, row stride of qkv
    int nblk;                     // blocks of query rows
    float scale;
    uint32_t threshold;  // dropout's
    float keep_scale;
    Heads(int T, int C, int H, int KV, const Dropout& d)
        : T(T), H(H), KV(KV), group(H / KV), hs(C / H), ld((H + 2 * KV) * (C / H)), nblk((T + BQ - 1) / BQ),
          scale(1.0f / std::sqrt((float)hs)), threshold(dropout_threshold(d.p)),
          keep_scale(d.active() ? 1.0f / (1.0f - d.p) : 1.0f) {}
    // column offsets within a qkv row: query head h, and the K and V of K/V head g
    size_t q_col(int h) const { return (size_t)h * hs; }
    size_t k_col(int g) const { return (size_t)(H + g) * hs; }
    size_t v_col(int g) const { return (size_t)(H + KV + g) * hs; }
    // whether dropout keeps the probability of query i for key j in head h of sequence b
    bool keeps(const Dropout& d, uint64_t site, int b, int h, int i, int j) const {
        return dropout_keep(d.seed, site, drop_index(b, h, i, j, H, T), threshold);
    }
};

// The causal structure of a block of query rows [i0, i0 + BQ): query row r (global i0 + r) sees keys
// j <= i0 + r.
struct BlockCausal {
    Causal scores;  // S, dP [rows x keys]: scores right of the diagonal are not wanted (tiles there are skipped)
    Causal rows;    // P, dS as the left operand: query row r is zero past key i0 + r (sums over keys stop there)
    Causal keys;    // P^T, dS^T as the left operand: key row j is zero for queries before j (sums over queries
                    // start there)
    explicit BlockCausal(int i0)
        : scores{Causal::OUT_LOWER, i0}, rows{Causal::A_LOWER, i0}, keys{Causal::A_UPPER, i0} {}
};

// Per-thread scratch that grows once.
struct Rows {
    FloatBuffer a, b;
    size_t n = 0;
    void need(size_t m) {
        if (m > n) {
            a = alloc_floats(m);
            b = alloc_floats(m);
            n = m;
        }
    }
};
// This thread's two BQ x T blocks of scores (forward and backward alike).
Rows& block_scratch(int T) {
    thread_local Rows rows;
    rows.need((size_t)BQ * T);
    return rows;
}
// This thread's packed K/V operands of the head it works on: K^T, V (forward); K^T, V^T, K (backward).
struct HeadOperands {
    PackedOperand kt, v, vt, k;
};
HeadOperands& head_operands() {
    thread_local HeadOperands ops;
    return ops;
}
}  // namespace

// s[0:n] = softmax(s * scale) in place; returns the log-sum-exp of the scaled scores. One row arithmetic for the
// training forward and the cached decode, so that the two agree.
static inline float softmax_row(float* s, int n, float scale) {
    float mx = -INFINITY;
    #pragma omp simd reduction(max : mx)
    for (int j = 0; j < n; j++) mx = std::max(mx, s[j] * scale);
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        s[j] = fast_exp(s[j] * scale - mx);
        sum += s[j];
    }
    const float inv = 1.0f / sum;
    #pragma omp simd
    for (int j = 0; j < n; j++) s[j] *= inv;
    return mx + std::log(sum);
}

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int H, int KV, const Dropout& d,
                       uint64_t site, bool bf16) {
    const Heads hd(T, C, H, KV, d);
    #pragma omp parallel firstprivate(hd)  // a copy per thread: its fields stay in registers
    {
        float* S = block_scratch(T).a.get();
        HeadOperands& ops = head_operands();
        #pragma omp for schedule(dynamic, 1) collapse(2)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                const float* k = qkv + (size_t)b * T * hd.ld + hd.k_col(h / hd.group);
                const float* v = qkv + (size_t)b * T * hd.ld + hd.v_col(h / hd.group);
                pack_operand(ops.kt, {k, hd.ld, true}, hd.hs, T, bf16);  // K^T [hs, T]
                pack_operand(ops.v, {v, hd.ld}, T, hd.hs, bf16);         // V [T, hs]
                for (int blk = 0; blk < hd.nblk; blk++) {
                    const int i0 = blk * BQ, i1 = std::min(T, i0 + BQ), rows = i1 - i0;
                    const BlockCausal causal(i0);
                    const float* q = qkv + ((size_t)b * T + i0) * hd.ld + hd.q_col(h);
                    // S = Q K^T for keys j < i1, the causal part only
                    gemm({.c = S, .ldc = T, .a = {q, hd.ld}, .b = {k, hd.ld, true}, .m = rows, .n = i1, .k = hd.hs,
                          .parallel = false, .bf16 = bf16, .causal = causal.scores, .packed_b = &ops.kt});
                    for (int r = 0; r < rows; r++) {
                        const int i = i0 + r;
                        float* s = S + (size_t)r * T;
                        lse[((size_t)b * H + h) * T + i] = softmax_row(s, i + 1, hd.scale);
                        if (d.active())
                            for (int j = 0; j <= i; j++)
                                s[j] = hd.keeps(d, site, b, h, i, j) ? s[j] * hd.keep_scale : 0.0f;
                        for (int j = i + 1; j < i1; j++) s[j] = 0.0f;  // causal mask
                    }
                    // O = P V, P zero right of the diagonal
                    gemm({.c = out + ((size_t)b * T + i0) * C + h * hd.hs, .ldc = C, .a = {S, T}, .b = {v, hd.ld},
                          .m = rows, .n = hd.hs, .k = i1, .parallel = false, .bf16 = bf16, .causal = causal.rows,
                          .packed_b = &ops.v});
                }
            }
    }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int B, int T, int C, int H, int KV, const Dropout& d, uint64_t site, bool bf16) {
    const Heads hd(T, C, H, KV, d);
    // Each (b, K/V head) owns the q columns of its query heads and its k/v columns of dqkv: no races. Its query
    // heads run in order and each one's blocks last first, so dK and dV are summed in the same order whatever the
    // thread count.
    #pragma omp parallel firstprivate(hd)
    {
        Rows& scratch = block_scratch(T);
        float* P = scratch.a.get();   // probabilities after dropout
        float* dS = scratch.b.get();  // dP, then the score gradient
        HeadOperands& ops = head_operands();
        #pragma omp for schedule(dynamic, 1) collapse(2)
        for (int b = 0; b < B; b++)
            for (int g = 0; g < hd.KV; g++) {
                const float* seq = qkv + (size_t)b * T * hd.ld;
                float* dseq = dqkv + (size_t)b * T * hd.ld;
                const float* k = seq + hd.k_col(g);
                const float* v = seq + hd.v_col(g);
                pack_operand(ops.kt, {k, hd.ld, true}, hd.hs, T, bf16);  // K^T [hs, T]
                pack_operand(ops.vt, {v, hd.ld, true}, hd.hs, T, bf16);  // V^T [hs, T]
                pack_operand(ops.k, {k, hd.ld}, T, hd.hs, bf16);         // K [T, hs]
                float* dk = dseq + hd.k_col(g);
                float* dv = dseq + hd.v_col(g);
                for (int h = g * hd.group; h < (g + 1) * hd.group; h++)
                    // the group's first head's last query block reaches every key: it stores dK and dV, the
                    // other blocks and heads add
                    for (int blk = hd.nblk - 1; blk >= 0; blk--) {
                        const bool add = h > g * hd.group || blk < hd.nblk - 1;
                        const int i0 = blk * BQ, i1 = std::min(T, i0 + BQ), rows = i1 - i0;
                        const BlockCausal causal(i0);
                        const float* q = seq + (size_t)i0 * hd.ld + hd.q_col(h);
                        const float* go = dout + ((size_t)b * T + i0) * C + h * hd.hs;
                        const float* o = out + ((size_t)b * T + i0) * C + h * hd.hs;
                        // S = Q K^T (into P) and dP' = dO V^T (into dS), the causal part only
                        gemm({.c = P, .ldc = T, .a = {q, hd.ld}, .b = {k, hd.ld, true}, .m = rows, .n = i1,
                              .k = hd.hs, .parallel = false, .bf16 = bf16, .causal = causal.scores,
                              .packed_b = &ops.kt});
                        gemm({.c = dS, .ldc = T, .a = {go, C}, .b = {v, hd.ld, true}, .m = rows, .n = i1, .k = hd.hs,
                              .parallel = false, .bf16 = bf16, .causal = causal.scores, .packed_b = &ops.vt});
                        for (int r = 0; r < rows; r++) {
                            const int i = i0 + r;
                            float* p = P + (size_t)r * T;
                            float* ds = dS + (size_t)r * T;
                            const float l = lse[((size_t)b * H + h) * T + i];
                            float D = 0.0f;  // sum_j p_j dp_j = dO_i . O_i
                            #pragma omp simd reduction(+ : D)
                            for (int c = 0; c < hd.hs; c++) D += go[(size_t)r * C + c] * o[(size_t)r * C + c];
                            #pragma omp simd
                            for (int j = 0; j <= i; j++) p[j] = fast_exp(p[j] * hd.scale - l);
                            if (d.active()) {
                                for (int j = 0; j <= i; j++) {
                                    const float m = hd.keeps(d, site, b, h, i, j) ? hd.keep_scale : 0.0f;
                                    ds[j] = p[j] * (m * ds[j] - D) * hd.scale;
                                    p[j] *= m;
                                }
                            } else {
                                #pragma omp simd
                                for (int j = 0; j <= i; j++) ds[j] = p[j] * (ds[j] - D) * hd.scale;
                            }
                            for (int j = i + 1; j < i1; j++) p[j] = ds[j] = 0.0f;  // causal mask
                        }
                        // dV (+)= P^T dO
                        gemm({.c = dv, .ldc = hd.ld, .a = {P, T, true}, .b = {go, C}, .m = i1, .n = hd.hs, .k = rows,
                              .accumulate = add, .parallel = false, .bf16 = bf16, .causal = causal.keys});
                        // dQ = dS K for this block's query rows
                        gemm({.c = dseq + (size_t)i0 * hd.ld + hd.q_col(h), .ldc = hd.ld, .a = {dS, T},
                              .b = {k, hd.ld}, .m = rows, .n = hd.hs, .k = i1, .parallel = false, .bf16 = bf16,
                              .causal = causal.rows, .packed_b = &ops.k});
                        // dK (+)= dS^T Q
                        gemm({.c = dk, .ldc = hd.ld, .a = {dS, T, true}, .b = {q, hd.ld}, .m = i1, .n = hd.hs,
                              .k = rows, .accumulate = add, .parallel = false, .bf16 = bf16, .causal = causal.keys});
                    }
            }
    }
}

void attention_dropout_mask(float* out, int B, int T, int H, const Dropout& d, uint64_t site) {
    const uint32_t th = dropout_threshold(d.p);
    const float keep_scale = d.active() ? 1.0f / (1.0f - d.p) : 1.0f;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                for (int j = 0; j < T; j++) {
                    size_t i = drop_index(b, h, t, j, H, T);
                    float m = 0.0f;
                    if (j <= t) m = !d.active() ? 1.0f : (dropout_keep(d.seed, site, i, th) ? keep_scale : 0.0f);
                    out[i] = m;
                }
}


namespace {
inline float value(float x) { return x; }
inline float value(uint16_t x) { return from_bf16(x); }

// Decode: query q [H*hs] against rows 0..t of keys k and values v (row stride ld; K/V head g at column g*hs), the
// heads split across threads: scores by dot, softmax_row, then sum_j p_j v_j in order. T: float or bf16.
template <class T>
void decode_attend(float* out, const float* q, const T* k, const T* v, size_t ld, int t, const Heads& hd) {
    #pragma omp parallel for schedule(static)
    for (int h = 0; h < hd.H; h++) {
        thread_local std::vector<float> scores;  // grows with the context, amortised
        if (scores.size() < (size_t)t + 1) scores.resize((size_t)t + 1);
        float* s = scores.data();
        const size_t g = (size_t)(h / hd.group) * hd.hs;
        const float* qh = q + hd.q_col(h);
        for (int j = 0; j <= t; j++) s[j] = dot(qh, k + g + (size_t)j * ld, hd.hs);
        softmax_row(s, t + 1, hd.scale);
        float* o = out + h * hd.hs;
        std::fill(o, o + hd.hs, 0.0f);
        for (int j = 0; j <= t; j++) {
            const float p = s[j];
            const T* vj = v + g + (size_t)j * ld;
            #pragma omp simd
            for (int i = 0; i < hd.hs; i++) o[i] += p * value(vj[i]);
        }
    }
}
}  // namespace

void attention_decode(float* out, const float* qkv, int t, int C, int H, int KV) {
    const Heads hd(t + 1, C, H, KV, Dropout{});
    decode_attend(out, qkv + (size_t)t * hd.ld, qkv + hd.k_col(0), qkv + hd.v_col(0), hd.ld, t, hd);
}

void attention_decode_bf16(float* out, const float* q, const uint16_t* kv, int t, int C, int H, int KV) {
    const Heads hd(t + 1, C, H, KV, Dropout{});
    const size_t kv_cols = (size_t)KV * hd.hs;
    decode_attend(out, q, kv, kv + kv_cols, 2 * kv_cols, t, hd);
}

}  // namespace cllm
