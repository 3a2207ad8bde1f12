// The model's buffers (parameters, gradients), their initialisation (GPT-2's), and the thread count.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <omp.h>

#include <sys/mman.h>

#include "cllm.h"

namespace cllm {

void AlignedFree::operator()(float* p) const { std::free(p); }

FloatBuffer alloc_floats(size_t n, bool huge_pages) {
    // Big buffers (parameters, gradients, optimizer state, the activation arena) on 2 MiB boundaries and
    // marked for transparent huge pages: the GEMMs walk them by rows far apart, and 4 KiB pages then cost a
    // TLB miss per row.
    constexpr size_t HUGE = 2u << 20;
    const bool huge = huge_pages && n * sizeof(float) >= HUGE;
    const size_t align = huge ? HUGE : 64;
    size_t bytes = ((n * sizeof(float) + align - 1) / align) * align;
    if (bytes == 0) bytes = 64;
    float* p = static_cast<float*>(std::aligned_alloc(align, bytes));
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: no huge pages is fine too
#endif
    std::memset(p, 0, bytes);
    return FloatBuffer(p);
}

namespace {

// Standard normal from a counter: Box-Muller over two hashed uniforms, identical on every platform.
float normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
    uint64_t a = mix64(seed ^ mix64(stream * 0x100000001B3ULL + 2 * i));
    uint64_t b = mix64(seed ^ mix64(stream * 0x100000001B3ULL + 2 * i + 1));
    double u1 = ((a >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
    double u2 = (b >> 11) * (1.0 / 9007199254740992.0);
    return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

bool ends_with(const std::string& s, const char* suffix) {
    const size_t k = std::strlen(suffix);
    return s.size() >= k && s.compare(s.size() - k, k, suffix) == 0;
}

}  // namespace

Model::Model(const Config& c, uint64_t seed) : cfg(c), layout(c) {
    params = alloc_floats(layout.total);
    grads = alloc_floats(layout.total);
    p = layout.bind(params.get());
    g = layout.bind(grads.get());
    dropout_seed = mix64(seed ^ 0xD1B54A32D192ED03ULL);
    if (cfg.llama()) {
        const size_t n = (size_t)cfg.max_seq_len * (cfg.head_dim() / 2);
        rope_cos.resize(n);
        rope_sin.resize(n);
        rope_table(rope_cos.data(), rope_sin.data(), cfg.max_seq_len, cfg.head_dim(), cfg.rope_theta);
    } else if (!cfg.learned_pos()) {
        pos_table.resize((size_t)cfg.max_seq_len * cfg.embedding_dim);
        sinusoidal_table(pos_table.data(), cfg.max_seq_len, cfg.embedding_dim);
    }
    // GPT-2 init, for both architectures: weights N(0, 0.02), the projections into the residual stream
    // N(0, 0.02/sqrt(2L)), biases 0, norm weights 1.
    const float resid_std = 0.02f / std::sqrt(2.0f * cfg.num_layers);
    for (size_t t = 0; t < layout.tensors.size(); t++) {
        const TensorInfo& ti = layout.tensors[t];
        float* w = params.get() + ti.offset;
        const std::string& n = ti.name;
        if (ends_with(n, "ln_1.weight") || ends_with(n, "ln_2.weight") || n == "ln_f.weight" ||
            ends_with(n, "norm.weight")) {
            for (size_t i = 0; i < ti.size; i++) w[i] = 1.0f;
        } else if (ti.shape.size() == 2) {
            const bool resid = ends_with(n, "c_proj.weight") || ends_with(n, "o_proj.weight") ||
                               ends_with(n, "down_proj.weight");
            float std = resid ? resid_std : 0.02f;
            #pragma omp parallel for schedule(static)
            for (size_t i = 0; i < ti.size; i++) w[i] = std * normal_at(seed, t, i);
        }  // biases and LayerNorm biases stay 0
    }
}

void Model::zero_grad() { std::memset(grads.get(), 0, layout.total * sizeof(float)); }

int get_num_threads() { return omp_get_max_threads(); }
void set_num_threads(int n) { omp_set_num_threads(n); }

}  // namespace cllm
