// linear_lab.cu's lab_rows32 prototypes on the CPU, in the fused kernels' emulator (no GPU needed): each
// against a double-precision product of the same bf16 inputs, at shapes that leave partial tiles of w,
// partial chunks of k and fewer than 32 rows of x. Build and run from the repo root:
//   g++ -std=c++20 -O1 -pthread -ffp-contract=off -Wno-unknown-pragmas -Immreg-engine/csrc -Iscripts/gpu \
//       -o /tmp/linear_lab_check scripts/gpu/linear_lab_check.cpp && /tmp/linear_lab_check
#include "kernel_emulator.cpp"
#include "linear_lab.cu"

#include <cstdio>
#include <random>

// y from lab_rows32<F, U> on `grid` blocks against the exact product: the count of outputs off by more
// than a bf16 rounding (relative 2^-7, plus a little for the f32 sums' order).
template <int F, int U>
int mismatches(int m, long long n, long long k, unsigned grid) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<u16> x(m * k), w(n * k), y(m * n, 0);
  for (auto& v : x) v = BF16::store(normal(rng));
  for (auto& v : w) v = BF16::store(normal(rng) * 0.05f);
  mmreg_emulator::launch(grid, 1, 256, [&] { lab_rows32<F, U>(y.data(), x.data(), w.data(), m, n, k); });
  int bad = 0;
  for (int r = 0; r < m; ++r) {
    for (long long o = 0; o < n; ++o) {
      double sum = 0.0;
      for (long long i = 0; i < k; ++i) sum += (double)BF16::load(x[r * k + i]) * BF16::load(w[o * k + i]);
      const double got = BF16::load(y[r * n + o]);
      if (std::fabs(got - sum) > std::fabs(sum) / 128 + 1e-3) {
        if (bad++ < 3) std::printf("  row %d, output %lld: %g, exact %g\n", r, o, got, sum);
      }
    }
  }
  std::printf("lab_rows32<%d, %d> m=%d n=%lld k=%lld on %u blocks: %d of %lld outputs off\n", F, U, m, n, k, grid,
              bad, m * n);
  return bad;
}

int main() {
  const int bad = mismatches<4, 2>(32, 200, 328, 2) + mismatches<4, 1>(20, 130, 96, 3) +
                  mismatches<2, 2>(17, 70, 264, 1) + mismatches<6, 1>(32, 96, 64, 1);
  return bad == 0 ? 0 : 1;
}
