// Products tuned on the card: y [m, n] = x [m, k] · w [n, k]ᵀ (+ bias [n]) through cuBLASLt with the
// configuration that timed fastest for the shape, the first time the shape is met.
//
// libtorch's F.linear takes cuBLAS's heuristic first pick. For the few-row products of a batch-32 decode
// step that pick leaves bandwidth unused: on an H100 (run 97, scripts/gpu/lt_sweep.py) q/k/v's 128x32
// tiles (96 tiles for 132 SMs) read 7% slower than 64x32 tiles, the LM head's 5.5% slower than the same
// tile with other stages. So, like PyTorch's TunableOp: the heuristic's candidates and variants of its best
// (tile, split-K and its reduction, for a few rows), each checked against libtorch's output and timed with
// the L2 cache flushed before each call (a decoder's layers read their weights from memory), against
// libtorch's own product timed the same way. The fastest is kept for the shape; libtorch's wins unless a
// candidate beats it by 2%, and then the caller runs libtorch's product, the reference. At a decode
// step's rows there are hundreds of candidates: each is screened by two unchecked timings first, and the
// fastest eight are checked and timed in full.
//
// cuBLASLt and the CUDA runtime are reached through dlsym in the libraries libtorch_cuda has loaded, as the
// CUDA shim does, so nothing here links against a versioned cuBLAS.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr size_t kWorkspace = 16u << 20;
constexpr int64_t kFlushBytes = 128ll << 20;  // over twice an H200's 50 MB of L2
constexpr float kMargin = 0.98f;              // a candidate must beat libtorch's product by 2%
constexpr size_t kScreened = 8;               // candidates checked and timed in full after screening

template <typename F>
F symbol(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

struct Api {
  decltype(&cublasLtCreate) create = symbol<decltype(&cublasLtCreate)>("cublasLtCreate");
  decltype(&cublasLtMatmulDescCreate) desc_create = symbol<decltype(&cublasLtMatmulDescCreate)>("cublasLtMatmulDescCreate");
  decltype(&cublasLtMatmulDescSetAttribute) desc_set =
      symbol<decltype(&cublasLtMatmulDescSetAttribute)>("cublasLtMatmulDescSetAttribute");
  decltype(&cublasLtMatrixLayoutCreate) layout_create =
      symbol<decltype(&cublasLtMatrixLayoutCreate)>("cublasLtMatrixLayoutCreate");
  decltype(&cublasLtMatmulPreferenceCreate) pref_create =
      symbol<decltype(&cublasLtMatmulPreferenceCreate)>("cublasLtMatmulPreferenceCreate");
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set =
      symbol<decltype(&cublasLtMatmulPreferenceSetAttribute)>("cublasLtMatmulPreferenceSetAttribute");
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy =
      symbol<decltype(&cublasLtMatmulPreferenceDestroy)>("cublasLtMatmulPreferenceDestroy");
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic =
      symbol<decltype(&cublasLtMatmulAlgoGetHeuristic)>("cublasLtMatmulAlgoGetHeuristic");
  decltype(&cublasLtMatmulAlgoCheck) check = symbol<decltype(&cublasLtMatmulAlgoCheck)>("cublasLtMatmulAlgoCheck");
  decltype(&cublasLtMatmulAlgoCapGetAttribute) cap_get =
      symbol<decltype(&cublasLtMatmulAlgoCapGetAttribute)>("cublasLtMatmulAlgoCapGetAttribute");
  decltype(&cublasLtMatmulAlgoConfigSetAttribute) config_set =
      symbol<decltype(&cublasLtMatmulAlgoConfigSetAttribute)>("cublasLtMatmulAlgoConfigSetAttribute");
  decltype(&cublasLtMatmulAlgoConfigGetAttribute) config_get =
      symbol<decltype(&cublasLtMatmulAlgoConfigGetAttribute)>("cublasLtMatmulAlgoConfigGetAttribute");
  decltype(&cublasLtMatmul) matmul = symbol<decltype(&cublasLtMatmul)>("cublasLtMatmul");
  decltype(&cublasLtGetVersion) version = symbol<decltype(&cublasLtGetVersion)>("cublasLtGetVersion");
  // The CUDA runtime's, without its header's types.
  int (*event_create)(void**) = symbol<int (*)(void**)>("cudaEventCreate");
  int (*event_record)(void*, void*) = symbol<int (*)(void*, void*)>("cudaEventRecord");
  int (*event_synchronize)(void*) = symbol<int (*)(void*)>("cudaEventSynchronize");
  int (*event_elapsed)(float*, void*, void*) = symbol<int (*)(float*, void*, void*)>("cudaEventElapsedTime");
  int (*event_destroy)(void*) = symbol<int (*)(void*)>("cudaEventDestroy");
  int (*is_capturing)(void*, int*) = symbol<int (*)(void*, int*)>("cudaStreamIsCapturing");

  bool complete() const {
    return create && desc_create && desc_set && layout_create && pref_create && pref_set && pref_destroy &&
           heuristic && check && cap_get && config_set && config_get && matmul && version && event_create && event_record &&
           event_synchronize && event_elapsed && event_destroy && is_capturing;
  }
};

const Api* api() {
  static const Api found;
  return found.complete() ? &found : nullptr;
}

// device, dtype (0 bf16, 1 f16), rows (the caller's bucket of x's rows), n, k, bias
using Key = std::tuple<int, int, int64_t, int64_t, int64_t, bool>;

// x's and y's layouts for one count of rows, and whether the plan's configuration takes them.
struct Rows {
  cublasLtMatrixLayout_t b = nullptr, d = nullptr;
  size_t workspace = 0;
  bool usable = false;
};

// One bucket of rows' pick; the configuration was timed at the first count of rows met in the bucket (or
// read from the file of kept picks: `stored`) and is checked against each other count on its first call.
struct Plan {
  bool lt = false;  // false: libtorch's product is the fastest
  cublasLtMatmulAlgo_t algo{};
  cudaDataType_t type = CUDA_R_16BF;
  int64_t n = 0, k = 0;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr;
  std::map<int64_t, Rows> rows;
  float lt_us = 0, torch_us = 0;
  int candidates = 0;
  bool stored = false;
};

std::mutex lock;
std::map<Key, std::shared_ptr<Plan>> plans;
std::map<int, cublasLtHandle_t> handles;

void set_error(char* error, size_t capacity, const std::string& what) {
  if (error == nullptr || capacity == 0) return;
  size_t n = std::min(capacity - 1, what.size());
  std::memcpy(error, what.data(), n);
  error[n] = '\0';
}

struct Failure {
  std::string what;
};

void ok(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) throw Failure{std::string(what) + " failed: cuBLAS status " + std::to_string(status)};
}

// cuBLAS is column-major: y [m, n] row-major is D [n, m] = op(A) · B with A = w seen as [k, n] (transposed
// by the op) and B = x seen as [k, m], as libtorch asks for x · wᵀ.
void describe(const Api& lt, Plan& plan, int dtype, int64_t n, int64_t k) {
  plan.type = dtype == 0 ? CUDA_R_16BF : CUDA_R_16F;
  plan.n = n;
  plan.k = k;
  ok(lt.desc_create(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  cublasOperation_t transpose = CUBLAS_OP_T;
  ok(lt.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof transpose), "TRANSA");
  ok(lt.layout_create(&plan.a, plan.type, k, n, k), "layout of w");
}

// The layouts for m rows of x, made on the first call with m.
Rows& rows_of(const Api& lt, Plan& plan, int64_t m) {
  auto found = plan.rows.find(m);
  if (found != plan.rows.end()) return found->second;
  Rows rows;
  ok(lt.layout_create(&rows.b, plan.type, plan.k, m, plan.k), "layout of x");
  ok(lt.layout_create(&rows.d, plan.type, plan.n, m, plan.n), "layout of y");
  return plan.rows.emplace(m, rows).first->second;
}

void set_bias(const Api& lt, Plan& plan, const void* bias) {
  cublasLtEpilogue_t epilogue = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  ok(lt.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue), "EPILOGUE");
  if (bias) ok(lt.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias), "BIAS_POINTER");
}

cublasStatus_t run(const Api& lt, cublasLtHandle_t handle, const Plan& plan, const Rows& rows,
                   const cublasLtMatmulAlgo_t& algo, size_t workspace, const at::Tensor& x, const at::Tensor& w,
                   at::Tensor& y, cudaStream_t stream) {
  // The caching allocator's block is reused by later work on this stream only after this product.
  c10::DataPtr space;
  if (workspace > 0) space = c10::cuda::CUDACachingAllocator::get()->allocate(workspace);
  const float one = 1.0f, zero = 0.0f;
  return lt.matmul(handle, plan.desc, &one, w.data_ptr(), plan.a, x.data_ptr(), rows.b, &zero, y.data_ptr(), rows.d,
                   y.data_ptr(), rows.d, &algo, space.get(), workspace, stream);
}

uint32_t tile_of(const Api& lt, const cublasLtMatmulAlgo_t& algo) {
  uint32_t tile = 0;
  size_t written = 0;
  lt.config_get(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &written);
  return tile;
}

std::vector<uint32_t> cap_list(const Api& lt, const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t attr) {
  size_t bytes = 0;
  if (lt.cap_get(&algo, attr, nullptr, 0, &bytes) != CUBLAS_STATUS_SUCCESS || bytes == 0) return {};
  std::vector<uint32_t> out(bytes / sizeof(uint32_t));
  lt.cap_get(&algo, attr, out.data(), out.size() * sizeof(uint32_t), &bytes);
  return out;
}

uint32_t cap_value(const Api& lt, const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t attr) {
  uint32_t value = 0;
  size_t bytes = 0;
  lt.cap_get(&algo, attr, &value, sizeof value, &bytes);
  return value;
}

// The columns of each tile id (cublasLtMatmulTile_t's "RxC" names; C counts x's rows here), 0 where
// unnamed: generated by build.rs from this cuBLASLt's header.
#include "tile_columns.inc"

int tile_columns(uint32_t tile) {
  return tile < sizeof kTileColumns / sizeof kTileColumns[0] ? kTileColumns[tile] : 0;
}

struct Candidate {
  cublasLtMatmulAlgo_t algo;
  size_t workspace;
};

// The heuristic's picks, then its best four with their tile (tiles of x's rows' size) and 1 to 4 splits
// of k varied; each one cuBLASLt accepts for the shapes, once. At prefill's rows, where the
// products compute rather than read and each timing is long, the best two with 2 to 4 splits of k
// alone (for short products such as a vision tower's 1024 x 1024, whose tiles fill one wave).
std::vector<Candidate> candidates(const Api& lt, cublasLtHandle_t handle, const Plan& plan, const Rows& rows,
                                  int64_t m) {
  cublasLtMatmulPreference_t pref = nullptr;
  ok(lt.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
  uint64_t limit = kWorkspace;
  lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &limit, sizeof limit);
  cublasLtMatmulHeuristicResult_t results[16];
  int found = 0;
  auto status = lt.heuristic(handle, plan.desc, plan.a, rows.b, rows.d, rows.d, pref, 16, results, &found);
  lt.pref_destroy(pref);
  ok(status, "cublasLtMatmulAlgoGetHeuristic");
  std::vector<Candidate> out;
  auto add = [&](const cublasLtMatmulAlgo_t& algo) {
    for (const auto& c : out)
      if (std::memcmp(&c.algo, &algo, sizeof algo) == 0) return;
    cublasLtMatmulHeuristicResult_t checked{};
    if (lt.check(handle, plan.desc, plan.a, rows.b, rows.d, rows.d, &algo, &checked) != CUBLAS_STATUS_SUCCESS) return;
    if (checked.workspaceSize > kWorkspace) return;
    out.push_back({algo, checked.workspaceSize});
  };
  for (int i = 0; i < found; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) add(results[i].algo);
  const bool few = m <= 64;
  const int picks = std::min(found, few ? 4 : 2);
  for (int i = 0; i < picks; ++i) {
    const auto& base = results[i].algo;
    std::vector<uint32_t> tiles;
    for (uint32_t tile : few ? cap_list(lt, base, CUBLASLT_ALGO_CAP_TILE_IDS) : std::vector<uint32_t>{}) {
      int columns = tile_columns(tile);
      if (columns > 0 && m <= 4 * columns && columns <= std::max<int64_t>(2 * m, 16)) tiles.push_back(tile);
    }
    if (tiles.empty()) tiles.push_back(tile_of(lt, base));
    const bool splits = cap_value(lt, base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT) != 0;
    const uint32_t reductions = cap_value(lt, base, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK);
    std::vector<int32_t> split_ks = {1};
    if (splits) split_ks = few ? std::vector<int32_t>{1, 2, 3, 4} : std::vector<int32_t>{2, 3, 4};
    for (uint32_t tile : tiles) {
      for (int32_t split : split_ks) {
        // (Partial sums reduced in f32, the compute type: every split-K winner of run 97's sweep, where
        // 6 to 16 splits and the other schemes never came first.)
        for (uint32_t reduction : {0u, 2u}) {
          if ((split == 1) != (reduction == 0) || (reduction != 0 && !(reductions & reduction))) continue;
          cublasLtMatmulAlgo_t algo = base;
          if (lt.config_set(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile) != CUBLAS_STATUS_SUCCESS ||
              lt.config_set(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof split) != CUBLAS_STATUS_SUCCESS ||
              lt.config_set(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &reduction, sizeof reduction) !=
                  CUBLAS_STATUS_SUCCESS)
            continue;
          add(algo);
        }
      }
    }
  }
  return out;
}

// The best of `reps` timings of `call`, each after the L2 cache is flushed, in µs.
template <typename F>
float best_us(const Api& lt, cudaStream_t stream, at::Tensor& flush, int reps, F call) {
  void *start = nullptr, *stop = nullptr;
  if (lt.event_create(&start) != 0 || lt.event_create(&stop) != 0) throw Failure{"cudaEventCreate failed"};
  float best = 1e30f;
  for (int r = 0; r < reps; ++r) {
    flush.zero_();
    lt.event_record(start, stream);
    call();
    lt.event_record(stop, stream);
    lt.event_synchronize(stop);
    float ms = 0;
    if (lt.event_elapsed(&ms, start, stop) == 0) best = std::min(best, ms * 1000.0f);
  }
  lt.event_destroy(start);
  lt.event_destroy(stop);
  return best;
}

std::shared_ptr<Plan> tune(const Api& lt, cublasLtHandle_t handle, int dtype, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor* bias, cudaStream_t stream) {
  const int64_t m = x.size(0), n = w.size(0), k = w.size(1);
  auto plan = std::make_shared<Plan>();
  describe(lt, *plan, dtype, n, k);
  Rows& rows = rows_of(lt, *plan, m);
  set_bias(lt, *plan, bias ? bias->data_ptr() : nullptr);
  at::Tensor reference = bias ? at::linear(x, w, *bias) : at::linear(x, w);
  at::Tensor flush = at::empty({kFlushBytes}, x.options().dtype(at::kByte));
  const int reps = m <= 64 ? 5 : 3;
  at::Tensor scratch;
  plan->torch_us = best_us(lt, stream, flush, reps, [&] { scratch = bias ? at::linear(x, w, *bias) : at::linear(x, w); });
  at::Tensor y = at::empty_like(reference);
  const double scale = reference.abs().max().item<double>();
  float best = 1e30f;
  size_t best_workspace = 0;
  std::vector<std::pair<float, Candidate>> timed;
  // A candidate checked against libtorch's output and timed `reps` times.
  auto time = [&](const Candidate& c) {
    y.zero_();
    if (run(lt, handle, *plan, rows, c.algo, c.workspace, x, w, y, stream) != CUBLAS_STATUS_SUCCESS) return;
    // A configuration that computes something else is no candidate (libtorch's output within 2% of its
    // largest value: rounding differs by the order of the sums, not by more).
    if ((y.to(at::kFloat) - reference.to(at::kFloat)).abs().max().item<double>() > 0.02 * scale + 1e-6) return;
    float us =
        best_us(lt, stream, flush, reps, [&] { run(lt, handle, *plan, rows, c.algo, c.workspace, x, w, y, stream); });
    timed.emplace_back(us, c);
    if (us < best) {
      best = us;
      plan->algo = c.algo;
      best_workspace = c.workspace;
    }
  };
  auto by_time = [](const auto& l, const auto& r) { return l.first < r.first; };
  // Each of `list` timed in full; a long list (hundreds of configurations at a decode step's rows) is
  // screened first: each timed twice, unchecked (the first call of a configuration may load its kernel),
  // and only the fastest kScreened go on.
  auto measure = [&](const std::vector<Candidate>& list) {
    plan->candidates += static_cast<int>(list.size());
    if (list.size() <= 2 * kScreened) {
      for (const auto& c : list) time(c);
      return;
    }
    std::vector<std::pair<float, Candidate>> screened;
    for (const auto& c : list) {
      bool ran = true;
      float us = best_us(lt, stream, flush, 2, [&] {
        ran = ran && run(lt, handle, *plan, rows, c.algo, c.workspace, x, w, y, stream) == CUBLAS_STATUS_SUCCESS;
      });
      if (ran) screened.emplace_back(us, c);
    }
    std::sort(screened.begin(), screened.end(), by_time);
    for (size_t i = 0; i < std::min(screened.size(), kScreened); ++i) time(screened[i].second);
  };
  measure(candidates(lt, handle, *plan, rows, m));
  // Then the two fastest with each of their stages.
  std::sort(timed.begin(), timed.end(), by_time);
  std::vector<Candidate> staged;
  for (size_t i = 0; i < std::min<size_t>(2, timed.size()); ++i) {
    const Candidate c = timed[i].second;
    for (uint32_t stages : cap_list(lt, c.algo, CUBLASLT_ALGO_CAP_STAGES_IDS)) {
      Candidate variant = c;
      cublasLtMatmulHeuristicResult_t checked{};
      if (lt.config_set(&variant.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages) != CUBLAS_STATUS_SUCCESS ||
          std::memcmp(&variant.algo, &c.algo, sizeof c.algo) == 0 ||
          lt.check(handle, plan->desc, plan->a, rows.b, rows.d, rows.d, &variant.algo, &checked) != CUBLAS_STATUS_SUCCESS ||
          checked.workspaceSize > kWorkspace)
        continue;
      variant.workspace = checked.workspaceSize;
      staged.push_back(variant);
    }
  }
  measure(staged);
  plan->lt_us = best;
  plan->lt = best < kMargin * plan->torch_us;
  rows.workspace = best_workspace;
  rows.usable = plan->lt;
  return plan;
}

cublasLtHandle_t handle_for(const Api& lt, int device) {
  auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  cublasLtHandle_t handle = nullptr;
  ok(lt.create(&handle), "cublasLtCreate");
  handles.emplace(device, handle);
  return handle;
}

}  // namespace

extern "C" {

// y = x · wᵀ (+ bias) for contiguous CUDA tensors x [m, k], w [n, k], bias [n] (or null) (all tch's
// at::Tensor pointers) in bf16 or f16, on the current stream of x's device. Returns 0 where it ran
// cuBLASLt's tuned configuration, with `*y_out` a new at::Tensor [m, n] the caller owns (allocated only
// then); 2 where libtorch's product is the shape's fastest (the caller runs it); 3 where the shape is new
// and the stream is capturing a CUDA graph (no timing there: the caller runs libtorch's product, and
// nothing is kept); 1 on failure, with `error` saying why. `bucket` is the count
// of rows the pick is kept under (the caller's bucket of x's rows: the configuration timed at the first
// count met serves the others, checked against each). `tuned` is set where this call timed the shape
// (the caller keeps the pick).
int mmreg_tuned_linear(const void* x_ptr, const void* w_ptr, const void* bias_ptr, int64_t bucket, void** y_out,
                       int* tuned, char* error, size_t capacity) {
  *tuned = 0;
  *y_out = nullptr;
  try {
    const Api* lt = api();
    if (lt == nullptr) {
      set_error(error, capacity, "cuBLASLt or the CUDA runtime not found among the loaded libraries");
      return 1;
    }
    const auto& x = *static_cast<const at::Tensor*>(x_ptr);
    const auto& w = *static_cast<const at::Tensor*>(w_ptr);
    const auto* bias = static_cast<const at::Tensor*>(bias_ptr);
    const int device = x.device().index();
    const int dtype = x.scalar_type() == at::kBFloat16 ? 0 : 1;
    struct Device {
      c10::DeviceIndex previous;
      explicit Device(int index) : previous(c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(index))) {}
      ~Device() { c10::cuda::MaybeExchangeDevice(previous); }
    } on_device(device);
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
    const Key key{device, dtype, bucket, w.size(0), w.size(1), bias != nullptr};
    std::lock_guard<std::mutex> guard(lock);
    std::shared_ptr<Plan> plan;
    auto found = plans.find(key);
    if (found != plans.end()) {
      plan = found->second;
    } else {
      int capturing = 0;
      if (lt->is_capturing(stream, &capturing) != 0) throw Failure{"cudaStreamIsCapturing failed"};
      if (capturing != 0) return 3;
      // A shape whose tuning failed (say, no memory for the flush buffer) keeps libtorch's product,
      // without trying again.
      std::string failed;
      try {
        plan = tune(*lt, handle_for(*lt, device), dtype, x, w, bias, stream);
      } catch (const Failure& f) {
        failed = f.what;
      } catch (const std::exception& e) {
        failed = e.what();
      }
      if (!failed.empty()) {
        plans.emplace(key, std::make_shared<Plan>());
        set_error(error, capacity, "tuning failed: " + failed);
        return 1;
      }
      plans.emplace(key, plan);
      *tuned = 1;
    }
    if (!plan->lt) return 2;
    set_bias(*lt, *plan, bias ? bias->data_ptr() : nullptr);
    const auto handle = handle_for(*lt, device);
    const bool met = plan->rows.count(x.size(0)) != 0;
    Rows& rows = rows_of(*lt, *plan, x.size(0));
    if (!met) {
      // Another count of rows in the bucket, or a kept pick: the configuration is checked against these
      // shapes first, and where cuBLASLt does not take it they keep libtorch's product.
      cublasLtMatmulHeuristicResult_t result{};
      rows.usable = lt->check(handle, plan->desc, plan->a, rows.b, rows.d, rows.d, &plan->algo, &result) ==
                        CUBLAS_STATUS_SUCCESS &&
                    result.workspaceSize <= kWorkspace;
      rows.workspace = result.workspaceSize;
    }
    if (!rows.usable) return 2;
    auto y = std::make_unique<at::Tensor>(at::empty({x.size(0), w.size(0)}, x.options()));
    ok(run(*lt, handle, *plan, rows, plan->algo, rows.workspace, x, w, *y, stream), "cublasLtMatmul");
    *y_out = y.release();
    return 0;
  } catch (const Failure& f) {
    set_error(error, capacity, f.what);
  } catch (const std::exception& e) {
    set_error(error, capacity, e.what());
  } catch (...) {
    set_error(error, capacity, "unknown C++ exception");
  }
  return 1;
}

// What tuning decided for a shape: -1 not tuned yet, 0 libtorch's product, 1 a cuBLASLt configuration;
// `times` gets cuBLASLt's best and libtorch's µs and the count of candidates timed, `algo` the
// configuration's 64 bytes, `stored` whether the pick was read from the file of kept picks.
int mmreg_tuned_linear_plan(int device, int dtype, int64_t m, int64_t n, int64_t k, int bias, float* times,
                            uint64_t* algo, int* stored) {
  std::lock_guard<std::mutex> guard(lock);
  auto found = plans.find(Key{device, dtype, m, n, k, bias != 0});
  if (found == plans.end()) return -1;
  const Plan& plan = *found->second;
  times[0] = plan.lt_us;
  times[1] = plan.torch_us;
  times[2] = static_cast<float>(plan.candidates);
  static_assert(sizeof plan.algo == 8 * sizeof(uint64_t), "cublasLtMatmulAlgo_t is 8 words");
  std::memcpy(algo, &plan.algo, sizeof plan.algo);
  *stored = plan.stored ? 1 : 0;
  return plan.lt ? 1 : 0;
}

// Takes a pick read from the file of kept picks for a shape not yet met in this process (`lt` 1: the
// configuration `algo`; 0: libtorch's product). Returns 1 where taken, 0 where the shape already has a
// pick, -1 where it could not be described (`error` says why).
int mmreg_tuned_linear_adopt(int device, int dtype, int64_t m, int64_t n, int64_t k, int bias, int lt_pick,
                             const uint64_t* algo, const float* times, char* error, size_t capacity) {
  try {
    const Api* lt = api();
    if (lt == nullptr) {
      set_error(error, capacity, "cuBLASLt or the CUDA runtime not found among the loaded libraries");
      return -1;
    }
    std::lock_guard<std::mutex> guard(lock);
    const Key key{device, dtype, m, n, k, bias != 0};
    if (plans.count(key) != 0) return 0;
    auto plan = std::make_shared<Plan>();
    describe(*lt, *plan, dtype, n, k);
    plan->lt = lt_pick != 0;
    std::memcpy(&plan->algo, algo, sizeof plan->algo);
    plan->lt_us = times[0];
    plan->torch_us = times[1];
    plan->candidates = static_cast<int>(times[2]);
    plan->stored = true;
    plans.emplace(key, plan);
    return 1;
  } catch (const Failure& f) {
    set_error(error, capacity, f.what);
  } catch (const std::exception& e) {
    set_error(error, capacity, e.what());
  }
  return -1;
}

// What the picks were timed on: the card's name, its compute capability and cuBLASLt's version (picks
// kept for another are not taken). Returns 0, or 1 where cuBLASLt was not found.
int mmreg_tuned_gemm_identity(int device, char* out, size_t capacity) {
  const Api* lt = api();
  if (lt == nullptr || capacity == 0) return 1;
  try {
    const auto* props = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    std::string name = std::string(props->name) + ", sm " + std::to_string(props->major) + std::to_string(props->minor) +
                       ", cuBLASLt " + std::to_string(lt->version());
    for (auto& c : name)
      if (c == '\t' || c == '\n') c = ' ';
    set_error(out, capacity, name);
    return 0;
  } catch (const std::exception& e) {
    set_error(out, capacity, e.what());
  }
  return 1;
}

// Drops every pick of this process: the next call of each shape takes a kept pick or tunes again.
void mmreg_tuned_gemm_forget() {
  std::lock_guard<std::mutex> guard(lock);
  plans.clear();
}

}  // extern "C"
