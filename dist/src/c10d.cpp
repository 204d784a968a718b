// byol-dist's binding to libtorch's c10d: a TCPStore rendezvous, a Gloo (CPU) or NCCL
// (CUDA) process group, the collectives byol uses, and SyncBatchNorm as an autograd
// function whose backward all-reduces its two per-channel sums (as PyTorch's
// torch.nn.SyncBatchNorm does). Every entry point catches C++ exceptions and returns
// them as a malloc'ed message; the Rust side (src/ffi.rs) adds the collective and rank.

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef BYOL_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world;
  // Nanoseconds spent waiting for collectives to complete (communication, and waiting
  // for slower ranks), SyncBatchNorm's included.
  std::atomic<int64_t> wait_ns{0};
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

// Runs `f`, turning any exception into an error message; returns 0 on success.
template <class F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception");
  }
  return 1;
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& w) {
  auto t0 = std::chrono::steady_clock::now();
  w->wait();
  auto dt = std::chrono::steady_clock::now() - t0;
  g->wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(dt).count();
}

// Every dimension but the channel dimension (1).
std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> d{0};
  for (int64_t i = 2; i < x.dim(); ++i) d.push_back(i);
  return d;
}

// [C] -> [1, C, 1, ...] for broadcasting against x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

at::ScalarType compute_type(const at::Tensor& x) {
  auto t = x.scalar_type();
  return (t == at::kDouble) ? at::kDouble : at::kFloat;
}

// SyncBatchNorm's forward and backward (torch/nn/modules/_functions.py, SyncBatchNorm),
// in composite ATen ops so that it runs on the CPU (the fused kernels are CUDA-only).
struct SyncBatchNormFn : public torch::autograd::Function<SyncBatchNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x,
                            at::Tensor weight, at::Tensor bias, at::Tensor running_mean,
                            at::Tensor running_var, double momentum, double eps, Group* g) {
    auto ct = compute_type(x);
    auto xf = x.to(ct);
    auto dims = reduce_dims(x);
    int64_t c = x.size(1);
    int64_t n_local = c > 0 ? x.numel() / c : 0;
    at::Tensor mean_l, var_l;
    if (n_local > 0) {
      mean_l = xf.mean(dims);
      var_l = (xf - per_channel(mean_l, xf)).pow(2).mean(dims);
    } else {
      mean_l = at::zeros({c}, xf.options());
      var_l = at::zeros({c}, xf.options());
    }
    auto count = at::full({1}, static_cast<double>(n_local), xf.options());
    std::vector<at::Tensor> input{at::cat({mean_l, var_l, count})};
    std::vector<std::vector<at::Tensor>> output(1);
    for (int r = 0; r < g->world; ++r) output[0].push_back(at::empty_like(input[0]));
    wait(g, g->backend->allgather(output, input));
    auto all = at::stack(output[0]);  // [world, 2C + 1]
    auto means = all.narrow(1, 0, c);
    auto vars = all.narrow(1, c, c);
    auto counts = all.narrow(1, 2 * c, 1);  // [world, 1]
    auto n = counts.sum();
    auto mean = (counts * means).sum(0) / n;
    auto var = (counts * (vars + (means - mean).pow(2))).sum(0) / n;
    auto invstd = (var + eps).rsqrt();
    {
      at::NoGradGuard no_grad;
      if (running_mean.defined()) {
        double total = n.item<double>();
        auto unbiased = total > 1 ? var * (total / (total - 1)) : var;
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
      }
    }
    auto scale = weight.defined() ? invstd * weight.to(ct) : invstd;
    auto y = (xf - per_channel(mean, xf)) * per_channel(scale, xf);
    if (bias.defined()) y = y + per_channel(bias.to(ct), xf);
    ctx->save_for_backward({x, weight, mean, invstd, n});
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(g);
    ctx->saved_data["has_bias"] = bias.defined();
    return y.to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], weight = saved[1], mean = saved[2], invstd = saved[3], n = saved[4];
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto ct = compute_type(x);
    auto xf = x.to(ct);
    auto dy = grads[0].to(ct);
    auto dims = reduce_dims(x);
    auto xmu = xf - per_channel(mean, xf);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);
    // This rank's parameter gradients; the trainer averages them over ranks with the
    // others (DistributedDataParallel's role in PyTorch).
    at::Tensor grad_weight, grad_bias;
    if (weight.defined()) grad_weight = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (has_bias) grad_bias = sum_dy.to(weight.defined() ? weight.scalar_type() : ct);
    int64_t c = x.size(1);
    std::vector<at::Tensor> both{at::cat({sum_dy, sum_dy_xmu})};
    wait(g, g->backend->allreduce(both));
    auto mean_dy = both[0].narrow(0, 0, c) / n;
    auto mean_dy_xmu = both[0].narrow(0, c, c) / n;
    auto scale = weight.defined() ? invstd * weight.to(ct) : invstd;
    auto dx = (dy - per_channel(mean_dy, xf) -
               xmu * per_channel(invstd * invstd * mean_dy_xmu, xf)) *
              per_channel(scale, xf);
    return {dx.to(x.scalar_type()), grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void byol_c10d_free_string(char* s) { std::free(s); }

int byol_c10d_has_nccl() {
#ifdef BYOL_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Connects to (rank 0 or an agent: hosts) the TCPStore at host:port, prefixes it with
// `prefix`, and creates the process group. backend: 0 Gloo, 1 NCCL.
// gloo_iface / gloo_host: the network interface or address Gloo binds to (empty: default).
Group* byol_c10d_new_group(const char* host, int port, int rank, int world, int is_server,
                           const char* prefix, int64_t timeout_ms, int backend,
                           const char* gloo_iface, const char* gloo_host, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = is_server != 0;
    so.numWorkers = world;
    so.waitWorkers = true;  // a client adds itself to the count the server waits for
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 1) {
#ifdef BYOL_WITH_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl/", store), rank, world, opts);
#else
      throw std::runtime_error(
          "this byol was built without NCCL (libtorch_cuda.so and the nccl headers were "
          "not found at build time)");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      std::string iface(gloo_iface), ghost(gloo_host);
      if (!iface.empty()) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (!ghost.empty()) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(ghost));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
          c10::make_intrusive<c10d::PrefixStore>("gloo/", store), rank, world, opts);
    }
    out = new Group{store, pg, rank, world};
  });
  return out;
}

void byol_c10d_free_group(Group* g) { delete g; }

double byol_c10d_wait_seconds(Group* g) { return g->wait_ns.load() * 1e-9; }

int byol_c10d_all_reduce_sum(Group* g, at::Tensor** ts, size_t n, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> v;
    for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
    // Gloo reduces a list of tensors on one device into each of them; one call per tensor
    // keeps the semantics backend-independent.
    for (auto& t : v) {
      std::vector<at::Tensor> one{t};
      wait(g, g->backend->allreduce(one));
    }
  });
}

int byol_c10d_broadcast(Group* g, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g, g->backend->broadcast(v, o));
  });
}

// out: `world` new tensors (caller frees them), each a copy of one rank's `t`.
int byol_c10d_all_gather(Group* g, at::Tensor* t, at::Tensor** out, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> input{*t};
    std::vector<std::vector<at::Tensor>> output(1);
    for (int r = 0; r < g->world; ++r) output[0].push_back(at::empty_like(*t));
    wait(g, g->backend->allgather(output, input));
    for (int r = 0; r < g->world; ++r) out[r] = new at::Tensor(output[0][r]);
  });
}

int byol_c10d_barrier(Group* g, char** err) {
  return guarded(err, [&] { wait(g, g->backend->barrier()); });
}

int byol_c10d_store_set(Group* g, const char* key, const uint8_t* value, size_t len,
                        char** err) {
  return guarded(err, [&] {
    g->store->set(std::string(key), std::vector<uint8_t>(value, value + len));
  });
}

// *found = 0 when the key is not there (no waiting); else *value (malloc'ed) and *len.
int byol_c10d_store_try_get(Group* g, const char* key, int* found, uint8_t** value,
                            size_t* len, char** err) {
  return guarded(err, [&] {
    std::string k(key);
    *found = 0;
    if (!g->store->check({k})) return;
    auto v = g->store->get(k);
    *value = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    if (!v.empty()) std::memcpy(*value, v.data(), v.size());
    *len = v.size();
    *found = 1;
  });
}

// SyncBatchNorm in training mode; weight, bias, running_mean, running_var may be null.
at::Tensor* byol_c10d_sync_batch_norm(Group* g, at::Tensor* x, at::Tensor* weight,
                                      at::Tensor* bias, at::Tensor* running_mean,
                                      at::Tensor* running_var, double momentum, double eps,
                                      char** err) {
  at::Tensor* out = nullptr;
  guarded(err, [&] {
    auto opt = [](at::Tensor* t) { return t ? *t : at::Tensor(); };
    auto y = SyncBatchNormFn::apply(*x, opt(weight), opt(bias), opt(running_mean),
                                    opt(running_var), momentum, eps, g);
    out = new at::Tensor(y);
  });
  return out;
}

}  // extern "C"
