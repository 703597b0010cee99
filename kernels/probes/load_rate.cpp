// How fast this CPU feeds vpdpbusd from memory, by working-set size: the rate that bounds the 1×4 INT8
// kernel's products (each non-zero block costs one 64-byte activation load per 16 input rows).
// Prints a markdown table of billions per second on one core. No OpenVINO, no vitsparse library:
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512vnni kernels/probes/load_rate.cpp -o /tmp/load_rate
//   /tmp/load_rate [iterations, default 20000000]
//
// Every buffer is written before it is read: pages never written all map to one zero page, and AMD's
// L1 then treats the virtual copies of each line as aliases that evict each other (a 16 KiB buffer
// read at L2 speed). The last row shows that case.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double billions_per_second(long operations, Clock::time_point start) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return static_cast<double>(operations) / seconds / 1e9;
}

// 8 zmm loads of consecutive lines per iteration, cycling through `bytes` (a power of two, ≥ 512).
double plain_loads(const char* buffer, long bytes, long iterations) {
    const auto start = Clock::now();
    for (long i = 0; i < iterations; ++i) {
        const char* p = buffer + ((i * 512) & (bytes - 1));
        asm volatile(
            "vmovdqa64 0(%0), %%zmm0\n\t vmovdqa64 64(%0), %%zmm1\n\t vmovdqa64 128(%0), %%zmm2\n\t"
            "vmovdqa64 192(%0), %%zmm3\n\t vmovdqa64 256(%0), %%zmm4\n\t vmovdqa64 320(%0), %%zmm5\n\t"
            "vmovdqa64 384(%0), %%zmm6\n\t vmovdqa64 448(%0), %%zmm7\n\t"
            :: "r"(p) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "memory");
    }
    return billions_per_second(iterations * 8, start);
}

// 8 vpdpbusd per iteration, each fed by a 64-byte load of a consecutive line, into 8 independent
// accumulators. Random: each iteration starts at the next of `offsets` (a power-of-two count) instead
// of 512 bytes after the last.
template <bool Random>
double fed_dot_products(const char* buffer, long bytes, long iterations, const std::vector<long>& offsets) {
    const long mask = static_cast<long>(offsets.size()) - 1;
    const auto start = Clock::now();
    for (long i = 0; i < iterations; ++i) {
        const char* p = buffer + (Random ? offsets[i & mask] : (i * 512) & (bytes - 1));
        asm volatile(
            "vpdpbusd 0(%0), %%zmm16, %%zmm0\n\t vpdpbusd 64(%0), %%zmm16, %%zmm1\n\t"
            "vpdpbusd 128(%0), %%zmm16, %%zmm2\n\t vpdpbusd 192(%0), %%zmm16, %%zmm3\n\t"
            "vpdpbusd 256(%0), %%zmm16, %%zmm4\n\t vpdpbusd 320(%0), %%zmm16, %%zmm5\n\t"
            "vpdpbusd 384(%0), %%zmm16, %%zmm6\n\t vpdpbusd 448(%0), %%zmm16, %%zmm7\n\t"
            :: "r"(p) : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "memory");
    }
    return billions_per_second(iterations * 8, start);
}

// vpdpbusd on registers only, 8 independent accumulators: the rate a dense GEMM can reach.
double register_dot_products(long iterations) {
    const auto start = Clock::now();
    for (long i = 0; i < iterations; ++i) {
        asm volatile(
            "vpdpbusd %%zmm17, %%zmm16, %%zmm0\n\t vpdpbusd %%zmm17, %%zmm16, %%zmm1\n\t"
            "vpdpbusd %%zmm17, %%zmm16, %%zmm2\n\t vpdpbusd %%zmm17, %%zmm16, %%zmm3\n\t"
            "vpdpbusd %%zmm17, %%zmm16, %%zmm4\n\t vpdpbusd %%zmm17, %%zmm16, %%zmm5\n\t"
            "vpdpbusd %%zmm17, %%zmm16, %%zmm6\n\t vpdpbusd %%zmm17, %%zmm16, %%zmm7\n\t"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7");
    }
    return billions_per_second(iterations * 8, start);
}

// Random 512-byte-aligned starts inside `bytes`, as a sparse row's block columns land.
std::vector<long> random_offsets(long bytes) {
    std::mt19937 rng(0);
    std::vector<long> offsets(4096);
    for (long& offset : offsets) offset = static_cast<long>(rng() % static_cast<unsigned>(bytes / 512)) * 512;
    return offsets;
}

char* allocate(long bytes, bool written) {
    auto* buffer = static_cast<char*>(std::aligned_alloc(4096, static_cast<std::size_t>(bytes)));
    if (buffer == nullptr) std::exit(1);
    if (written) {
        for (long i = 0; i < bytes; ++i) buffer[i] = static_cast<char>(i * 7 + 1);
    }
    return buffer;
}

void report_row(const char* label, long bytes, bool written, long iterations) {
    // large enough that the allocator maps fresh pages, so an unwritten buffer really is untouched
    char* buffer = allocate(std::max(bytes, 1L << 22), written);
    const double loads = plain_loads(buffer, bytes, iterations);
    const std::vector<long> offsets = random_offsets(bytes);
    const double fed = fed_dot_products<false>(buffer, bytes, iterations, offsets);
    const double scattered = fed_dot_products<true>(buffer, bytes, iterations, offsets);
    std::printf("| %s | %.2f | %.2f | %.2f |\n", label, loads, fed, scattered);
    std::free(buffer);
}

}  // namespace

int main(int argc, char** argv) {
    const long iterations = argc > 1 ? std::atol(argv[1]) : 20000000;
    if (iterations <= 0) {
        std::fprintf(stderr, "usage: %s [iterations > 0]\n", argv[0]);
        return 2;
    }
    std::printf("vpdpbusd on registers: %.2f G/s\n\n", register_dot_products(iterations));
    std::printf("| working set | zmm loads G/s | load-fed vpdpbusd G/s | same, random lines G/s |\n");
    std::printf("|---|---|---|---|\n");
    const long sizes[] = {4L << 10, 16L << 10, 32L << 10, 64L << 10, 256L << 10, 1L << 20};
    for (long bytes : sizes) {
        char label[48];
        std::snprintf(label, sizeof label, "%ld KiB", bytes >> 10);
        report_row(label, bytes, true, iterations);
    }
    report_row("16 KiB, never written", 16L << 10, false, iterations);
    return 0;
}
