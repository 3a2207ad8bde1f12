// Compiled into each kernel variant library (libcllm_kernels_<variant>.so): its kernels as a table.
#include "isa.h"

#ifndef CLLM_VARIANT
#error "CLLM_VARIANT (the variant's name) must be defined by the build"
#endif

extern "C" [[gnu::visibility("default")]] const cllm::KernelTable* cllm_kernel_table() {
    static const cllm::KernelTable table = {
        .variant = CLLM_VARIANT,
#if defined(__AVX512BF16__)
        .native_bf16 = true,
#else
        .native_bf16 = false,
#endif
#define CLLM_FUNCTION_ENTRY(f) .f = &cllm::f,
#define CLLM_METHOD_ENTRY(f) .model_##f = &cllm::Model::f,
        CLLM_KERNEL_FUNCTIONS(CLLM_FUNCTION_ENTRY)
        CLLM_KERNEL_METHODS(CLLM_METHOD_ENTRY)
#undef CLLM_FUNCTION_ENTRY
#undef CLLM_METHOD_ENTRY
    };
    return &table;
}
