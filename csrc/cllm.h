// CLLM core: configuration, parameter/activation layouts and the kernel declarations.
// Every part has its forward and backward side by side in its own file (see docs/design.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace cllm {

// GPT2: LayerNorm, learned or sinusoidal positions, GELU MLP, biases, tied head, weights [in, out] (Conv1D).
// LLAMA: RMSNorm, rotary positions (RoPE), SwiGLU MLP, grouped-query attention, no biases, tied or untied head,
// weights [out, in] (nn.Linear).
enum class Arch { GPT2, LLAMA };
// AUTO: the architecture's own, learned for GPT2 and rotary for LLAMA (resolve_config makes it explicit).
enum class Pos { AUTO, LEARNED, SINUSOIDAL, ROPE };

// The model config's fields, written once: Config's members and defaults below, `_core.Config` and the field
// list `_core.config_fields()` (bindings.cpp), from which Python's ModelConfig is made (python/cllm/core/config.py).
// X(type, name, default, help); the order is ModelConfig's; float defaults as double literals (Python's values). The rules are validate_config's alone.
#define CLLM_CONFIG_FIELDS(X)                                                                                      \
    X(int, vocab_size, 256, "tokens in the vocabulary V")                                                          \
    X(int, max_seq_len, 128, "positions T a sequence may have")                                                    \
    X(int, embedding_dim, 128, "channels C")                                                                       \
    X(int, num_layers, 4, "transformer blocks L")                                                                  \
    X(int, num_heads, 4, "attention heads H (C divisible by H)")                                                   \
    X(int, ff_dim, 512, "the MLP's hidden size F (SwiGLU's for llama)")                                            \
    X(float, dropout, 0.0, "dropout probability in [0, 1)")                                                       \
    X(Pos, pos_encoding, Pos::AUTO, "positions: learned or sinusoidal (gpt2), rope (llama); auto: the "            \
                                    "architecture's own")                                                          \
    X(Arch, architecture, Arch::GPT2, "the blocks: gpt2 or llama")                                                 \
    X(int, num_kv_heads, 0, "llama: K/V heads of grouped-query attention, dividing num_heads (0: num_heads)")      \
    X(float, rope_theta, 10000.0, "llama: the rotary embedding's base")                                           \
    X(float, rms_norm_eps, 1e-5, "llama: RMSNorm's epsilon, in (0, 1)")                                           \
    X(bool, tie_embeddings, true, "the LM head is the token embedding (llama may untie it: lm_head.weight)")

struct Config {
#define CLLM_CONFIG_MEMBER(type, name, value, help) type name = value;
    CLLM_CONFIG_FIELDS(CLLM_CONFIG_MEMBER)
#undef CLLM_CONFIG_MEMBER
    bool bf16 = false;  // a run setting, not the model's: matmul inputs in bfloat16, fp32 accumulation

    bool llama() const { return architecture == Arch::LLAMA; }
    bool learned_pos() const { return pos_encoding == Pos::LEARNED || (pos_encoding == Pos::AUTO && !llama()); }
    int kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
    int head_dim() const { return embedding_dim / num_heads; }
    // qkv row: q [H*hs] | k [KV*hs] | v [KV*hs] (3C for GPT2)
    int qkv_width() const { return (num_heads + 2 * kv_heads()) * head_dim(); }
    // the MLP's kept pre-activations per token: GELU's input [F], or SwiGLU's gate | up [2F]
    int mlp_width() const { return llama() ? 2 * ff_dim : ff_dim; }
};

// ---- layout (cllm_layout.cpp): config validation, parameter layout, activation arena ------------
// Throws std::invalid_argument naming the offending field.
void validate_config(const Config& c);
// The config with its AUTO choices made (pos_encoding, num_kv_heads 0), validated.
Config resolve_config(Config c);

// 64-byte aligned float buffer (AVX-512 loads), zero-initialised (cllm_model.cpp). huge_pages: from 2 MiB on, on
// 2 MiB boundaries and marked for transparent huge pages (buffers walked by rows far apart); false for buffers read
// front to back and made anew at each call, whose huge pages would cost more to fault in than they save.
struct AlignedFree { void operator()(float* p) const; };
using FloatBuffer = std::unique_ptr<float[], AlignedFree>;
FloatBuffer alloc_floats(size_t n, bool huge_pages = true);

// One parameter tensor inside the flat buffer.
struct TensorInfo {
    std::string name;
    std::vector<int64_t> shape;
    size_t offset;  // in floats, 16-float aligned
    size_t size;
    bool decay;     // 2-D weights get weight decay; biases and LayerNorm parameters do not
};

// Pointers to one layer's tensors; built over the parameter buffer or the gradient buffer alike. A tensor the
// architecture does not have stays null. GPT2 uses ln*, qkv_*, attproj_*, fc_*, fcproj_* ([in, out] weights);
// LLAMA uses ln1_w, ln2_w (RMSNorm) and q_w, k_w, v_w, o_w, gate_w, up_w, down_w ([out, in], no biases).
struct LayerTensors {
    float *ln1_w = nullptr, *ln1_b = nullptr, *qkv_w = nullptr, *qkv_b = nullptr, *attproj_w = nullptr,
          *attproj_b = nullptr;
    float *ln2_w = nullptr, *ln2_b = nullptr, *fc_w = nullptr, *fc_b = nullptr, *fcproj_w = nullptr,
          *fcproj_b = nullptr;
    float *q_w = nullptr, *k_w = nullptr, *v_w = nullptr, *o_w = nullptr;
    float *gate_w = nullptr, *up_w = nullptr, *down_w = nullptr;
};
struct ModelTensors {
    float* wte = nullptr;
    float* wpe = nullptr;  // GPT2 with learned positions only
    std::vector<LayerTensors> layers;
    float *lnf_w = nullptr, *lnf_b = nullptr;  // lnf_b: GPT2 only
    float* lm_head = nullptr;                  // an untied head only
    const float* head() const { return lm_head ? lm_head : wte; }  // logits = lnf head^T
    float* head() { return lm_head ? lm_head : wte; }
};

struct ParamLayout {
    std::vector<TensorInfo> tensors;
    size_t total = 0;       // floats in the flat buffer, each tensor padded to 16
    size_t parameters = 0;  // the tensors' own floats (no padding)
    explicit ParamLayout(const Config& c);
    ModelTensors bind(float* base) const;

  private:
    // where bind() puts each tensor: a field of ModelTensors, or of LayerTensors in layer `layer`
    struct Slot {
        float* ModelTensors::*top = nullptr;
        int layer = -1;
        float* LayerTensors::*field = nullptr;
    };
    std::vector<Slot> slots;  // one per tensor
    int num_layers = 0;
};

// Activations of one training step for a (B, T): one arena, sized once. LayerNorm outputs and GELU outputs
// are not kept per layer: they are cheap to recompute from the kept inputs and statistics, so the forward
// writes them to one shared buffer each and the backward recomputes them (saves 2C + F floats per token
// per layer).
struct LayerActs {
    float *ln1_mean, *ln1_rstd, *qkv, *atty, *att_lse, *res2;  // qkv [N, qkv_width] (q, k after RoPE); means: GPT2
    float *ln2_mean, *ln2_rstd, *fch, *res3;                   // fch [N, mlp_width]
};
struct Activations {
    int B = 0, T = 0;
    FloatBuffer arena;
    size_t arena_floats = 0;
    float* encoded;  // x0 [B,T,C]
    std::vector<LayerActs> layers;
    float *ln_out, *act_out;  // shared by all layers (see above); act_out: the MLP's activation [N, F]
    float *lnf, *lnf_mean, *lnf_rstd;
    float* logits;  // [B,T,V]; holds dlogits after a forward_backward
    float* losses;  // [B,T]
    // backward scratch, reused by every layer
    float *dres, *dln, *dqkv, *datty, *dfch;
    void allocate(const Config& c, int B, int T);
};
// Floats of the arena for a (B, T) step (what allocate reserves), without allocating.
size_t activation_floats(const Config& c, int B, int T);

// ---- the variant's vector width (docs/design.md §10): what the GEMM and the bf16 decode tiles are built from --
#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector
#else
constexpr int VL = 8;   // AVX2's width; two SSE registers on the baseline
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float)), aligned(VL * sizeof(float))));

// ---- vectorisable helpers ------------------------------------------------------------------------
// Plain arithmetic (no libm call), so `omp simd` loops over them become AVX-512/AVX2 code.
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, scale by 2^n.
// Relative error about 2e-7 over the float range; exp(x) = 0 below -87.3 (covers -inf).
#pragma omp declare simd
inline float fast_exp(float x) {
    // selects, not branches or fmin/fmax calls, so that GCC vectorises loops over it
    const float lo = -87.3365447504f, hi = 88.3762626647949f;
    const float xc = x > lo ? (x < hi ? x : hi) : lo;  // NaN -> lo: no NaN reaches the int conversion
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    const float scale = __builtin_bit_cast(float, bits);
    return x != x ? x : (x < lo ? 0.0f : p * scale);  // NaN in, NaN out
}
// a . b over n floats (decode attention's scores)
inline float dot(const float* a, const float* b, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
// bfloat16: the top half of a float, rounded to nearest even (NaN stays NaN). Branch-free, so loops vectorise.
inline uint32_t to_bf16(float x) {
    const uint32_t u = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}
inline float from_bf16(uint32_t h) { return __builtin_bit_cast(float, h << 16); }
// a . b with b in bf16 (decode against a bf16 KV cache), summed in fp32
inline float dot(const float* a, const uint16_t* b, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * from_bf16(b[i]);
    return s;
}
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as
// x * sigmoid(2u) = x / (1 + exp(-2u)), the same function with one exp and one division.
#pragma omp declare simd
inline float gelu_sigmoid(float x) {  // sigmoid(2u); exactly 0 where exp(-2u) overflows (fast_exp clamps there)
    const float t = -2.0f * kGeluScale * (x + 0.044715f * x * x * x);
    return t > 88.0f ? 0.0f : 1.0f / (1.0f + fast_exp(t));
}
#pragma omp declare simd
inline float gelu(float x) { return x * gelu_sigmoid(x); }

// ---- counter-based RNG and dropout (cllm_dropout.cpp) ----------------------------------------------
// A mask is a pure function of (seed, site, index), so the backward regenerates it instead of storing it, and
// results do not depend on threads.
uint64_t mix64(uint64_t x);
inline bool dropout_keep(uint64_t seed, uint64_t site, uint64_t index, uint32_t threshold) {
    return (uint32_t)(mix64(seed ^ mix64(site * 0x9E3779B97F4A7C15ULL + index)) >> 32) >= threshold;
}
inline uint32_t dropout_threshold(float p) { return (uint32_t)((double)p * 4294967296.0); }
// Dropout sites in the model: embedding, then per layer attention probabilities and two residuals.
inline uint64_t site_embedding() { return 1; }
inline uint64_t site_attn(int l) { return 16 + 4 * (uint64_t)l; }
inline uint64_t site_attn_resid(int l) { return 17 + 4 * (uint64_t)l; }
inline uint64_t site_mlp_resid(int l) { return 18 + 4 * (uint64_t)l; }
struct Dropout {
    float p = 0.0f;
    uint64_t seed = 0;  // per step
    bool active() const { return p > 0.0f; }
};
// x *= mask/(1-p) in place over n elements at a site.
void dropout_forward(float* x, size_t n, const Dropout& d, uint64_t site);
void dropout_backward(float* dx, size_t n, const Dropout& d, uint64_t site);
void dropout_mask(float* out, size_t n, const Dropout& d, uint64_t site);
// Floats of all the masks of a [B, T] step (what Model.dropout_masks returns), saturating at SIZE_MAX.
size_t dropout_mask_floats(const Config& c, int B, int T);

// ---- kernels (one file each) -------------------------------------------------------------------
// cllm_gemm.cpp: the GEMM (its tiles and packing: gemm_tiles.h); cllm_linear.cpp: the linear layers built on it.
// op(X): X row-major with row stride ld (in floats), or (trans) the transpose of that.
struct Operand {
    const float* data;
    int ld;
    bool trans = false;
};
// causal (attention's diagonal blocks): work known to be zero or unused is skipped, per MR x NR micro-tile.
// For row i of C, column j, summed index k:
//   OUT_LOWER  C[i][j] is wanted only for j <= i + diag (tiles wholly above are not computed, left as they are)
//   A_LOWER    op(A)[i][k] is zero for k > i + diag
//   A_UPPER    op(A)[i][k] is zero for k < i - diag
struct Causal {
    enum Kind { NONE, OUT_LOWER, A_LOWER, A_UPPER } kind = NONE;
    int diag = 0;
};
// op(b) [k, n] packed once for several serial GEMMs that each use a leading part of it, op(b)[0:k', 0:n']
// (attention: a head's K and V, for all of its query blocks). Filled by pack_operand; the buffer grows once.
struct PackedOperand {
    FloatBuffer buf;
    size_t capacity = 0;  // floats
    int k = 0, n = 0;
    bool bf16 = false;
};
// C[m,n] = (accumulate ? C : 0) + op(a)[m,k] op(b)[k,n] (+ bias), C row-major with row stride ldc. Callers
// name the fields: gemm({.c = y, .ldc = n, .a = {x, k}, .b = {w, k, true}, .m = m, .n = n, .k = k}) is y = x w^T.
struct Gemm {
    float* c;
    int ldc;
    Operand a, b;
    int m, n, k;
    bool accumulate = false;
    bool parallel = true;  // false: on the calling thread only (inside an outer parallel loop)
    bool bf16 = false;     // inputs rounded to bfloat16, products summed in fp32 (AVX-512 BF16 where available)
    const float* bias = nullptr;  // a row of n values added to every row of C (with accumulate false)
    float* gelu_out = nullptr;    // also gets gelu(C) (row stride ldc), each tile as it is finished, still in cache
    Causal causal = {};
    const PackedOperand* packed_b = nullptr;  // op(b) already packed (serial GEMMs only; m, k within its k, n)
};
void gemm(const Gemm& g);
// Pack op(b) [k, n] into p (rounded to bf16 with bf16), for gemm's packed_b.
void pack_operand(PackedOperand& p, const Operand& b, int k, int n, bool bf16);
// out[N,OC] = inp[N,IC] @ w[IC,OC] + bias. Up to 16 fp32 rows (a decode step) read w in place, once for all rows.
void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC,
                    bool bf16 = false, float* gelu_out = nullptr);
// dinp (+)= dout @ w^T, dw += inp^T @ dout, dbias += sum(dout); any of dinp/dw/dbias may be null
void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w,
                     int N, int IC, int OC, bool accumulate_dinp, bool bf16 = false);
// A bias-free linear layer with nn.Linear's weight layout w [OC, IC] (LLAMA's projections):
// out[N,OC] (row stride ldo) = inp[N,IC] (row stride ldi) @ w^T. Up to 16 fp32 rows: a dot per row of w and input.
void projection_forward(float* out, int ldo, const float* inp, int ldi, const float* w, int N, int IC, int OC,
                        bool bf16 = false);
// dinp (row stride ldi) (+)= dout @ w, dw += dout^T @ inp; dinp or dw may be null
void projection_backward(float* dinp, int ldi, float* dw, const float* dout, int ldo, const float* inp,
                         const float* w, int N, int IC, int OC, bool accumulate_dinp, bool bf16 = false);

// cllm_decode_bf16.cpp: weights as bf16 column panels for decoding with precision bf16 (generate), so that a step
// streams half the bytes of the fp32 weights. op(w) [K, N] is cut into panels of decode_panel_width() columns;
// a panel holds ceil(K/2) k pairs of that many 32-bit words (bf16 of k = 2i low, 2i+1 high: vdpbf16ps's layout).
struct WeightPart {  // columns of op(w) [K, n]: element (k, j) at w[k * ld + j], or (trans) at w[j * ld + k]
    Operand w;
    int n;
};
struct PackedBF16 {
    const uint32_t* data = nullptr;  // the panels (32-bit words), in storage the caller owns
    int K = 0, N = 0;
    const uint32_t* panels() const { return data; }
};
int decode_panel_width();  // the variant's NR: 32 with AVX-512, 16 otherwise
size_t packed_bf16_floats(int K, int N);
// The parts side by side as one [K, sum of n] weight (e.g. q | k | v), rounded to bf16, into dst
// (packed_bf16_floats(K, sum of n) floats, 64-byte aligned).
PackedBF16 pack_bf16(int K, const std::vector<WeightPart>& parts, float* dst);
// out[m, N] (row stride ldo) = bf16(x)[m, K] (row stride ldx) @ w + bias (null: none), summed in fp32; gelu_out
// (row stride ldo) also gets gelu(out). Each panel is read once for all m rows.
void bf16_product(float* out, int ldo, const float* x, int ldx, int m, const PackedBF16& w, const float* bias,
                  float* gelu_out = nullptr);

// cllm_embedding.cpp. pos null: no positions added (LLAMA, whose positions are rotary)
void sinusoidal_table(float* out, int P, int C);
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* pos, int B, int T, int C);
void embedding_backward(float* dwte, float* dpos, const float* dout, const int32_t* tokens, int B, int T, int C);

// cllm_layernorm.cpp: LayerNorm (GPT2, eps 1e-5) and RMSNorm (LLAMA)
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                       int N, int C);
// dinp += ..., dw += ..., db += ...
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C);
// out = inp * rstd * w, rstd = 1/sqrt(mean(inp^2) + eps) per row; keeps rstd [N]
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps);
// dinp += ..., dw += ...
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C);

// cllm_rope.cpp: rotary position embedding, Hugging Face's rotate_half convention (LlamaForCausalLM): the two
// halves x1, x2 of a head vector become x1 cos - x2 sin and x2 cos + x1 sin, angle p * theta^(-2i/hs) for the
// pair i at position p.
// cos, sin [P, hs/2], computed in double.
void rope_table(float* cos, float* sin, int P, int hs, float theta);
// In place over the first `heads` head vectors of every row of x [B*T rows, row stride ld]: row t of each sequence
// is rotated by table row t (offset the tables by p rows for a sequence starting at position p).
void rope_forward(float* x, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin);
// The gradient through rope_forward, in place: the inverse (transposed) rotation.
void rope_backward(float* dx, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin);

// cllm_attention.cpp: causal grouped-query self-attention over qkv [B,T,(H+2KV)hs], rows q [H*hs] | k [KV*hs] |
// v [KV*hs] (hs = C/H; KV = H is multi-head, GPT2's [B,T,3C]); query head h uses K/V head h / (H/KV).
// out [B,T,C], lse [B,H,T]. Only the per-row log-sum-exp is kept, so memory is linear in T; the backward
// recomputes probabilities.
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int H, int KV, const Dropout& d,
                       uint64_t site, bool bf16 = false);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int B, int T, int C, int H, int KV, const Dropout& d, uint64_t site, bool bf16 = false);
// The attention dropout mask [B,H,T,T] (zeros above the diagonal), for tests.
void attention_dropout_mask(float* out, int B, int T, int H, const Dropout& d, uint64_t site);
// Decode: the query of row t of qkv [t+1, (H+2KV)hs] (one sequence, the training layout) against rows 0..t; out [C].
void attention_decode(float* out, const float* qkv, int t, int C, int H, int KV);
// The same against a bf16 cache: the query q [H*hs] against the k | v rows kv [t+1, 2*KV*hs] (k then v, bf16).
void attention_decode_bf16(float* out, const float* q, const uint16_t* kv, int t, int C, int H, int KV);

// cllm_feedforward.cpp: the block's MLP, GPT2's c_fc -> GELU (tanh approximation) -> c_proj or LLAMA's SwiGLU
// down(silu(gate) * up), and the activations themselves.
void gelu_forward(float* out, const float* inp, size_t n);
void gelu_backward(float* dinp, const float* dout, const float* inp, size_t n);  // dinp = dout * gelu'(inp)
// out[N,F] = silu(gu[:, :F]) * gu[:, F:] over gu [N, 2F] (gate | up), silu(x) = x sigmoid(x)
void swiglu_forward(float* out, const float* gu, int N, int F);
// dgu [N, 2F] = the gradients of gate | up (written)
void swiglu_backward(float* dgu, const float* dout, const float* gu, int N, int F);
struct FeedForward {  // the MLP's weights
    const float *fc_w = nullptr, *fc_b = nullptr, *proj_w = nullptr, *proj_b = nullptr;  // GPT2: [C,F]+[F], [F,C]+[C]
    const float *gate_w = nullptr, *up_w = nullptr, *down_w = nullptr;                    // SwiGLU: [F,C], [F,C], [C,F]
    int C = 0, F = 0;
    bool bf16 = false;
    bool swiglu() const { return gate_w != nullptr; }
    int width() const { return swiglu() ? 2 * F : F; }  // of the kept pre-activations fch
};
struct FeedForwardGrads {  // accumulated into (+=); the same fields as FeedForward
    float *fc_w = nullptr, *fc_b = nullptr, *proj_w = nullptr, *proj_b = nullptr;
    float *gate_w = nullptr, *up_w = nullptr, *down_w = nullptr;
};
// out[N,C] = the MLP of inp. Keeps the pre-activations fch [N, ff.width()] for the backward (GELU's input, or
// SwiGLU's gate | up); act_out [N,F] receives the activation's output (GELU from c_fc's GEMM epilogue).
void feedforward_forward(float* out, float* fch, float* act_out, const float* inp, const FeedForward& ff, int N);
// dinp[N,C] = the input's gradient (written, not added), g += the weight gradients. The activation is recomputed
// from fch into act_scratch [N,F]; dfch [N, ff.width()] is scratch. dinp may alias dout (dout is read before dinp
// is written).
void feedforward_backward(float* dinp, const FeedForwardGrads& g, const float* dout, const float* inp,
                          const float* fch, float* act_scratch, float* dfch, const FeedForward& ff, int N);

// cllm_loss.cpp: fused softmax + cross-entropy, with label smoothing eps in [0, 1] (PyTorch's definition:
// the target distribution is (1 - eps) onehot + eps / V). losses[N] = lse - (1 - eps) x[target] - eps mean(x);
// the backward writes dlogits = (softmax - (1 - eps) onehot - eps / V) * scale, in place over the logits if
// dlogits == logits.
void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int N, int V,
                           float eps = 0.0f);
void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int N, int V,
                            float scale, float eps = 0.0f);
// Both at once: losses and dlogits in one pass over the logits (in place).
void cross_entropy_fused(float* losses, float* logits_to_dlogits, const int32_t* targets, int N, int V,
                         float scale, float eps = 0.0f);

// ---- the model: buffers and init (cllm_model.cpp), forward (cllm_forward.cpp), backward (cllm_backward.cpp)
// The backward's progress, for sending gradients while it still computes (data parallelism): called with a range
// [from, to) of the gradient buffer once its floats are final in this backward. Back to front: [from, total) with
// `from` decreasing (each layer's tensors follow the earlier layers' in the layout), [0, total) last; with the
// embedding's part left to the caller (backward's demb), the wte range comes first, right after the head GEMMs.
using GradsReady = std::function<void(size_t from, size_t to)>;

struct Model {
    Config cfg;
    ParamLayout layout;
    FloatBuffer params, grads;
    ModelTensors p, g;
    std::vector<float> pos_table;  // GPT2's sinusoidal table, when not learned
    std::vector<float> rope_cos, rope_sin;  // LLAMA: [max_seq_len, hs/2]
    Activations acts;
    uint64_t dropout_seed = 0;   // base seed
    uint64_t dropout_stream = 0; // independent mask streams for the same seed and step (a data-parallel rank)
    uint64_t dropout_step = 0;   // forward_backward calls made (part of the RNG state)
    // Storage for the bf16 weight copies of generate(bf16), allocated by the first such call and reused by the
    // next ones (repacked each time): fresh huge pages cost a first touch that can take a second.
    FloatBuffer decode_panels;
    size_t decode_panels_floats = 0;

    Model(const Config& c, uint64_t seed);
    // the table added to the embeddings: GPT2's wpe or sinusoidal table; null for LLAMA (rotary)
    const float* positions() const { return cfg.llama() ? nullptr : cfg.learned_pos() ? p.wpe : pos_table.data(); }
    // The block's parts for this architecture (cllm_block.cpp). The training forward, its backward and the cached
    // decode wire the same parts, so the block is written once per direction.
    // Pre-norm: LayerNorm (mean, rstd) or RMSNorm (rstd only; b and mean unused).
    void norm_forward(float* out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                      int N) const;
    void norm_backward(float* dinp, float* dw, float* db, const float* dout, const float* x, const float* w,
                       const float* mean, const float* rstd, int N) const;  // dinp, dw, db +=
    // qkv [B*T, qkv_width] of layer l from its normed input; LLAMA rotates q and k for positions pos0 + t.
    void qkv_forward(int l, float* qkv, const float* x, int B, int T, int pos0, bool bf16) const;
    void qkv_project(int l, float* qkv, const float* x, int N, bool bf16) const;  // qkv_forward without RoPE
    void rope_qk(float* qkv, int B, int T, int pos0) const;  // qkv_forward's RoPE (LLAMA; GPT2: nothing)
    // dx [N,C] = the input's gradient (written); dqkv is consumed (LLAMA un-rotates it in place).
    void qkv_backward(int l, float* dx, float* dqkv, const float* x, int B, int T, bool bf16);
    void attn_out_forward(int l, float* out, const float* att, int N, bool bf16) const;  // c_proj / o_proj
    void attn_out_backward(int l, float* datt, const float* dout, const float* att, int N, bool bf16);  // datt written
    FeedForward mlp(int layer) const;  // layer's MLP weights as the feed-forward kernels take them
    FeedForwardGrads mlp_grads(int layer) const;
    Dropout step_dropout() const;
    // Forward through every layer, keeping the activations; logits land in acts.logits.
    void forward(const int32_t* tokens, int B, int T, const Dropout& d);
    // Mean cross-entropy (label-smoothed by eps) of the last forward; turns the logits into dlogits scaled by
    // grad_scale/(B*T).
    float loss_and_dlogits(const int32_t* targets, float grad_scale, float eps = 0.0f);
    float loss_only(const int32_t* targets);
    // ready (optional) is called as the gradients become final, last layer first (see GradsReady). demb (optional,
    // tied head only, [B*T, C]): the gradient at the embedding output is written there instead of being added into
    // g.wte and g.wpe, which then receive the head's part only (a data-parallel caller sums the sparse part itself).
    void backward(const int32_t* tokens, const Dropout& d, const GradsReady& ready = {}, float* demb = nullptr);
    float forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, bool accumulate,
                           float grad_scale, float label_smoothing = 0.0f, const GradsReady& ready = {},
                           float* demb = nullptr);
    void zero_grad();
};

// ---- optimizer (cllm_optimizer.cpp) -------------------------------------------------------------
double grad_norm(const float* g, size_t n);
void scale_inplace(float* x, size_t n, float s);
// Updates the parameters [lo, hi) of the flat buffer (default: all); m and v hold the moments of that range only
// (m[0] is element lo's): a rank's shard under ZeRO-1. Element-wise, so a range gives the bits of the whole update.
void adamw_step(float* params, const float* grads, float* m, float* v, const ParamLayout& layout, float lr,
                double beta1, double beta2, float eps, float weight_decay, int64_t step, size_t lo = 0,
                size_t hi = SIZE_MAX);
void sgd_step(float* params, const float* grads, float* buf, const ParamLayout& layout, float lr, float momentum,
              float weight_decay, bool nesterov, bool first_step);

// ---- inference (cllm_inference.cpp) ------------------------------------------------------------
// temperature <= 0 is greedy; top_k <= 0 and top_p outside (0, 1) disable those filters.
int32_t sample_token(float* logits, int V, float temperature, int top_k, float top_p, uint64_t seed, uint64_t step);
struct Sampling {
    float temperature = 1.0f;
    int top_k = 0;
    float top_p = 1.0f;
    float repetition_penalty = 1.0f;  // transformers' definition, over prompt and output; 1 is off
    float frequency_penalty = 0.0f;   // logit -= count in the output x this
    float presence_penalty = 0.0f;    // logit -= this, once the token is in the output
    int vocab_limit = 0;  // draw ids below this only (0: all): a tokenizer smaller than a padded vocabulary
};
// Called after each step with the sequences (prompt indices) that drew a token and those tokens; returns the
// sequences to stop there (stop strings, a user's interrupt).
using StepCallback = std::function<std::vector<int>(const std::vector<int>&, const std::vector<int32_t>&)>;
// New tokens only, one sequence per prompt; sequence b samples with seeds[b], so a prompt gives the same tokens
// alone or in a batch. A token of stop_tokens ends its sequence and is not returned. When a context reaches
// max_seq_len its newest half is kept and prefilled again. all_logits (optional) receives per sequence the
// model's logits (before penalties) each new token was sampled from, [n, V] flat.
// bf16: decode with bf16 copies of the weights (packed once per call) and a bf16 k | v cache, fp32 sums; the prefill
// runs in the model's own precision and its k, v are rounded into the cache.
std::vector<std::vector<int32_t>> generate(Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                           int max_new_tokens, const Sampling& sampling, bool bf16,
                                           const std::vector<uint64_t>& seeds, const std::vector<int32_t>& stop_tokens,
                                           const StepCallback& on_step, std::vector<std::vector<float>>* all_logits);
// Floats generate() allocates at most for `batch` prompts of a model of this config, without allocating: per
// sequence the KV cache (the qkv rows of every layer over max_seq_len positions; a call takes prompt + new ones),
// its logits and token counts, and a decode step's row scratch; the activation arena of a [1, max_seq_len]
// prefill and, with return_logits, the [max_new_tokens, V] logits of each sequence; with bf16 the bf16 caches and
// weight copies instead. Saturates at SIZE_MAX.
size_t generation_floats(const Config& c, int batch, int max_new_tokens, bool return_logits, bool bf16);

int get_num_threads();  // cllm_model.cpp
void set_num_threads(int n);

}  // namespace cllm
