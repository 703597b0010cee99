// One-core timings of the INT8 kernels on random 1×4-block weights, outside OpenVINO: what the results
// pages call "the harness". Built on demand from the extension's build folder (make install made it):
//
//   cmake --build .venv/lib/vitsparse/build --target kernel_time
//   .venv/lib/vitsparse/build/kernel_time linear K M N DENSITY [CALLS] [--cold] [--heads H] [--bf16]
//                                            [--codes] [--norm]
//   .venv/lib/vitsparse/build/kernel_time mlp N DENSITY [CALLS] [--cold] [--bf16] [--norm]
//
// linear: x [N, K] times a [M, K] weight; mlp: DeiT-S's MLP (384 → 1536 → 384, the fused SparseMLP
// kernel). DENSITY is the share of non-zero 1×4 blocks. --cold evicts the caches (writes 16 MiB) before
// every call, as a layer inside a model meets them. --heads H times the linear as attention's qkv (one
// batch item of N tokens) writing q, kᵀ and v for H heads. --bf16 reads x and writes y as bfloat16.
// --codes writes y as int8 codes (the std::int8_t overloads); --norm reads x through a LayerNorm.
// Prints the median and fastest of CALLS (default 50).
// VITSPARSE_KERNEL_ISA=scalar|avx2|avxvnni|avx512 caps the instruction set, as it does in the engine.
#include <vitsparse_kernels.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// A random INT8 weight in the kernels' 1×4-block format, and the arrays it points into.
struct RandomBlocks {
    std::vector<std::int32_t> row_ptr{0}, block_col, row_sums;
    std::vector<std::int8_t> values;
    std::vector<float> scale, bias;
    vitsparse::Int8Blocks blocks;

    RandomBlocks(std::int64_t cols, std::int64_t rows, double density, std::mt19937& rng) {
        std::uniform_real_distribution<double> uniform(0.0, 1.0);
        for (std::int64_t m = 0; m < rows; ++m) {
            std::int32_t sum = 0;
            for (std::int64_t group = 0; group < (cols + 3) / 4; ++group) {
                if (uniform(rng) >= density) continue;
                block_col.push_back(static_cast<std::int32_t>(group));
                for (int i = 0; i < 4; ++i) {
                    const auto code = static_cast<std::int8_t>(static_cast<int>(rng() % 255) - 127);
                    values.push_back(4 * group + i < cols ? code : 0);
                    sum += values.back();
                }
            }
            row_ptr.push_back(static_cast<std::int32_t>(block_col.size()));
            row_sums.push_back(sum);
        }
        scale.assign(rows, 1e-4f);
        bias.assign(rows, 0.0f);
        blocks.rows = rows;
        blocks.cols = cols;
        blocks.row_ptr = row_ptr.data();
        blocks.block_col = block_col.data();
        blocks.values = values.data();
        blocks.row_sums = row_sums.data();
        blocks.scale = scale.data();
        blocks.bias = bias.data();
    }
};

[[noreturn]] void usage(const char* why) {
    std::fprintf(stderr, "kernel_time: %s\nusage: kernel_time linear K M N DENSITY [CALLS] [--cold] [--heads H] "
                         "[--bf16] [--codes] [--norm]\n       kernel_time mlp N DENSITY [CALLS] [--cold] [--bf16] "
                         "[--norm]\n", why);
    std::exit(2);
}

long positive(const char* text, const char* what) {
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || value < 1) usage((std::string(what) + " must be a positive integer").c_str());
    return value;
}

double density_of(const char* text) {
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(value > 0.0 && value <= 1.0)) usage("DENSITY must be in (0, 1]");
    return value;
}

// x's floats as T: themselves, or cut to bfloat16 (the time does not depend on how they round).
template <typename T>
std::vector<T> values_as(const std::vector<float>& x) {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        std::vector<T> out(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) {
            std::uint32_t bits;
            std::memcpy(&bits, &x[i], 4);
            out[i].bits = static_cast<std::uint16_t>(bits >> 16);
        }
        return out;
    }
}

// Median and fastest of `calls` timed calls of `run`, in ms, evicting the caches first when `cold`.
template <typename Run>
void time_calls(const char* label, long calls, bool cold, Run run) {
    std::vector<char> evict(cold ? 16 << 20 : 0, 1);
    run();  // the kernels' per-thread workspace is allocated on the first call
    std::vector<double> ms;
    for (long i = 0; i < calls; ++i) {
        for (std::size_t b = 0; b < evict.size(); b += 64) evict[b] = static_cast<char>(evict[b] + 1);
        const auto start = std::chrono::steady_clock::now();
        run();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("%s: median %.3f ms, fastest %.3f ms (%ld calls, one thread, %s caches, %s)\n", label,
                ms[ms.size() / 2], ms.front(), calls, cold ? "cold" : "hot", vitsparse::isa_name(vitsparse::selected_isa()));
}

// Whether `flag` is among args, which then no longer holds it.
bool take_flag(std::vector<std::string>& args, const char* flag) {
    const auto size = args.size();
    args.erase(std::remove(args.begin(), args.end(), flag), args.end());
    return args.size() != size;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    const bool cold = take_flag(args, "--cold");
    const bool bf16 = take_flag(args, "--bf16");  // x and y as Bf16
    const bool codes = take_flag(args, "--codes");  // y as int8 codes
    const bool norm = take_flag(args, "--norm");  // x through a LayerNorm (gamma 1, beta 0)
    long heads = 0;  // --heads H: the linear is attention's qkv over one batch item, split into H heads
    if (auto at = std::find(args.begin(), args.end(), "--heads"); at != args.end() && at + 1 != args.end()) {
        heads = positive((at + 1)->c_str(), "H");
        args.erase(at, at + 2);
    }
    if (args.empty()) usage("name a kernel: linear or mlp");
    const bool mlp = args[0] == "mlp";
    if (!mlp && args[0] != "linear") usage(("unknown kernel " + args[0]).c_str());
    const std::size_t needed = mlp ? 3 : 5;
    if (args.size() < needed || args.size() > needed + 1) usage("wrong number of arguments");
    const long calls = args.size() > needed ? positive(args[needed].c_str(), "CALLS") : 50;
    std::mt19937 rng(0);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    const vitsparse::ParallelFor one_thread = vitsparse::serial_for();
    const vitsparse::Isa isa = vitsparse::selected_isa();
    const long k = mlp ? 384 : positive(args[1].c_str(), "K");
    const std::vector<float> gamma(static_cast<std::size_t>(k), 1.0f), beta(static_cast<std::size_t>(k), 0.0f);
    const vitsparse::LayerNorm layer_norm = norm ? vitsparse::LayerNorm{gamma.data(), beta.data(), 1e-6f}
                                                 : vitsparse::LayerNorm{};
    const std::string extras = std::string(bf16 ? ", bf16" : "") + (codes ? ", int8 codes" : "") +
                               (norm ? ", LayerNorm" : "");
    char label[200];
    if (mlp) {
        const long n = positive(args[1].c_str(), "N");
        const double density = density_of(args[2].c_str());
        RandomBlocks fc1(384, 1536, density, rng), fc2(1536, 384, density, rng);
        std::vector<std::uint8_t> table(1536 * 256);
        for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::uint8_t>(i % 256);
        if (codes) usage("--codes is for linear");
        fc1.blocks.norm = layer_norm;
        vitsparse::Int8Mlp layers{fc1.blocks, 0.05f, 128, table.data(), 0, fc2.blocks};
        std::vector<float> x(static_cast<std::size_t>(n) * 384);
        for (float& value : x) value = uniform(rng);
        std::snprintf(label, sizeof label, "mlp 384-1536-384 N%ld density %.2f%s", n, density, extras.c_str());
        auto time_mlp = [&](auto element) {
            using T = decltype(element);
            std::vector<T> xs = values_as<T>(x), y(static_cast<std::size_t>(n) * 384);
            time_calls(label, calls, cold, [&] {
                vitsparse::sparse_mlp_int8(layers, xs.data(), n, 384, 0.01f, 128, y.data(), isa, one_thread);
            });
        };
        bf16 ? time_mlp(vitsparse::Bf16{}) : time_mlp(0.0f);
        return 0;
    }
    const long m = positive(args[2].c_str(), "M");
    const long n = positive(args[3].c_str(), "N");
    const double density = density_of(args[4].c_str());
    RandomBlocks weight(k, m, density, rng);
    weight.blocks.heads = heads;
    weight.blocks.tokens = n;
    weight.blocks.norm = layer_norm;
    weight.blocks.out_scale = codes ? 0.05f : 0.0f;
    weight.blocks.out_zero_point = codes ? 128 : 0;
    if (const std::string problem = vitsparse::check_heads(weight.blocks); !problem.empty()) usage(problem.c_str());
    std::vector<float> x(static_cast<std::size_t>(n) * k);
    for (float& value : x) value = uniform(rng);
    std::snprintf(label, sizeof label, "linear K%ld M%ld N%ld density %.2f%s%s", k, m, n, density,
                  heads ? (", " + std::to_string(heads) + " heads").c_str() : "", extras.c_str());
    auto time_linear = [&](auto input, auto output) {
        std::vector<decltype(input)> xs = values_as<decltype(input)>(x);
        std::vector<decltype(output)> y(static_cast<std::size_t>(n) * m);
        time_calls(label, calls, cold, [&] {
            vitsparse::sparse_linear_int8(weight.blocks, xs.data(), n, k, 0.01f, 128, y.data(), isa, one_thread);
        });
    };
    if (codes) {
        bf16 ? time_linear(vitsparse::Bf16{}, std::int8_t{}) : time_linear(0.0f, std::int8_t{});
    } else {
        bf16 ? time_linear(vitsparse::Bf16{}, vitsparse::Bf16{}) : time_linear(0.0f, 0.0f);
    }
    return 0;
}
