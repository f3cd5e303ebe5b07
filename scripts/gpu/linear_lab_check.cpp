// linear_lab.cu's lab_rows32_w and lab_rows32_s prototypes, and the products with the norm folded in, on the CPU, in the fused kernels' emulator (no GPU needed):
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

// linear_few_rows with the norm folded in (kRmsNorm, plain epilogue; kAddRmsNorm, SiLU epilogue) on
// ceil(n / 16) blocks of 8 warps against rms_norm_row's numbers then the exact product (and, with the
// add, the sums block 0 writes, exactly). The count of outputs off.
template <int kNorm>
int normed(int m, long long n, long long k) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<u16> x(m * k), residual(m * k), weight(k), w(n * k), sum(m * k, 0), y(m * n, 0);
  for (auto& v : x) v = BF16::store(normal(rng));
  for (auto& v : residual) v = BF16::store(normal(rng) * 3.0f);
  for (auto& v : weight) v = BF16::store(1.0f + normal(rng) * 0.1f);
  for (auto& v : w) v = BF16::store(normal(rng) * 0.05f);
  const float eps = 1e-5f;
  const long long outputs = kNorm == kAddRmsNorm ? n / 2 : n;
  mmreg_emulator::launch((unsigned)((n + 15) / 16), 1, 256, [&] {
    linear_few_rows<BF16, kNorm == kAddRmsNorm ? kSiluMul : 0, 1, 4, kNorm>(
        y.data(), x.data(), w.data(), nullptr, m, n, k, RopeStore<BF16>{},
        NormInput<BF16>{weight.data(), residual.data(), sum.data(), eps});
  });
  int bad = 0;
  for (int r = 0; r < m; ++r) {
    // rms_norm_row's numbers, in double for the sum.
    std::vector<float> v(k), normed_row(k);
    double squares = 0.0;
    for (long long c = 0; c < k; ++c) {
      v[c] = BF16::load(x[r * k + c]);
      if (kNorm == kAddRmsNorm) {
        const u16 s = BF16::store(v[c] + BF16::load(residual[r * k + c]));
        if (sum[r * k + c] != s && bad++ < 3) std::printf("  sum row %d, column %lld\n", r, c);
        v[c] = BF16::load(s);
      }
      squares += (double)v[c] * v[c];
    }
    const float inv = 1.0f / std::sqrt((float)(squares / k) + eps);
    for (long long c = 0; c < k; ++c) {
      normed_row[c] = BF16::load(BF16::store(BF16::load(weight[c]) * BF16::load(BF16::store(v[c] * inv))));
    }
    auto product = [&](long long o) {
      double total = 0.0;
      for (long long c = 0; c < k; ++c) total += (double)normed_row[c] * BF16::load(w[o * k + c]);
      return total;
    };
    for (long long o = 0; o < outputs; ++o) {
      double want = product(o);
      if (kNorm == kAddRmsNorm) {
        const double gate = BF16::load(BF16::store((float)want)), up = BF16::load(BF16::store((float)product(o + n / 2)));
        want = gate / (1.0 + std::exp(-gate)) * up;
      }
      const double got = BF16::load(y[r * outputs + o]);
      if (std::fabs(got - want) > std::fabs(want) / 64 + 2e-2) {
        if (bad++ < 3) std::printf("  row %d, output %lld: %g, want %g\n", r, o, got, want);
      }
    }
  }
  std::printf("linear_few_rows<norm %d> m=%d n=%lld k=%lld: %d off\n", kNorm, m, n, k, bad);
  return bad;
}

int main() {
  const int bad = rows32_w<3>(32, 200, 328, 1) + rows32_w<4>(20, 130, 96, 2) + rows32_w<8>(17, 300, 1040, 3) +
                  rows32_w<3>(32, 136, 520, 4) + rows32_w<4>(25, 64, 200, 1) +
                  rows32_s<128, 32, 64, 4>(32, 300, 328, 1, 2) + rows32_s<128, 16, 64, 4>(20, 130, 520, 2, 3) +
                  rows32_s<64, 16, 64, 6>(17, 200, 1040, 3, 5) + rows32_s<128, 32, 128, 3>(25, 136, 264, 4, 3) +
                  rows32_s<64, 16, 64, 6>(32, 64, 200, 1, 1) + normed<kRmsNorm>(1, 48, 4096) +
                  normed<kRmsNorm>(8, 40, 2048) + normed<kAddRmsNorm>(1, 64, 4096) + normed<kAddRmsNorm>(5, 32, 1024);
  return bad == 0 ? 0 : 1;
}
