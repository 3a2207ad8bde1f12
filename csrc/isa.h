// Kernel variants chosen at run time. The kernels are compiled once per x86-64 level into
// libcllm_kernels_<variant>.so (each exporting only cllm_kernel_table, isa_table.cpp); the extension and the
// benchmark, built for the baseline, load the best variant this CPU runs (isa_dispatch.cpp) and reach it through
// the table below: the kernel declarations of cllm.h are, in them, forwarding calls into it.
#pragma once
#include <string>
#include <vector>

#include "cllm.h"

namespace cllm {

// The entry points the baseline code calls (bindings, benchmark, Model construction). A kernel only other kernels
// call needs no slot: within a variant, calls stay inside it.
#define CLLM_KERNEL_FUNCTIONS(X)                                                                          \
    X(gemm) X(linear_forward) X(linear_backward) X(sinusoidal_table) X(embedding_forward)                 \
    X(embedding_backward) X(layernorm_forward) X(layernorm_backward) X(rmsnorm_forward)                   \
    X(rmsnorm_backward) X(rope_table) X(rope_forward) X(rope_backward) X(attention_forward)               \
    X(attention_backward) X(attention_dropout_mask) X(gelu_forward) X(gelu_backward) X(swiglu_forward)    \
    X(swiglu_backward)                                                                                     \
    X(feedforward_forward) X(feedforward_backward) X(cross_entropy_forward) X(cross_entropy_backward)     \
    X(cross_entropy_fused) X(grad_norm) X(scale_inplace) X(adamw_step) X(sgd_step) X(generate)            \
    X(generation_floats)
#define CLLM_KERNEL_METHODS(X) X(forward) X(loss_only) X(loss_and_dlogits) X(backward) X(forward_backward)

struct KernelTable {
    const char* variant;  // "avx512bf16", "avx512", "avx2", "baseline", "generic" or "native"
    bool native_bf16;     // bf16 GEMMs on AVX-512 BF16 dot products (otherwise bf16-rounded inputs, fp32 FMAs)
#define CLLM_FUNCTION_SLOT(f) decltype(&cllm::f) f;
#define CLLM_METHOD_SLOT(f) decltype(&Model::f) model_##f;
    CLLM_KERNEL_FUNCTIONS(CLLM_FUNCTION_SLOT)
    CLLM_KERNEL_METHODS(CLLM_METHOD_SLOT)
#undef CLLM_FUNCTION_SLOT
#undef CLLM_METHOD_SLOT
};

// The variant in use. Throws std::invalid_argument when none could be loaded (see isa_selection_error).
const KernelTable& kernels();

// What build_info reports.
struct IsaInfo {
    std::vector<std::string> built;      // variants in this build, best first
    std::vector<std::string> supported;  // of those, the ones this CPU runs
    std::string selected;                // "" when none could be loaded
    std::string reason;                  // why that one (or why none)
    std::string library;                 // the loaded variant's file
    std::vector<std::string> cpu_features;
};
IsaInfo isa_info();
// Loads and uses the named variant ("" or "auto": the best this CPU runs). Throws std::invalid_argument naming
// the problem (unknown name, a variant the CPU lacks or that was not built, a library that does not load); the
// previous selection then stays.
void select_isa(const std::string& name);

}  // namespace cllm

namespace cllm {
// The peak probes (isa_dispatch.cpp): on the calling thread, `iters` rounds of 12 independent chains of fp32 FMAs
// (peak_fp32_lanes() wide: 16, 8, or 0 without FMA) or of AVX-512 BF16 dot products (where has_bf16_dot()).
int peak_fp32_lanes();
bool has_bf16_dot();
void peak_fp32_chains(long iters);
void peak_bf16_chains(long iters);
inline double peak_fp32_flops(long iters) { return 2.0 * peak_fp32_lanes() * 12 * iters; }
inline double peak_bf16_flops(long iters) { return 4.0 * 16 * 12 * iters; }
// AVX512_BF16 dot-product FLOP/s over fp32 FMA FLOP/s, measured once per process (0 without AVX512_BF16). Below
// kNativeBf16Speedup the automatic choice runs bf16 matmuls as FMAs (the avx512 kernels) instead.
double bf16_dot_speed();
constexpr double kNativeBf16Speedup = 1.25;
}  // namespace cllm

// The one symbol each variant library exports.
extern "C" const cllm::KernelTable* cllm_kernel_table();
