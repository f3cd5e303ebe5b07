// Variants of the decode products for scripts/gpu/linear_lab.py, compiled after csrc/fused_kernels.cu (whose
// templates they instantiate), and a plain read of the weight (the card's rate for that many bytes, the
// roof for the products). Run 57 also timed a cp.async version (each lane's runs copied into shared
// memory 2-7 stages ahead): slower than the register loads at every shape (docs/benchmarks.md).

// Every 16-byte vector of w once (4 loads in flight a thread), XORed so that the loads stay.
extern "C" __global__ void lab_read(const uint4* w, long long vectors, unsigned* sink) {
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = i + j * stride < vectors ? w[i + j * stride] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  }
  if (acc == 0x9e3779b9u) {
    sink[0] = acc;
  }
}
