// What tch does not expose of libtorch's distributed side (c10d), for tensor parallelism: an in-process
// store where the ranks meet, one process group per rank (Gloo for CPU tensors; NCCL for CUDA tensors
// where this is compiled with MMREG_NCCL), and the collectives the parallel layers call. Every function
// catches C++ exceptions and reports them in `error` instead, so nothing unwinds into Rust.
//
// A tensor crosses as tch's `C_tensor*`, which is torch-sys's `torch::Tensor*`.
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef MMREG_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
};

void set_error(char* error, size_t capacity, const std::string& message) {
  if (error == nullptr || capacity == 0) return;
  // The first line: c10 appends a C++ backtrace after it.
  std::string first = message.substr(0, message.find('\n'));
  size_t n = std::min(first.size(), capacity - 1);
  std::memcpy(error, first.data(), n);
  error[n] = '\0';
}

template <typename F>
int guarded(char* error, size_t capacity, F body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    set_error(error, capacity, e.what());
  } catch (...) {
    set_error(error, capacity, "unknown C++ exception");
  }
  return 1;
}

at::Tensor& tensor(void* t) { return *static_cast<at::Tensor*>(t); }

}  // namespace

extern "C" {

int mmreg_dist_nccl_available() {
#ifdef MMREG_NCCL
  return 1;
#else
  return 0;
#endif
}

void* mmreg_dist_store_new() {
  try {
    return new Store{c10::make_intrusive<c10d::HashStore>()};
  } catch (...) {
    return nullptr;
  }
}

void mmreg_dist_store_free(void* store) { delete static_cast<Store*>(store); }

// Joins the group `prefix` of `size` ranks as `rank` (blocks until every rank has joined). `nccl`: CUDA
// tensors through NCCL on the current device, else CPU tensors through Gloo over loopback.
void* mmreg_dist_group_new(void* store, const char* prefix, int rank, int size, int nccl,
                           int64_t timeout_ms, char* error, size_t capacity) {
  Group* group = nullptr;
  // c10d's flight recorder (a trace of recent collectives for debugging hangs) is one per process and
  // assumes one process group per process: our ranks' groups, all in this process, race on it. It is
  // read once, at its first use; a user's own setting stands.
  setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
  setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "0", 0);
  guarded(error, capacity, [&] {
    auto scoped = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix),
                                                         static_cast<Store*>(store)->store);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    if (nccl) {
#ifdef MMREG_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      group = new Group{c10::make_intrusive<c10d::ProcessGroupNCCL>(scoped, rank, size, options)};
#else
      throw std::runtime_error("this build of mmreg has no NCCL (no CUDA headers next to libtorch)");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      group = new Group{c10::make_intrusive<c10d::ProcessGroupGloo>(scoped, rank, size, options)};
    }
  });
  return group;
}

void mmreg_dist_group_free(void* group) { delete static_cast<Group*>(group); }

// Sums `t` over the group, in place.
int mmreg_dist_all_reduce(void* group, void* t, char* error, size_t capacity) {
  return guarded(error, capacity, [&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    static_cast<Group*>(group)->backend->allreduce(tensors)->wait();
  });
}

// Every rank's `input` concatenated along dim 0 into `output` (`size` times as many rows).
int mmreg_dist_all_gather(void* group, void* output, void* input, char* error, size_t capacity) {
  return guarded(error, capacity, [&] {
    auto& in = tensor(input);
    auto* backend = static_cast<Group*>(group)->backend.get();
    // One view of `output` per rank (contiguous rows), which both backends fill.
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < backend->getSize(); ++r) {
      outputs[0].push_back(tensor(output).narrow(0, r * in.size(0), in.size(0)));
    }
    std::vector<at::Tensor> inputs{in};
    backend->allgather(outputs, inputs)->wait();
  });
}

// Rank `root`'s `t` on every rank, in place.
int mmreg_dist_broadcast(void* group, void* t, int root, char* error, size_t capacity) {
  return guarded(error, capacity, [&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    static_cast<Group*>(group)->backend->broadcast(tensors, options)->wait();
  });
}

}  // extern "C"
