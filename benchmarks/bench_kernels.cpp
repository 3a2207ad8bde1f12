// cllm_bench_kernels: times every kernel of one training step, forward and backward, on a model config's
// shapes, through the public declarations in csrc/cllm.h only.
//
//   cllm_bench_kernels [tiny|small|gpt2] [threads] [--reps N] [--min-time S] [--filter SUBSTR]
//
// One line per kernel: name, shape, median time per call over the timed reps (after one warmup call),
// and the rate: GFLOP/s for compute-bound kernels (matmuls, attention, the whole model step) or GB/s for
// memory-bound ones (LayerNorm, GELU, cross-entropy, embedding, AdamW). What each rate counts is stated
// next to the kernel below and in benchmarks/README.md.
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cllm.h"
#include "isa.h"

namespace {

struct BenchConfig {
    const char* name;
    int V, T, C, L, H, B;
};

// The same configs as python/cllm/bench.py (ff_dim = 4C throughout).
const BenchConfig kConfigs[] = {
    {"tiny", 256, 128, 128, 4, 4, 16},
    {"small", 8192, 256, 384, 6, 6, 8},
    {"gpt2", 50257, 256, 768, 12, 12, 4},
};

// Deterministic fill: uniform in [-scale, scale], no <random> so every platform fills the same values.
void fill(float* x, size_t n, float scale, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = scale * ((float)(s >> 40) / (float)(1ULL << 24) * 2.0f - 1.0f);
    }
}

struct Buf {
    cllm::FloatBuffer p;
    size_t n;
    explicit Buf(size_t n_, float scale = 1.0f, uint64_t seed = 1) : p(cllm::alloc_floats(n_)), n(n_) {
        fill(p.get(), n, scale, seed);
    }
    float* get() { return p.get(); }
    operator float*() { return p.get(); }
};

struct Options {
    int reps = 0;          // 0: adaptive (at least 3, until min_time has passed, at most 200)
    double min_time = 0.3; // seconds of timed calls per kernel in adaptive mode
    std::string filter;
    bool bf16 = false;     // --bf16: the products (linear layers, head, attention, model) with bf16 inputs
};
Options g_opt;

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Timing {
    double median, min;  // seconds per call
    int reps;
    double other_cores;  // cores other processes kept busy meanwhile (-1: unknown)
};

// CPU-seconds every process on the machine has spent busy (/proc/stat), or -1 where there is no such file.
double machine_busy_seconds() {
    std::FILE* f = std::fopen("/proc/stat", "r");
    if (!f) return -1.0;
    unsigned long long v[8] = {0};
    int got = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                          &v[6], &v[7]);
    std::fclose(f);
    if (got != 8) return -1.0;
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    return (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)sysconf(_SC_CLK_TCK);
}

double own_cpu_seconds() {
    rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + 1e-6 * (r.ru_utime.tv_usec + r.ru_stime.tv_usec);
}

// Seconds per call of `run`; `setup` (untimed) restores inputs a kernel overwrites in place.
Timing time_kernel(const std::function<void()>& run, const std::function<void()>& setup) {
    if (setup) setup();
    run();  // warmup: first touch of pages, thread pool start, scratch growth
    std::vector<double> times;
    const double start = now(), busy0 = machine_busy_seconds(), cpu0 = own_cpu_seconds();
    for (;;) {
        if (setup) setup();
        double t0 = now();
        run();
        times.push_back(now() - t0);
        int n = (int)times.size();
        if (g_opt.reps > 0) {
            if (n >= g_opt.reps) break;
        } else if ((n >= 3 && now() - start >= g_opt.min_time) || n >= 200) {
            break;
        }
    }
    const double wall = now() - start, busy1 = machine_busy_seconds(), cpu1 = own_cpu_seconds();
    // clock ticks are coarse (10 ms): only meaningful over runs of a good fraction of a second
    double other = busy0 < 0 || busy1 < 0 ? -1.0 : std::max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / wall);
    std::sort(times.begin(), times.end());
    size_t n = times.size();
    double median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
    return {median, times[0], (int)n, other};
}

// Other processes on the machine distort the timings (an OpenMP barrier waits for a descheduled thread),
// so the 1-minute load average is printed before and after the run.
std::string loadavg() {
    std::FILE* f = std::fopen("/proc/loadavg", "r");
    if (!f) return "n/a";
    char buf[128] = {0};
    std::string s = std::fgets(buf, sizeof buf, f) ? std::string(buf) : std::string("n/a");
    std::fclose(f);
    return s.substr(0, s.find(' '));
}

enum class Unit { GFLOPS, GBS };

void report(const std::string& name, const std::string& shape, const std::function<void()>& run, double work,
            Unit unit, const std::function<void()>& setup = nullptr) {
    if (!g_opt.filter.empty() && name.find(g_opt.filter) == std::string::npos) return;
    Timing t = time_kernel(run, setup);
    // The rate is that of the median call; the fastest call shows how much other load on the machine cost.
    char other[16] = "-";
    if (t.other_cores >= 0) std::snprintf(other, sizeof other, "%.2f", t.other_cores);
    std::printf("%-28s %-34s %10.3f ms %9.2f %-7s %10.3f ms %4d %6s\n", name.c_str(), shape.c_str(),
                t.median * 1e3, work / t.median / 1e9, unit == Unit::GFLOPS ? "GFLOP/s" : "GB/s", t.min * 1e3, t.reps,
                other);
    std::fflush(stdout);
}

// The machine's ceiling: every thread runs the core's peak probes (isa.h: 12 independent chains of vector FMAs, or
// of AVX-512 BF16 dot products, registers only). Matmul rates are read against these.
constexpr long PEAK_ITERS = 1 << 22;
void peak_fp32() {
    #pragma omp parallel
    cllm::peak_fp32_chains(PEAK_ITERS);
}
void peak_bf16() {
    #pragma omp parallel
    cllm::peak_bf16_chains(PEAK_ITERS);
}

// The GEMMs of one linear layer out[N,OC] = inp[N,IC] @ w[IC,OC] + b, as the model calls them:
// forward (NN + bias), and the two backward products: dinp = dout @ w^T (NT), dw += inp^T @ dout (TN).
void bench_linear(const std::string& name, int N, int IC, int OC) {
    Buf inp((size_t)N * IC, 1.0f, 11), w((size_t)IC * OC, 0.02f, 12), b(OC, 0.02f, 13);
    Buf out((size_t)N * OC), dout((size_t)N * OC, 1e-3f, 14), dinp((size_t)N * IC), dw((size_t)IC * OC),
        db(OC);
    const double flops = 2.0 * N * IC * OC;
    const std::string s = "N=" + std::to_string(N) + " IC=" + std::to_string(IC) + " OC=" + std::to_string(OC);
    report(name + ".fwd", s, [&] { cllm::linear_forward(out, inp, w, b, N, IC, OC, g_opt.bf16); }, flops, Unit::GFLOPS);
    report(name + ".bwd_dinp[NT]", s,
           [&] {
               cllm::gemm({.c = dinp, .ldc = IC, .a = {dout, OC}, .b = {w, OC, true}, .m = N, .n = IC, .k = OC,
                           .bf16 = g_opt.bf16});
           },
           flops, Unit::GFLOPS);
    report(name + ".bwd_dw[TN]", s,
           [&] {
               cllm::gemm({.c = dw, .ldc = OC, .a = {inp, IC, true}, .b = {dout, OC}, .m = IC, .n = OC, .k = N,
                           .accumulate = true, .bf16 = g_opt.bf16});
           },
           flops, Unit::GFLOPS);
    report(name + ".bwd", s,
           [&] { cllm::linear_backward(dinp, dw, db, dout, inp, w, N, IC, OC, false, g_opt.bf16); }, 2 * flops,
           Unit::GFLOPS);
}

int run_config(const BenchConfig& c, int threads) {
    const int V = c.V, T = c.T, C = c.C, L = c.L, H = c.H, B = c.B, F = 4 * C;
    const int N = B * T;
    omp_set_num_threads(threads);
    std::printf("# cllm_bench_kernels config=%s V=%d T=%d C=%d L=%d H=%d F=%d B=%d (N=B*T=%d) threads=%d%s\n",
                c.name, V, T, C, L, H, F, B, N, threads, g_opt.bf16 ? " bf16" : "");
    const cllm::IsaInfo isa = cllm::isa_info();
    std::printf("# kernels: %s (%s)\n", isa.selected.empty() ? "none" : isa.selected.c_str(), isa.reason.c_str());
    std::printf("# load average (1 min) at start: %s\n", loadavg().c_str());
    std::printf("# median time per call after 1 warmup call; %s\n",
                g_opt.reps > 0 ? ("reps=" + std::to_string(g_opt.reps)).c_str()
                               : "reps: >=3 until 0.3 s, at most 200");
    std::printf("# other = cores kept busy by other processes while this kernel ran: above ~0.2 its numbers are "
                "low\n");
    std::printf("%-28s %-34s %13s %17s %13s %4s %6s\n", "kernel", "shape", "median", "rate (median)", "min", "reps",
                "other");

    if (cllm::peak_fp32_lanes() > 0)
        report("peak.fp32_fma", std::to_string(cllm::peak_fp32_lanes()) + " lanes x 12 chains x threads", peak_fp32,
               cllm::peak_fp32_flops(PEAK_ITERS) * threads, Unit::GFLOPS);
    if (cllm::has_bf16_dot())
        report("peak.bf16_dot", "vdpbf16ps x 12 chains x threads", peak_bf16, cllm::peak_bf16_flops(PEAK_ITERS) * threads,
               Unit::GFLOPS);

    // ---- linear layers of one block (x L in a step), then the tied LM head ----
    bench_linear("attn.c_attn", N, C, 3 * C);
    bench_linear("attn.c_proj", N, C, C);
    bench_linear("mlp.c_fc", N, C, F);
    bench_linear("mlp.c_proj", N, F, C);
    {
        Buf lnf((size_t)N * C, 1.0f, 21), wte((size_t)V * C, 0.02f, 22), logits((size_t)N * V, 1e-3f, 23),
            dln((size_t)N * C), dwte((size_t)V * C);
        const double flops = 2.0 * N * V * C;
        const std::string s = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " V=" + std::to_string(V);
        report("lm_head.fwd[NT]", s,  // logits = lnf wte^T
               [&] {
                   cllm::gemm({.c = logits, .ldc = V, .a = {lnf, C}, .b = {wte, C, true}, .m = N, .n = V, .k = C,
                               .bf16 = g_opt.bf16});
               },
               flops, Unit::GFLOPS);
        report("lm_head.bwd_dx[NN]", s,  // dln = dlogits wte
               [&] {
                   cllm::gemm({.c = dln, .ldc = C, .a = {logits, V}, .b = {wte, C}, .m = N, .n = C, .k = V,
                               .bf16 = g_opt.bf16});
               },
               flops, Unit::GFLOPS);
        report("lm_head.bwd_dwte[TN]", s,  // dwte += dlogits^T lnf
               [&] {
                   cllm::gemm({.c = dwte, .ldc = C, .a = {logits, V, true}, .b = {lnf, C}, .m = V, .n = C, .k = N,
                               .accumulate = true, .bf16 = g_opt.bf16});
               },
               flops, Unit::GFLOPS);
    }

    // ---- attention: causal, so each of QK^T and PV costs 2*hs*T(T+1)/2 per (b, h) ----
    {
        Buf qkv((size_t)N * 3 * C, 1.0f, 31), out((size_t)N * C), lse((size_t)B * H * T),
            dout((size_t)N * C, 1e-3f, 32), dqkv((size_t)N * 3 * C);
        cllm::Dropout nodrop;
        const double fwd_flops = 2.0 * B * C * (double)T * (T + 1);  // QK^T + PV over the causal triangle
        const std::string s = "B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
                              " H=" + std::to_string(H);
        report("attention.fwd", s, [&] { cllm::attention_forward(out, lse, qkv, B, T, C, H, H, nodrop, 0, g_opt.bf16); },
               fwd_flops, Unit::GFLOPS);
        // backward: dV, dP, dQ, dK products = 2x the forward (the recomputed QK^T is not counted)
        report("attention.bwd", s,
               [&] { cllm::attention_backward(dqkv, dout, qkv, out, lse, B, T, C, H, H, nodrop, 0, g_opt.bf16); },
               2 * fwd_flops, Unit::GFLOPS);
    }

    // ---- memory-bound kernels: GB/s counts each float read or written once (4 bytes) ----
    {
        Buf x((size_t)N * C, 1.0f, 41), w(C, 1.0f, 42), b(C, 0.1f, 43), out((size_t)N * C), mean(N), rstd(N),
            dout((size_t)N * C, 1e-3f, 44), dx((size_t)N * C), dw(C), db(C);
        const std::string s = "N=" + std::to_string(N) + " C=" + std::to_string(C);
        cllm::layernorm_forward(out, mean, rstd, x, w, b, N, C);
        // fwd: read x, write out (+ mean, rstd)
        report("layernorm.fwd", s, [&] { cllm::layernorm_forward(out, mean, rstd, x, w, b, N, C); },
               4.0 * (2.0 * N * C + 2.0 * N), Unit::GBS);
        // bwd: read dout, x; read+write dx (accumulated)
        report("layernorm.bwd", s,
               [&] { cllm::layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C); },
               4.0 * (4.0 * N * C + 2.0 * N), Unit::GBS);
    }
    {
        const size_t n = (size_t)N * F;
        Buf x(n, 2.0f, 51), out(n), dout(n, 1e-3f, 52), dx(n);
        const std::string s = "n=N*F=" + std::to_string(n);
        report("gelu.fwd", s, [&] { cllm::gelu_forward(out, x, n); }, 4.0 * 2 * n, Unit::GBS);       // read x, write
        report("gelu.bwd", s, [&] { cllm::gelu_backward(dx, dout, x, n); }, 4.0 * 3 * n, Unit::GBS); // dout, x, dx
    }
    {
        Buf logits((size_t)N * V, 3.0f, 61), work((size_t)N * V), losses(N);
        std::vector<int32_t> targets(N);
        for (int i = 0; i < N; i++) targets[i] = (int32_t)(((uint64_t)i * 2654435761ULL) % (uint64_t)V);
        const size_t bytes = (size_t)N * V * sizeof(float);
        const std::string s = "N=" + std::to_string(N) + " V=" + std::to_string(V);
        // in place over the logits: restore them (untimed) before each call; counts read + write of N*V
        report("cross_entropy.fused", s,
               [&] { cllm::cross_entropy_fused(losses, work, targets.data(), N, V, 1.0f / N); }, 2.0 * bytes,
               Unit::GBS, [&] { std::memcpy(work.get(), logits.get(), bytes); });
    }
    {
        Buf wte((size_t)V * C, 0.02f, 71), wpe((size_t)T * C, 0.02f, 72), out((size_t)N * C),
            dout((size_t)N * C, 1e-3f, 73), dwte((size_t)V * C), dwpe((size_t)T * C);
        std::vector<int32_t> tokens(N);
        for (int i = 0; i < N; i++) tokens[i] = (int32_t)(((uint64_t)i * 40503ULL + 7) % (uint64_t)V);
        const std::string s = "B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C);
        // fwd: read a wte row + a wpe row, write out, per token; bwd: read dout, read+write dwte and dwpe rows
        report("embedding.fwd", s, [&] { cllm::embedding_forward(out, tokens.data(), wte, wpe, B, T, C); },
               4.0 * 3 * N * C, Unit::GBS);
        report("embedding.bwd", s, [&] { cllm::embedding_backward(dwte, dwpe, dout, tokens.data(), B, T, C); },
               4.0 * 5 * N * C, Unit::GBS);
    }

    // ---- optimizer over a buffer of the model's size ----
    {
        cllm::Config mc;
        mc.vocab_size = V, mc.max_seq_len = T, mc.embedding_dim = C, mc.num_layers = L, mc.num_heads = H,
        mc.ff_dim = F;
        cllm::ParamLayout layout(mc);
        const size_t n = layout.total;
        Buf params(n, 0.02f, 81), grads(n, 1e-3f, 82), m(n), v(n);
        const std::string s = "params=" + std::to_string(n);
        int64_t step = 0;
        // read p, g, m, v; write p, m, v
        report("adamw.step", s,
               [&] { cllm::adamw_step(params, grads, m, v, layout, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, ++step); },
               4.0 * 7 * n, Unit::GBS);
        report("grad_norm", s, [&] { volatile double r = cllm::grad_norm(grads, n); (void)r; }, 4.0 * n, Unit::GBS);
    }

    // ---- the whole model: forward + loss + backward of one step (what the kernels above add up to) ----
    {
        cllm::Config mc;
        mc.vocab_size = V, mc.max_seq_len = T, mc.embedding_dim = C, mc.num_layers = L, mc.num_heads = H,
        mc.ff_dim = F;
        mc.bf16 = g_opt.bf16;
        cllm::Model model(mc, 0);
        std::vector<int32_t> x(N), y(N);
        for (int i = 0; i < N; i++) {
            x[i] = (int32_t)(((uint64_t)i * 2654435761ULL + 3) % (uint64_t)V);
            y[i] = (int32_t)(((uint64_t)(i + 1) * 2654435761ULL + 3) % (uint64_t)V);
        }
        // 6*N + 6*L*T*C per token, N = parameters without the position table (same formula as bench.py)
        double n_params = 0.0;
        for (const cllm::TensorInfo& t : model.layout.tensors)
            if (t.name != "wpe") n_params += (double)t.size;
        const double flops = (6.0 * n_params + 6.0 * L * (double)T * C) * N;
        report("model.forward_backward", "B=" + std::to_string(B) + " T=" + std::to_string(T),
               [&] { model.forward_backward(x.data(), y.data(), B, T, false, 1.0f); }, flops, Unit::GFLOPS);
    }
    std::printf("# load average (1 min) at end: %s\n", loadavg().c_str());
    return 0;
}

int usage(const char* argv0) {
    std::fprintf(stderr,
                 "usage: %s [tiny|small|gpt2] [threads] [--reps N] [--min-time SECONDS] [--filter SUBSTRING] [--bf16]\n"
                 "  times each CLLM kernel (forward and backward) on the config's shapes; defaults: tiny, all "
                 "cores;\n  --bf16: the products with bf16 inputs (precision bf16)\n",
                 argv0);
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    std::string config = "tiny";
    int threads = omp_get_max_threads();
    int positional = 0;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&](const char* what) -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(std::string(what) + " needs a value");
            return argv[++i];
        };
        try {
            if (a == "-h" || a == "--help") {
                usage(argv[0]);
                return 0;
            }
            if (a == "--reps") g_opt.reps = std::stoi(value("--reps"));
            else if (a == "--min-time") g_opt.min_time = std::stod(value("--min-time"));
            else if (a == "--filter") g_opt.filter = value("--filter");
            else if (a == "--bf16") g_opt.bf16 = true;
            else if (!a.empty() && a[0] == '-') {
                std::fprintf(stderr, "unknown option %s\n", a.c_str());
                return usage(argv[0]);
            } else if (positional == 0) config = a, positional++;
            else if (positional == 1) threads = std::stoi(a), positional++;
            else return usage(argv[0]);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "bad argument %s: %s\n", a.c_str(), e.what());
            return usage(argv[0]);
        }
    }
    if (threads < 1) {
        std::fprintf(stderr, "threads must be >= 1, got %d\n", threads);
        return 2;
    }
    for (const BenchConfig& c : kConfigs)
        if (config == c.name) return run_config(c, threads);
    std::fprintf(stderr, "unknown config '%s' (tiny, small or gpt2)\n", config.c_str());
    return usage(argv[0]);
}
