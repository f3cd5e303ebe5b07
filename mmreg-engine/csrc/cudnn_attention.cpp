// cuDNN's fused attention (the kernel libtorch's scaled_dot_product_attention picks on Hopper), called
// through cudnn-frontend's graph API instead of through libtorch. The kernel is the same; what goes is
// libtorch's wrapping around it: two at::zeros for a dropout seed and offset that inference never reads
// (a memset node before every attention of a CUDA graph, and the GPU idle 4-5 us after it: run 86), and
// an output whose layout we do not choose. One execution plan per shape and layout, built on the first
// call and kept.
//
// cudnn-frontend is header-only; it reaches cuDNN through dlsym (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING)
// in the libcudnn that libtorch_cuda has already loaded, so nothing here links against a versioned cuDNN.
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace cudnn_frontend {
// Where the frontend looks up cuDNN's functions: every object loaded so far (libtorch_cuda's libcudnn).
void* cudnn_dlhandle = RTLD_DEFAULT;
}  // namespace cudnn_frontend

namespace {
namespace fe = cudnn_frontend;

constexpr int64_t kQ = 1, kK = 2, kV = 3, kO = 4;

// Everything a plan depends on: device, dtype, causal, scale, the six sizes and the four tensors'
// strides.
struct Key {
  int64_t values[4 + 6 + 16];
  bool operator==(const Key& other) const { return std::memcmp(values, other.values, sizeof values) == 0; }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : key.values) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN has no kernel for this key
  std::string why;
  int64_t workspace = 0;
};

std::mutex plans_lock;
std::unordered_map<Key, std::shared_ptr<Plan>, KeyHash> plans;

void set_error(char* error, size_t capacity, const std::string& what) {
  if (error == nullptr || capacity == 0) return;
  size_t n = std::min(capacity - 1, what.size());
  std::memcpy(error, what.data(), n);
  error[n] = '\0';
}

// dims: b, heads, kv_heads, query length, key length, head dim. strides: q, k, v, o, each [b, heads,
// length, d] in elements.
std::shared_ptr<Plan> build(cudnnHandle_t handle, int dtype, const int64_t* dims, const int64_t* strides,
                            bool causal, float scale) {
  auto plan = std::make_shared<Plan>();
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const int64_t b = dims[0], h = dims[1], kv = dims[2], s_q = dims[3], s_kv = dims[4], d = dims[5];
  auto tensor = [&](const char* name, int64_t uid, std::vector<int64_t> dim, const int64_t* stride) {
    return graph->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_dim(std::move(dim))
                             .set_stride({stride[0], stride[1], stride[2], stride[3]}));
  };
  auto q = tensor("Q", kQ, {b, h, s_q, d}, strides);
  auto k = tensor("K", kK, {b, kv, s_kv, d}, strides + 4);
  auto v = tensor("V", kV, {b, kv, s_kv, d}, strides + 8);
  auto options = fe::graph::SDPA_attributes().set_name("attention").set_generate_stats(false).set_attn_scale(scale);
  if (causal) options.set_causal_mask(true);
  auto [o, stats] = graph->sdpa(q, k, v, options);
  (void)stats;
  o->set_output(true)
      .set_uid(kO)
      .set_dim({b, h, s_q, d})
      .set_stride({strides[12], strides[13], strides[14], strides[15]});
  auto status = graph->build(handle, {fe::HeurMode_t::A});
  if (!status.is_good()) {
    plan->why = status.get_message();
    return plan;
  }
  status = graph->get_workspace_size(plan->workspace);
  if (!status.is_good()) {
    plan->why = status.get_message();
    return plan;
  }
  plan->graph = std::move(graph);
  return plan;
}

}  // namespace

extern "C" {

// Attention of q [b, heads, s_q, d] over k and v [b, kv_heads, s_kv, d] into o [b, heads, s_q, d] (all
// with the strides given, in elements, on `device`'s current stream); dtype 0 bf16, 1 f16; causal aligned
// to the top left, as libtorch's. Returns 0 on success; 2 where cuDNN has no kernel for these shapes and
// layouts (kept, so that the caller falls back without asking again); 1 on any other failure. `error`
// receives why.
int mmreg_cudnn_attention(int device, int dtype, const int64_t* dims, const int64_t* strides, void* q, void* k,
                          void* v, void* o, int causal, float scale, char* error, size_t capacity) {
  try {
    // libc10_cuda's device switch (c10's guard's inline code would link against libcudart directly).
    struct Device {
      c10::DeviceIndex previous;
      explicit Device(int index) : previous(c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(index))) {}
      ~Device() { c10::cuda::MaybeExchangeDevice(previous); }
    } on_device(device);
    Key key{};
    key.values[0] = device;
    key.values[1] = dtype;
    key.values[2] = causal;
    std::memcpy(&key.values[3], &scale, sizeof scale);
    std::memcpy(&key.values[4], dims, 6 * sizeof(int64_t));
    std::memcpy(&key.values[10], strides, 16 * sizeof(int64_t));
    cudnnHandle_t handle = at::native::getCudnnHandle();
    auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
    if (fe::detail::set_stream(handle, stream.stream()) != CUDNN_STATUS_SUCCESS) {
      set_error(error, capacity, "cudnnSetStream failed");
      return 1;
    }
    std::shared_ptr<Plan> plan;
    {
      std::lock_guard<std::mutex> lock(plans_lock);
      auto found = plans.find(key);
      if (found != plans.end()) plan = found->second;
    }
    if (!plan) {
      plan = build(handle, dtype, dims, strides, causal != 0, scale);
      std::lock_guard<std::mutex> lock(plans_lock);
      plans.emplace(key, plan);
    }
    if (!plan->graph) {
      set_error(error, capacity, plan->why);
      return 2;
    }
    // The caching allocator's block is reused by later work on this stream only after this kernel.
    c10::DataPtr workspace;
    if (plan->workspace > 0) workspace = c10::cuda::CUDACachingAllocator::get()->allocate(plan->workspace);
    std::unordered_map<int64_t, void*> pointers = {{kQ, q}, {kK, k}, {kV, v}, {kO, o}};
    auto status = plan->graph->execute(handle, pointers, workspace.get());
    if (!status.is_good()) {
      set_error(error, capacity, status.get_message());
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(error, capacity, e.what());
  } catch (...) {
    set_error(error, capacity, "unknown C++ exception");
  }
  return 1;
}

}  // extern "C"
