// linear_lab.cu's lab_rows32_w prototype on the CPU, in the fused kernels' emulator (no GPU needed):
// against a double-precision product of the same bf16 inputs, at shapes that leave partial blocks of w,
// partial chunks of k, fewer than 32 rows of x, and k in 1 to 4 splits. Build and run from the repo root:
//   g++ -std=c++20 -O1 -pthread -ffp-contract=off -Wno-unknown-pragmas -Immreg-engine/csrc -Iscripts/gpu \
//       -o /tmp/linear_lab_check scripts/gpu/linear_lab_check.cpp && /tmp/linear_lab_check
#include "kernel_emulator.cpp"
#include "linear_lab.cu"

#include <cstdio>
#include <random>

// y from lab_rows32_w<U> on ceil(n / 128) × splits blocks against the exact product: the count of
// outputs off by more than a bf16 rounding (relative 2^-7, plus a little for the f32 sums' order). Runs
// twice, the second time into a poisoned y, so that the arrival counts must have been reset.
template <int U>
int mismatches(int m, long long n, long long k, int splits) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<u16> x(m * k), w(n * k), y(m * n);
  for (auto& v : x) v = BF16::store(normal(rng));
  for (auto& v : w) v = BF16::store(normal(rng) * 0.05f);
  std::vector<float> partial(splits * m * n, 0.0f);
  const unsigned grid = (unsigned)((n + 127) / 128 * splits);
  int bad = 0;
  for (int pass = 0; pass < 2; ++pass) {
    std::fill(y.begin(), y.end(), BF16::store(1e4f));
    mmreg_emulator::launch(grid, 1, 256, [&] {
      lab_rows32_w<U>(y.data(), x.data(), w.data(), partial.data(), m, n, k, splits);
    });
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
  std::printf("lab_rows32_w<%d> m=%d n=%lld k=%lld, %d splits: %d of %lld outputs off\n", U, m, n, k, splits, bad,
              2 * m * n);
  return bad;
}

int main() {
  const int bad = mismatches<3>(32, 200, 328, 1) + mismatches<4>(20, 130, 96, 2) + mismatches<8>(17, 300, 1040, 3) +
                  mismatches<3>(32, 136, 520, 4) + mismatches<4>(25, 64, 200, 1);
  return bad == 0 ? 0 : 1;
}
