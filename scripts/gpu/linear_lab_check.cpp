// linear_lab.cu's lab_rows32_w, lab_rows32_s and lab_g (wgmma) prototypes on the CPU, in the fused kernels' emulator (no GPU needed):
// against a double-precision product of the same bf16 inputs, at shapes that leave partial blocks of w,
// partial chunks of k, fewer than 32 rows of x, and k in 1 to 4 splits. Build and run from the repo root:
//   g++ -std=c++20 -O1 -pthread -ffp-contract=off -Wno-unknown-pragmas -Immreg-engine/csrc -Iscripts/gpu \
//       -o /tmp/linear_lab_check scripts/gpu/linear_lab_check.cpp && /tmp/linear_lab_check
#include "kernel_emulator.cpp"
#include "linear_lab.cu"

#include <cstdio>
#include <random>

// y from `run(y, x, w, partial)` against the exact product: the count of outputs off by more than a bf16
// rounding (relative 2^-7, plus a little for the f32 sums' order). Runs twice, the second time into a
// poisoned y, so that the arrival counts must have been reset.
template <typename Run>
int mismatches(const char* name, int m, long long n, long long k, int splits, Run run) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<u16> x(m * k), w(n * k), y(m * n);
  for (auto& v : x) v = BF16::store(normal(rng));
  for (auto& v : w) v = BF16::store(normal(rng) * 0.05f);
  std::vector<float> partial(splits * m * n, 0.0f);
  int bad = 0;
  for (int pass = 0; pass < 2; ++pass) {
    std::fill(y.begin(), y.end(), BF16::store(1e4f));
    run(y.data(), x.data(), w.data(), partial.data());
    for (int r = 0; r < m; ++r) {
      for (long long o = 0; o < n; ++o) {
        double sum = 0.0;
        for (long long i = 0; i < k; ++i) sum += (double)BF16::load(x[r * k + i]) * BF16::load(w[o * k + i]);
        const double got = BF16::load(y[r * n + o]);
        if (std::fabs(got - sum) > std::fabs(sum) / 128 + 1e-3) {
          if (bad++ < 3) std::printf("  pass %d, row %d, output %lld: %g, exact %g\n", pass, r, o, got, sum);
        }
      }
    }
  }
  std::printf("%s m=%d n=%lld k=%lld, %d splits: %d of %lld outputs off\n", name, m, n, k, splits, bad, 2 * m * n);
  return bad;
}

// lab_rows32_w<U> on ceil(n / 128) × splits blocks.
template <int U>
int rows32_w(int m, long long n, long long k, int splits) {
  const unsigned grid = (unsigned)((n + 127) / 128 * splits);
  char name[32];
  std::snprintf(name, sizeof(name), "lab_rows32_w<%d>", U);
  return mismatches(name, m, n, k, splits, [&](u16* y, const u16* x, const u16* w, float* partial) {
    mmreg_emulator::launch(grid, 1, 256, [&] { lab_rows32_w<U>(y, x, w, partial, m, n, k, splits); });
  });
}

// lab_rows32_s<R, W, K, S> on `grid` blocks (fewer than its items: each block takes several).
template <int R, int W, int K, int S>
int rows32_s(int m, long long n, long long k, int splits, unsigned grid) {
  char name[48];
  std::snprintf(name, sizeof(name), "lab_rows32_s<%d, %d, %d, %d> (%u blocks)", R, W, K, S, grid);
  return mismatches(name, m, n, k, splits, [&](u16* y, const u16* x, const u16* w, float* partial) {
    mmreg_emulator::launch(grid, 1, R / W * 32,
                           [&] { lab_rows32_s<R, W, K, S, false>(y, x, w, partial, m, n, k, splits); });
  });
}

// lab_rows32_s's wgmma form (lab_g_x{X}) on `grid` blocks: the products by the emulator's reading of
// wgmma's swizzled tiles, so this checks the copies, the pipeline, the fragments' rows and the splits, not
// the hardware's reading of the descriptors (linear_lab.py checks that on the GPU).
template <int X, int R, int S>
int rows_g(int m, long long n, long long k, int splits, unsigned grid) {
  char name[48];
  std::snprintf(name, sizeof(name), "lab_g<x %d, %d, %d> (%u blocks)", X, R, S, grid);
  return mismatches(name, m, n, k, splits, [&](u16* y, const u16* x, const u16* w, float* partial) {
    mmreg_emulator::launch(grid, 1, R * 2,
                           [&] { lab_rows32_s<R, 16, 64, S, false, true, X>(y, x, w, partial, m, n, k, splits); });
  });
}

int main() {
  const int bad = rows32_w<3>(32, 200, 328, 1) + rows32_w<4>(20, 130, 96, 2) + rows32_w<8>(17, 300, 1040, 3) +
                  rows32_w<3>(32, 136, 520, 4) + rows32_w<4>(25, 64, 200, 1) +
                  rows32_s<128, 32, 64, 4>(32, 300, 328, 1, 2) + rows32_s<128, 16, 64, 4>(20, 130, 520, 2, 3) +
                  rows32_s<64, 16, 64, 6>(17, 200, 1040, 3, 5) + rows32_s<128, 32, 128, 3>(25, 136, 264, 4, 3) +
                  rows32_s<64, 16, 64, 6>(32, 64, 200, 1, 1) + rows_g<32, 64, 8>(32, 300, 328, 1, 2) +
                  rows_g<32, 128, 4>(20, 130, 520, 2, 3) + rows_g<32, 64, 8>(17, 200, 1040, 3, 5) +
                  rows_g<32, 256, 4>(25, 300, 264, 4, 3) + rows_g<32, 128, 6>(32, 64, 200, 1, 1) +
                  rows_g<16, 64, 8>(16, 300, 328, 2, 3) + rows_g<16, 128, 6>(9, 130, 1040, 3, 2) +
                  rows_g<8, 64, 8>(8, 200, 520, 1, 3) + rows_g<8, 128, 6>(3, 300, 264, 4, 5) +
                  rows_g<8, 64, 8>(1, 64, 200, 2, 1);
  return bad == 0 ? 0 : 1;
}
