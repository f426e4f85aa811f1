// heron._C functions for CUDA tensors (compiled only when HERON_WITH_CUDA is defined).
// Signatures follow docs/kernels.md; the checks here are the last line of defence for direct
// callers of heron._C (heron.kernels.functional validates first).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "bindings.h"
#include "common.h"
#include "cuda/checks_cuda.h"
#include "cuda/philox_cuda.h"
#include "cuda/zo_linear_cuda.h"
#include "cuda/zo_update_cuda.h"

namespace heron {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

cuda::ScalarKind kind_of(const torch::Tensor& t, const char* name) {
  return static_cast<cuda::ScalarKind>(scalar_kind(t, name));
}

void philox_randn_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CUDA);
  check_key(seed, offset, out.numel());
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(cuda::launch_philox_randn(out.data_ptr(), kind_of(out, "out"), out.numel(), static_cast<uint64_t>(seed),
                                       static_cast<uint64_t>(offset), current_stream()),
             "philox_randn CUDA launch");
}

void philox_words_cuda(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CUDA);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(cuda::launch_philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                                       static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), current_stream()),
             "philox_words CUDA launch");
}

// x_base (M, K) and, when given, x_pert like it; returns x_base's element kind.
cuda::ScalarKind check_inputs(const torch::Tensor& x_base, const std::optional<torch::Tensor>& x_pert) {
  check_cuda_tensor(x_base, "x_base", 2);
  const cuda::ScalarKind kind = kind_of(x_base, "x_base");
  if (x_pert.has_value()) {
    check_cuda_tensor(*x_pert, "x_pert", 2);
    check_same_device(*x_pert, "x_pert", x_base, "x_base");
    check_same_dtype(*x_pert, "x_pert", x_base, "x_base");
    check_shape(*x_pert, "x_pert", x_base.sizes(), "(M, K) of x_base");
  }
  return kind;
}

// A parameter of the layer: `shape`, contiguous, on x_base's device with x_base's dtype.
void check_layer_tensor(const torch::Tensor& t, const char* name, const torch::Tensor& x_base,
                        c10::IntArrayRef shape, const char* shape_text) {
  check_cuda_tensor(t, name, static_cast<int64_t>(shape.size()));
  check_same_device(t, name, x_base, "x_base");
  check_same_dtype(t, name, x_base, "x_base");
  check_shape(t, name, shape, shape_text);
}

// The linear kernels in full (rank 0, Z keyed (seed, weight_offset)) or low-rank mode (rank > 0).
std::tuple<torch::Tensor, torch::Tensor> run_perturbed_linear(
    const torch::Tensor& x_base, const std::optional<torch::Tensor>& x_pert, const torch::Tensor& weight,
    const std::optional<torch::Tensor>& bias, int64_t seed, int64_t weight_offset, int64_t bias_offset, double mu,
    int64_t rank, int64_t u_seed, int64_t u_offset, int64_t v_offset) {
  const cuda::ScalarKind kind = check_inputs(x_base, x_pert);
  const int64_t M = x_base.size(0), K = x_base.size(1);
  check_cuda_tensor(weight, "weight", 2);
  const int64_t N = weight.size(0);
  check_layer_tensor(weight, "weight", x_base, {N, K}, "(N, K) with K = x_base.size(1)");
  if (bias.has_value()) check_layer_tensor(*bias, "bias", x_base, {N}, "(N,) with N = weight.size(0)");
  check_nonnegative(seed, "seed");
  check_finite(mu, "mu");
  TORCH_CHECK(rank >= 0 && rank <= cuda::kMaxLinearRank, "rank must be in [0, ", cuda::kMaxLinearRank,
              "] for the CUDA kernels, got ", rank);
  if (rank == 0) {
    check_counter(weight_offset, N * K, "weight_offset");
  } else {
    check_nonnegative(weight_offset, "weight_offset");
  }
  check_counter(bias_offset, bias.has_value() ? N : 0, "bias_offset");
  check_nonnegative(u_seed, "u_seed");
  check_counter(u_offset, N * rank, "u_offset");
  check_counter(v_offset, K * rank, "v_offset");

  const c10::cuda::CUDAGuard guard(x_base.device());
  torch::Tensor y_base = torch::empty({M, N}, x_base.options());
  torch::Tensor y_pert = torch::empty({M, N}, x_base.options());
  cuda::PerturbedLinearArgs args;
  args.x_base = x_base.data_ptr();
  args.x_pert = x_pert.has_value() ? x_pert->data_ptr() : nullptr;
  args.weight = weight.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.y_base = y_base.data_ptr();
  args.y_pert = y_pert.data_ptr();
  args.kind = kind;
  args.M = M;
  args.N = N;
  args.K = K;
  args.seed = static_cast<uint64_t>(seed);
  args.weight_offset = static_cast<uint64_t>(weight_offset);
  args.bias_offset = static_cast<uint64_t>(bias_offset);
  args.mu = static_cast<float>(mu);
  args.rank = static_cast<int>(rank);
  args.u_seed = static_cast<uint64_t>(u_seed);
  args.u_offset = static_cast<uint64_t>(u_offset);
  args.v_offset = static_cast<uint64_t>(v_offset);
  check_cuda(cuda::launch_perturbed_linear(args, current_stream()), "perturbed_linear CUDA launch");
  return {y_base, y_pert};
}

std::tuple<torch::Tensor, torch::Tensor> perturbed_linear_cuda(
    const torch::Tensor& x_base, const std::optional<torch::Tensor>& x_pert, const torch::Tensor& weight,
    const std::optional<torch::Tensor>& bias, int64_t seed, int64_t weight_offset, int64_t bias_offset, double mu) {
  return run_perturbed_linear(x_base, x_pert, weight, bias, seed, weight_offset, bias_offset, mu, /*rank=*/0,
                              /*u_seed=*/0, /*u_offset=*/0, /*v_offset=*/0);
}

std::tuple<torch::Tensor, torch::Tensor> lowrank_perturbed_linear_cuda(
    const torch::Tensor& x_base, const std::optional<torch::Tensor>& x_pert, const torch::Tensor& weight,
    const std::optional<torch::Tensor>& bias, int64_t seed, int64_t bias_offset, double mu, int64_t rank,
    int64_t u_seed, int64_t u_offset, int64_t v_offset) {
  TORCH_CHECK(rank >= 1, "rank must be >= 1 for a low-rank direction, got ", rank);
  return run_perturbed_linear(x_base, x_pert, weight, bias, seed, /*weight_offset=*/0, bias_offset, mu, rank, u_seed,
                              u_offset, v_offset);
}

std::tuple<torch::Tensor, torch::Tensor> lora_perturbed_linear_cuda(
    const torch::Tensor& x_base, const std::optional<torch::Tensor>& x_pert, const torch::Tensor& weight,
    const std::optional<torch::Tensor>& bias, const torch::Tensor& lora_a, const torch::Tensor& lora_b, double scale,
    int64_t seed, int64_t a_offset, int64_t b_offset, double mu) {
  const cuda::ScalarKind kind = check_inputs(x_base, x_pert);
  const int64_t M = x_base.size(0), K = x_base.size(1);
  check_cuda_tensor(weight, "weight", 2);
  const int64_t N = weight.size(0);
  check_layer_tensor(weight, "weight", x_base, {N, K}, "(N, K) with K = x_base.size(1)");
  if (bias.has_value()) check_layer_tensor(*bias, "bias", x_base, {N}, "(N,) with N = weight.size(0)");
  check_cuda_tensor(lora_a, "lora_a", 2);
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r >= 1 && r <= cuda::kMaxLinearRank, "lora_a.size(0) (the LoRA rank) must be in [1, ",
              cuda::kMaxLinearRank, "] for the CUDA kernels, got ", r);
  check_layer_tensor(lora_a, "lora_a", x_base, {r, K}, "(r, K) with K = x_base.size(1)");
  check_layer_tensor(lora_b, "lora_b", x_base, {N, r}, "(N, r) with N = weight.size(0), r = lora_a.size(0)");
  check_finite(scale, "scale");
  check_finite(mu, "mu");
  check_nonnegative(seed, "seed");
  check_counter(a_offset, r * K, "a_offset");
  check_counter(b_offset, N * r, "b_offset");

  const c10::cuda::CUDAGuard guard(x_base.device());
  torch::Tensor y_base = torch::empty({M, N}, x_base.options());
  torch::Tensor y_pert = torch::empty({M, N}, x_base.options());
  const int splits = cuda::lora_split_count(M, K);
  torch::Tensor workspace = torch::empty({cuda::lora_workspace_floats(splits, M, static_cast<int>(r))},
                                         x_base.options().dtype(torch::kFloat32));
  cuda::LoraLinearArgs args;
  args.x_base = x_base.data_ptr();
  args.x_pert = x_pert.has_value() ? x_pert->data_ptr() : nullptr;
  args.weight = weight.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.lora_a = lora_a.data_ptr();
  args.lora_b = lora_b.data_ptr();
  args.y_base = y_base.data_ptr();
  args.y_pert = y_pert.data_ptr();
  args.kind = kind;
  args.M = M;
  args.N = N;
  args.K = K;
  args.rank = static_cast<int>(r);
  args.scale = static_cast<float>(scale);
  args.seed = static_cast<uint64_t>(seed);
  args.a_offset = static_cast<uint64_t>(a_offset);
  args.b_offset = static_cast<uint64_t>(b_offset);
  args.mu = static_cast<float>(mu);
  args.workspace = workspace.data_ptr<float>();
  args.splits = splits;
  check_cuda(cuda::launch_lora_perturbed_linear(args, current_stream()), "lora_perturbed_linear CUDA launch");
  return {y_base, y_pert};
}

// param (any shape) and the direction arrays seeds (q,) int64 / grads (q,) float32 on its device.
cuda::ScalarKind check_param_and_directions(const torch::Tensor& param, const torch::Tensor& seeds,
                                            const torch::Tensor& grads) {
  check_tensor(param, "param", c10::DeviceType::CUDA);
  const cuda::ScalarKind kind = kind_of(param, "param");
  check_cuda_tensor(seeds, "seeds", 1);
  check_same_device(seeds, "seeds", param, "param");
  check_dtype(seeds, "seeds", torch::kInt64);
  check_cuda_tensor(grads, "grads", 1);
  check_same_device(grads, "grads", param, "param");
  check_dtype(grads, "grads", torch::kFloat32);
  TORCH_CHECK(grads.size(0) == seeds.size(0), "grads must have the length of seeds (", seeds.size(0), "), got ",
              grads.size(0));
  return kind;
}

// Fills the direction fields of `args` (full or low rank) after checking the keys. Seed values
// live on the device and are not checked (that would need a host sync).
void set_directions(cuda::ZoUpdateArgs& args, const torch::Tensor& param, const torch::Tensor& seeds,
                    const torch::Tensor& grads, int64_t offset, int64_t rank, int64_t u_seed, int64_t u_offset,
                    int64_t v_offset, std::optional<torch::Tensor>& workspace) {
  check_nonnegative(rank, "rank");
  check_nonnegative(u_seed, "u_seed");
  args.param = param.data_ptr();
  args.numel = param.numel();
  args.seeds = seeds.data_ptr<int64_t>();
  args.grads = grads.data_ptr<float>();
  args.q = seeds.size(0);
  args.rank = rank;
  if (rank == 0) {
    check_counter(offset, param.numel(), "offset");
    check_nonnegative(u_offset, "u_offset");
    check_nonnegative(v_offset, "v_offset");
    args.offset = static_cast<uint64_t>(offset);
    return;
  }
  TORCH_CHECK(param.dim() == 2, "low-rank updates (rank > 0) need a 2-D param, got shape ", param.sizes());
  const int64_t rows = param.size(0), cols = param.size(1);
  check_nonnegative(offset, "offset");
  check_counter(u_offset, rows * rank, "u_offset");
  check_counter(v_offset, cols * rank, "v_offset");
  workspace = torch::empty({cuda::zo_lowrank_workspace_floats(rows, cols, rank)},
                           param.options().dtype(torch::kFloat32));
  args.rows = rows;
  args.cols = cols;
  args.u_seed = static_cast<uint64_t>(u_seed);
  args.u_offset = static_cast<uint64_t>(u_offset);
  args.v_offset = static_cast<uint64_t>(v_offset);
  args.workspace = workspace->data_ptr<float>();
}

// SGD with full (rank 0) or low-rank directions.
void run_zo_sgd_update(torch::Tensor param, const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset,
                       double lr, double weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                       int64_t v_offset) {
  const cuda::ScalarKind kind = check_param_and_directions(param, seeds, grads);
  check_finite(lr, "lr");
  check_finite(weight_decay, "weight_decay");
  const c10::cuda::CUDAGuard guard(param.device());
  cuda::ZoUpdateArgs args;
  args.kind = kind;
  std::optional<torch::Tensor> workspace;
  set_directions(args, param, seeds, grads, offset, rank, u_seed, u_offset, v_offset, workspace);
  check_cuda(cuda::launch_zo_sgd_update(args, lr, weight_decay, current_stream()), "zo_sgd_update CUDA launch");
}

void zo_sgd_update_cuda(torch::Tensor param, const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset,
                        double lr, double weight_decay) {
  run_zo_sgd_update(param, seeds, grads, offset, lr, weight_decay, /*rank=*/0, /*u_seed=*/0, /*u_offset=*/0,
                    /*v_offset=*/0);
}

void lowrank_zo_sgd_update_cuda(torch::Tensor param, const torch::Tensor& seeds, const torch::Tensor& grads,
                                double lr, double weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                                int64_t v_offset) {
  TORCH_CHECK(rank >= 1, "rank must be >= 1 for a low-rank direction, got ", rank);
  run_zo_sgd_update(param, seeds, grads, /*offset=*/0, lr, weight_decay, rank, u_seed, u_offset, v_offset);
}

// Adam / AdamW with full (rank 0) or low-rank directions.
void run_zo_adam_update(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                        const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset, double lr,
                        double beta1, double beta2, double eps, double weight_decay, int64_t step,
                        bool decoupled_weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                        int64_t v_offset) {
  const cuda::ScalarKind kind = check_param_and_directions(param, seeds, grads);
  const auto check_moment = [&param](const torch::Tensor& moment, const char* name) {
    check_tensor(moment, name, c10::DeviceType::CUDA);
    check_same_device(moment, name, param, "param");
    check_dtype(moment, name, torch::kFloat32);
    check_shape(moment, name, param.sizes(), "of param");
  };
  check_moment(exp_avg, "exp_avg");
  check_moment(exp_avg_sq, "exp_avg_sq");
  check_distinct(param, "param", exp_avg, "exp_avg");
  check_distinct(param, "param", exp_avg_sq, "exp_avg_sq");
  check_distinct(exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  check_finite(lr, "lr");
  check_finite(eps, "eps");
  check_finite(weight_decay, "weight_decay");
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(step >= 1, "step must be >= 1 (1-based, after this update), got ", step);
  const c10::cuda::CUDAGuard guard(param.device());
  cuda::ZoUpdateArgs args;
  args.kind = kind;
  std::optional<torch::Tensor> workspace;
  set_directions(args, param, seeds, grads, offset, rank, u_seed, u_offset, v_offset, workspace);
  cuda::AdamHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = beta1;
  hyper.beta2 = beta2;
  hyper.eps = eps;
  hyper.weight_decay = weight_decay;
  hyper.step = step;
  hyper.decoupled_weight_decay = decoupled_weight_decay;
  check_cuda(cuda::launch_zo_adam_update(args, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), hyper,
                                         current_stream()),
             "zo_adam_update CUDA launch");
}

void zo_adam_update_cuda(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                         const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset, double lr,
                         double beta1, double beta2, double eps, double weight_decay, int64_t step,
                         bool decoupled_weight_decay) {
  run_zo_adam_update(param, exp_avg, exp_avg_sq, seeds, grads, offset, lr, beta1, beta2, eps, weight_decay, step,
                     decoupled_weight_decay, /*rank=*/0, /*u_seed=*/0, /*u_offset=*/0, /*v_offset=*/0);
}

void lowrank_zo_adam_update_cuda(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                                 const torch::Tensor& seeds, const torch::Tensor& grads, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t step,
                                 bool decoupled_weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                                 int64_t v_offset) {
  TORCH_CHECK(rank >= 1, "rank must be >= 1 for a low-rank direction, got ", rank);
  run_zo_adam_update(param, exp_avg, exp_avg_sq, seeds, grads, /*offset=*/0, lr, beta1, beta2, eps, weight_decay,
                     step, decoupled_weight_decay, rank, u_seed, u_offset, v_offset);
}

void perturb_cuda(torch::Tensor param, int64_t seed, int64_t offset, double alpha) {
  check_tensor(param, "param", c10::DeviceType::CUDA);
  const cuda::ScalarKind kind = kind_of(param, "param");
  check_nonnegative(seed, "seed");
  check_counter(offset, param.numel(), "offset");
  check_finite(alpha, "alpha");
  const c10::cuda::CUDAGuard guard(param.device());
  check_cuda(cuda::launch_perturb(param.data_ptr(), kind, param.numel(), static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset), alpha, current_stream()),
             "perturb CUDA launch");
}

}  // namespace

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("philox_randn_cuda", &philox_randn_cuda, py::arg("out"), py::kw_only(), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cuda", &philox_words_cuda, py::arg("out"), py::kw_only(), py::arg("seed"), py::arg("offset"));
  m.def("perturbed_linear_cuda", &perturbed_linear_cuda,
        "(y_base, y_pert) = (x_base @ W.T + b, x_pert @ (W + mu Z).T + b + mu z_b)", py::arg("x_base"),
        py::arg("x_pert"), py::arg("weight"), py::arg("bias"), py::kw_only(), py::arg("seed"),
        py::arg("weight_offset"), py::arg("bias_offset"), py::arg("mu"));
  m.def("lowrank_perturbed_linear_cuda", &lowrank_perturbed_linear_cuda,
        "perturbed_linear_cuda with Z = U V^T / sqrt(rank)", py::arg("x_base"), py::arg("x_pert"), py::arg("weight"),
        py::arg("bias"), py::kw_only(), py::arg("seed"), py::arg("bias_offset"), py::arg("mu"), py::arg("rank"),
        py::arg("u_seed"), py::arg("u_offset"), py::arg("v_offset"));
  m.def("lora_perturbed_linear_cuda", &lora_perturbed_linear_cuda,
        "(y_base, y_pert) of a frozen linear layer with LoRA adapters A, B perturbed by Z_A, Z_B",
        py::arg("x_base"), py::arg("x_pert"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"),
        py::arg("lora_b"), py::kw_only(), py::arg("scale"), py::arg("seed"), py::arg("a_offset"),
        py::arg("b_offset"), py::arg("mu"));
  m.def("zo_sgd_update_cuda", &zo_sgd_update_cuda,
        "In place: param -= lr * (sum_j grads[j] z_j + weight_decay * param)", py::arg("param"), py::arg("seeds"),
        py::arg("grads"), py::kw_only(), py::arg("offset"), py::arg("lr"), py::arg("weight_decay"));
  m.def("lowrank_zo_sgd_update_cuda", &lowrank_zo_sgd_update_cuda,
        "In place: zo_sgd_update of a 2-D param with z_j = U V_j^T / sqrt(rank)", py::arg("param"),
        py::arg("seeds"), py::arg("grads"), py::kw_only(), py::arg("lr"), py::arg("weight_decay"), py::arg("rank"),
        py::arg("u_seed"), py::arg("u_offset"), py::arg("v_offset"));
  m.def("zo_adam_update_cuda", &zo_adam_update_cuda,
        "In place Adam / AdamW step on param, exp_avg, exp_avg_sq with gradient sum_j grads[j] z_j",
        py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("seeds"), py::arg("grads"),
        py::kw_only(), py::arg("offset"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("decoupled_weight_decay"));
  m.def("lowrank_zo_adam_update_cuda", &lowrank_zo_adam_update_cuda,
        "In place: zo_adam_update of a 2-D param with z_j = U V_j^T / sqrt(rank)", py::arg("param"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("seeds"), py::arg("grads"), py::kw_only(), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("decoupled_weight_decay"), py::arg("rank"), py::arg("u_seed"), py::arg("u_offset"),
        py::arg("v_offset"));
  m.def("perturb_cuda", &perturb_cuda, "In place: param += alpha * z, z keyed (seed, offset)", py::arg("param"),
        py::kw_only(), py::arg("seed"), py::arg("offset"), py::arg("alpha"));
}

}  // namespace heron
