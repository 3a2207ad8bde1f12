// Picks the kernel variant for this CPU, loads its library, and forwards cllm.h's kernel calls into it. Built for
// the baseline ISA: nothing here may use an instruction an old CPU lacks.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "isa.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef CLLM_BUILT_VARIANTS
#error "CLLM_BUILT_VARIANTS (the comma-separated variants of this build, best first) must be defined by the build"
#endif

namespace cllm {

// ---- the machine's ceilings: peak probes (the dispatcher's choice and the kernel benchmark's reference) -------
// 12 independent chains of vector FMAs (fp32) or of AVX-512 BF16 dot products (vdpbf16ps: 16 lanes x 2 products),
// registers only, no memory traffic; the chains unrolled (kept in a stack array they ran at half rate). This file is
// built for the baseline ISA: the probes are compiled for their instructions (target attributes) and run only where
// the CPU has them.
namespace {
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
#define CLLM_FMA_CHAINS(V)                                                                         \
    V a[12], m = (V){} + 0.999999f, c = (V){} + 1e-7f;                                             \
    for (int i = 0; i < 12; i++) a[i] = (V){} + (float)i;                                          \
    for (long it = 0; it < iters; it++) {                                                          \
        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) a[i] = a[i] * m + c;                   \
        asm volatile("" : "+x"(m)); /* the multiplier opaque: no folding of the chains */          \
    }                                                                                              \
    float sum = 0.0f;                                                                              \
    for (int i = 0; i < 12; i++) sum += a[i][0];                                                   \
    asm volatile("" : : "x"(sum));
#if defined(__x86_64__)
[[gnu::target("avx512f")]] void fma_chains_16(long iters) { CLLM_FMA_CHAINS(v16) }
[[gnu::target("avx2,fma")]] void fma_chains_8(long iters) { CLLM_FMA_CHAINS(v8) }
[[gnu::target("avx512f,avx512bf16")]] void bf16_dot_chains(long iters) {
    __m512 acc[12];
    for (int i = 0; i < 12; i++) acc[i] = (__m512){};
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // pairs of bf16 1.0
    for (long it = 0; it < iters; it++) {
        #pragma GCC unroll 12
        for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, x);
        asm volatile("" : "+v"(x));
    }
    float sum = 0.0f;
    for (int i = 0; i < 12; i++) sum += acc[i][0];
    asm volatile("" : : "x"(sum));
}
#endif
#undef CLLM_FMA_CHAINS

// FLOP/s of one thread running probe(iters), the best of a few runs (a busy machine only lowers a run).
template <class F>
double probe_rate(F&& probe, long iters, double flops) {
    double best = 0;
    for (int run = 0; run < 5; run++) {
        const auto t0 = std::chrono::steady_clock::now();
        probe(iters);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, s > 0 ? flops / s : 0.0);
    }
    return best;
}
}  // namespace

int peak_fp32_lanes() {
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") ? 16 : __builtin_cpu_supports("fma") ? 8 : 0;
#else
    return 0;
#endif
}

bool has_bf16_dot() {
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

void peak_fp32_chains(long iters) {
#if defined(__x86_64__)
    if (peak_fp32_lanes() == 16) fma_chains_16(iters);
    else if (peak_fp32_lanes() == 8) fma_chains_8(iters);
#endif
}

void peak_bf16_chains(long iters) {
#if defined(__x86_64__)
    if (has_bf16_dot()) bf16_dot_chains(iters);
#endif
}

double bf16_dot_speed() {
    static const double ratio = [] {  // measured once per process: the choice must not change within a run
        if (!has_bf16_dot() || peak_fp32_lanes() == 0) return 0.0;
        const long iters = 1 << 15;
        const double fma = probe_rate(peak_fp32_chains, iters, peak_fp32_flops(iters));
        const double dot = probe_rate(peak_bf16_chains, iters, peak_bf16_flops(iters));
        return fma > 0 ? dot / fma : 0.0;
    }();
    return ratio;
}

namespace {

struct Variant {
    const char* name;
    const char* needs;  // what the CPU must have, in words
    bool (*runs)();     // whether this CPU has it (CPUID, and the OS saving the wide registers)
};

#if defined(__x86_64__) || defined(__i386__)
const Variant kVariants[] = {
    {"avx512bf16", "AVX-512 F/BW/CD/DQ/VL (x86-64-v4) and AVX512_BF16",
     [] { return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16"); }},
    {"avx512", "AVX-512 F/BW/CD/DQ/VL (x86-64-v4)", [] { return (bool)__builtin_cpu_supports("x86-64-v4"); }},
    {"avx2", "AVX2, FMA, BMI1/2, F16C, MOVBE (x86-64-v3)", [] { return (bool)__builtin_cpu_supports("x86-64-v3"); }},
    {"baseline", "x86-64 (SSE2)", [] { return true; }},
    {"native", "the CPU that built it (-march=native)", [] { return true; }},
};
#else
const Variant kVariants[] = {
    {"generic", "this architecture's baseline", [] { return true; }},
    {"native", "the CPU that built it (-march=native)", [] { return true; }},
};
#endif

std::vector<std::string> split(const std::string& s) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= s.size()) {
        const size_t end = std::min(s.find(',', start), s.size());
        if (end > start) out.push_back(s.substr(start, end - start));
        start = end + 1;
    }
    return out;
}

std::string join(const std::vector<std::string>& v) {
    std::string out;
    for (const std::string& s : v) out += (out.empty() ? "" : ", ") + s;
    return out.empty() ? "none" : out;
}

// A requested name as an error shows it: as it is when plain (letters, digits, '_'), else quoted with its spaces and
// control bytes visible and cut to 40 bytes, so that the error stays one readable line whatever the environment holds.
std::string shown(const std::string& value) {
    const size_t kMax = 40;
    bool plain = !value.empty() && value.size() <= kMax;
    for (unsigned char c : value) plain &= std::isalnum(c) || c == '_';
    if (plain) return value;
    std::string out = "'";
    for (size_t i = 0; i < value.size() && i < kMax; ++i) {
        const unsigned char c = value[i];
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            out += static_cast<char>(c);
        } else {
            char hex[8];
            std::snprintf(hex, sizeof hex, "\\x%02x", c);
            out += hex;
        }
    }
    return out + (value.size() > kMax ? "'... (" + std::to_string(value.size()) + " bytes)" : "'");
}

const Variant* find_variant(const std::string& name) {
    for (const Variant& v : kVariants)
        if (name == v.name) return &v;
    return nullptr;
}

std::vector<std::string> built_variants() { return split(CLLM_BUILT_VARIANTS); }

std::vector<std::string> supported_variants() {
    std::vector<std::string> out;
    for (const std::string& name : built_variants())
        if (const Variant* v = find_variant(name); v && v->runs()) out.push_back(name);
    return out;
}

// The directory of the module holding this code (the extension, or the benchmark program).
std::string own_directory() {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&built_variants), &info) || !info.dli_fname) return ".";
    const std::string path = info.dli_fname;
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

// Next to the extension (the installed package, a build directory), or one level up (the benchmark in cllm/bin).
void* open_variant(const std::string& name, std::string& path) {
    const std::string dir = own_directory(), file = "libcllm_kernels_" + name + ".so";
    std::string first_error;
    for (const std::string& candidate : {dir + "/" + file, dir + "/../" + file}) {
        if (void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL)) {
            path = candidate;
            return handle;
        }
        if (first_error.empty()) first_error = dlerror();
    }
    throw std::invalid_argument("cannot load the " + name + " kernels: " + first_error);
}

struct State {
    std::mutex mu;
    std::atomic<const KernelTable*> table{nullptr};
    std::string selected, reason, library, error;
};

State& state() {
    static State s;
    return s;
}

void select_locked(State& s, const std::string& requested, const std::string& source) {
    const std::vector<std::string> built = built_variants(), supported = supported_variants();
    std::string name = requested, reason;
    if (requested.empty() || requested == "auto") {
        if (supported.empty()) throw std::invalid_argument("no kernel variant of this build runs on this CPU");
        name = supported.front();
        reason = "the best of this build's variants that this CPU runs";
        // AVX512_BF16 by its speed, not its presence: where its dot products are no faster than the fp32 FMAs
        // (Intel's, at half the rate), bf16 matmuls run faster as FMAs on bf16-rounded inputs (the avx512
        // kernels: bf16 emulated exactly, everything else the same code); where they are (AMD Zen 4/5: twice
        // the FMA rate), natively.
        const bool avx512 = std::find(supported.begin(), supported.end(), "avx512") != supported.end();
        if (name == "avx512bf16" && avx512) {
            char speed[64];
            std::snprintf(speed, sizeof speed, "%.2fx", bf16_dot_speed());
            if (bf16_dot_speed() < kNativeBf16Speedup) {
                name = "avx512";
                reason = std::string("AVX512_BF16's dot products run at ") + speed + " the fp32 FMA rate here "
                         "(measured): bf16 matmuls run faster as fp32 FMAs on bf16-rounded inputs";
            } else {
                reason += std::string(" (AVX512_BF16's dot products at ") + speed + " the fp32 FMA rate)";
            }
        }
    } else {
        const std::string what = source + "=" + shown(requested);
        const Variant* v = find_variant(requested);
        if (!v) throw std::invalid_argument(what + ": unknown kernel variant; use auto or one of: " + join(built));
        bool in_build = false;
        for (const std::string& b : built) in_build |= b == requested;
        if (!in_build) throw std::invalid_argument(what + ": this build has no such kernels (built: " + join(built) + ")");
        if (!v->runs())
            throw std::invalid_argument(what + ": this CPU lacks " + v->needs + "; it runs: " + join(supported));
        reason = "forced by " + what;
    }
    std::string path;
    void* handle = open_variant(name, path);  // never closed: tables handed out stay valid
    using TableFn = const KernelTable* (*)();
    auto fn = reinterpret_cast<TableFn>(dlsym(handle, "cllm_kernel_table"));
    if (!fn) throw std::invalid_argument(path + ": not a CLLM kernel library (no cllm_kernel_table)");
    s.table.store(fn(), std::memory_order_release);
    s.selected = name;
    s.reason = reason;
    s.library = path;
    s.error.clear();
}

// The first use selects from $CLLM_ISA (unset: auto); a failure is kept and raised by every kernel call.
State& initialised() {
    State& s = state();
    static std::once_flag once;
    std::call_once(once, [&s] {
        std::lock_guard<std::mutex> lock(s.mu);
        const char* env = std::getenv("CLLM_ISA");
        try {
            select_locked(s, env ? env : "", "CLLM_ISA");
        } catch (const std::invalid_argument& e) {
            s.error = e.what();
        }
    });
    return s;
}

}  // namespace

const KernelTable& kernels() {
    State& s = initialised();
    const KernelTable* t = s.table.load(std::memory_order_acquire);
    if (!t) {
        std::lock_guard<std::mutex> lock(s.mu);
        throw std::invalid_argument(s.error);
    }
    return *t;
}

void select_isa(const std::string& name) {
    State& s = initialised();
    std::lock_guard<std::mutex> lock(s.mu);
    select_locked(s, name, "variant");
}

IsaInfo isa_info() {
    State& s = initialised();
    std::lock_guard<std::mutex> lock(s.mu);
    IsaInfo info{built_variants(), supported_variants(), s.selected, s.selected.empty() ? s.error : s.reason,
                 s.library, {}};
#if defined(__x86_64__) || defined(__i386__)
#define CLLM_FEATURE(f) \
    if (__builtin_cpu_supports(f)) info.cpu_features.push_back(f);
    CLLM_FEATURE("sse4.2") CLLM_FEATURE("avx") CLLM_FEATURE("avx2") CLLM_FEATURE("fma") CLLM_FEATURE("avx512f")
    CLLM_FEATURE("avx512bw") CLLM_FEATURE("avx512dq") CLLM_FEATURE("avx512vl") CLLM_FEATURE("avx512bf16")
#undef CLLM_FEATURE
#endif
    return info;
}

// ---- cllm.h's kernels, forwarded to the selected variant ------------------------------------------------
void gemm(const Gemm& g) { kernels().gemm(g); }
void linear_forward(float* out, const float* inp, const float* w, const float* bias, int N, int IC, int OC, bool bf16,
                    float* gelu_out) {
    kernels().linear_forward(out, inp, w, bias, N, IC, OC, bf16, gelu_out);
}
void linear_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp, const float* w, int N,
                     int IC, int OC, bool accumulate_dinp, bool bf16) {
    kernels().linear_backward(dinp, dw, dbias, dout, inp, w, N, IC, OC, accumulate_dinp, bf16);
}
void sinusoidal_table(float* out, int P, int C) { kernels().sinusoidal_table(out, P, C); }
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* pos, int B, int T, int C) {
    kernels().embedding_forward(out, tokens, wte, pos, B, T, C);
}
void embedding_backward(float* dwte, float* dpos, const float* dout, const int32_t* tokens, int B, int T, int C) {
    kernels().embedding_backward(dwte, dpos, dout, tokens, B, T, C);
}
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N,
                       int C) {
    kernels().layernorm_forward(out, mean, rstd, inp, w, b, N, C);
}
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                        const float* mean, const float* rstd, int N, int C) {
    kernels().layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
}
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    kernels().rmsnorm_forward(out, rstd, inp, w, N, C, eps);
}
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int N, int C) {
    kernels().rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
}
void rope_table(float* cos, float* sin, int P, int hs, float theta) { kernels().rope_table(cos, sin, P, hs, theta); }
void rope_forward(float* x, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin) {
    kernels().rope_forward(x, ld, heads, hs, B, T, cos, sin);
}
void rope_backward(float* dx, int ld, int heads, int hs, int B, int T, const float* cos, const float* sin) {
    kernels().rope_backward(dx, ld, heads, hs, B, T, cos, sin);
}
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int H, int KV, const Dropout& d,
                       uint64_t site, bool bf16) {
    kernels().attention_forward(out, lse, qkv, B, T, C, H, KV, d, site, bf16);
}
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse, int B,
                        int T, int C, int H, int KV, const Dropout& d, uint64_t site, bool bf16) {
    kernels().attention_backward(dqkv, dout, qkv, out, lse, B, T, C, H, KV, d, site, bf16);
}
void attention_dropout_mask(float* out, int B, int T, int H, const Dropout& d, uint64_t site) {
    kernels().attention_dropout_mask(out, B, T, H, d, site);
}
void gelu_forward(float* out, const float* inp, size_t n) { kernels().gelu_forward(out, inp, n); }
void gelu_backward(float* dinp, const float* dout, const float* inp, size_t n) { kernels().gelu_backward(dinp, dout, inp, n); }
void swiglu_forward(float* out, const float* gu, int N, int F) { kernels().swiglu_forward(out, gu, N, F); }
void swiglu_backward(float* dgu, const float* dout, const float* gu, int N, int F) {
    kernels().swiglu_backward(dgu, dout, gu, N, F);
}
void feedforward_forward(float* out, float* fch, float* gelu_out, const float* inp, const FeedForward& ff, int N) {
    kernels().feedforward_forward(out, fch, gelu_out, inp, ff, N);
}
void feedforward_backward(float* dinp, const FeedForwardGrads& g, const float* dout, const float* inp, const float* fch,
                          float* gelu_scratch, float* dfch, const FeedForward& ff, int N) {
    kernels().feedforward_backward(dinp, g, dout, inp, fch, gelu_scratch, dfch, ff, N);
}
void cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int N, int V, float eps) {
    kernels().cross_entropy_forward(losses, logits, targets, N, V, eps);
}
void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, int N, int V, float scale,
                            float eps) {
    kernels().cross_entropy_backward(dlogits, logits, targets, N, V, scale, eps);
}
void cross_entropy_fused(float* losses, float* logits_to_dlogits, const int32_t* targets, int N, int V, float scale,
                         float eps) {
    kernels().cross_entropy_fused(losses, logits_to_dlogits, targets, N, V, scale, eps);
}
double grad_norm(const float* g, size_t n) { return kernels().grad_norm(g, n); }
void scale_inplace(float* x, size_t n, float s) { kernels().scale_inplace(x, n, s); }
void adamw_step(float* params, const float* grads, float* m, float* v, const ParamLayout& layout, float lr,
                double beta1, double beta2, float eps, float weight_decay, int64_t step, size_t lo, size_t hi) {
    kernels().adamw_step(params, grads, m, v, layout, lr, beta1, beta2, eps, weight_decay, step, lo, hi);
}
void sgd_step(float* params, const float* grads, float* buf, const ParamLayout& layout, float lr, float momentum,
              float weight_decay, bool nesterov, bool first_step) {
    kernels().sgd_step(params, grads, buf, layout, lr, momentum, weight_decay, nesterov, first_step);
}
std::vector<std::vector<int32_t>> generate(Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                           int max_new_tokens, const Sampling& sampling, bool bf16,
                                           const std::vector<uint64_t>& seeds, const std::vector<int32_t>& stop_tokens,
                                           const StepCallback& on_step, std::vector<std::vector<float>>* all_logits) {
    return kernels().generate(m, prompts, max_new_tokens, sampling, bf16, seeds, stop_tokens, on_step, all_logits);
}
size_t generation_floats(const Config& c, int batch, int max_new_tokens, bool return_logits, bool bf16) {
    return kernels().generation_floats(c, batch, max_new_tokens, return_logits, bf16);
}

void Model::forward(const int32_t* tokens, int B, int T, const Dropout& d) {
    (this->*kernels().model_forward)(tokens, B, T, d);
}
float Model::loss_only(const int32_t* targets) { return (this->*kernels().model_loss_only)(targets); }
float Model::loss_and_dlogits(const int32_t* targets, float grad_scale, float eps) {
    return (this->*kernels().model_loss_and_dlogits)(targets, grad_scale, eps);
}
void Model::backward(const int32_t* tokens, const Dropout& d, const GradsReady& ready, float* demb) {
    (this->*kernels().model_backward)(tokens, d, ready, demb);
}
float Model::forward_backward(const int32_t* tokens, const int32_t* targets, int B, int T, bool accumulate,
                              float grad_scale, float label_smoothing, const GradsReady& ready, float* demb) {
    return (this->*kernels().model_forward_backward)(tokens, targets, B, T, accumulate, grad_scale, label_smoothing,
                                                     ready, demb);
}

}  // namespace cllm
