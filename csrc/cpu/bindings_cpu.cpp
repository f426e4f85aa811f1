// heron._C functions for CPU tensors. Signatures follow docs/kernels.md; every input is checked
// here (the Python layer validates first, these are the last line for direct callers).
#include <optional>
#include <tuple>

#include "bindings.h"
#include "common.h"
#include "cpu/checks_cpu.h"
#include "cpu/philox_cpu.h"
#include "cpu/zo_linear_cpu.h"
#include "cpu/zo_update_cpu.h"

namespace heron {
namespace {

using OptionalTensor = std::optional<torch::Tensor>;

void philox_randn_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CPU);
  check_key(seed, offset, out.numel());
  cpu::philox_randn(out.data_ptr(), static_cast<cpu::ScalarKind>(scalar_kind(out, "out")), out.numel(),
                    static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

void philox_words_cpu(torch::Tensor out, int64_t seed, int64_t offset) {
  check_tensor(out, "out", c10::DeviceType::CPU);
  check_words_out(out);
  check_key(seed, offset, out.size(0));
  cpu::philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                    static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

// x_base (M, K), x_pert like x_base or None, weight (N, K), bias (N,) or None, one dtype.
void check_linear_inputs(const torch::Tensor& x_base, const OptionalTensor& x_pert, const torch::Tensor& weight,
                         const OptionalTensor& bias) {
  check_cpu_float(x_base, "x_base");
  check_dim(x_base, "x_base", 2);
  if (x_pert.has_value()) {
    check_cpu_float(*x_pert, "x_pert");
    check_same_dtype(*x_pert, "x_pert", x_base, "x_base");
    check_sizes(*x_pert, "x_pert", x_base.sizes().vec(), "(like x_base)");
  }
  check_cpu_float(weight, "weight");
  check_same_dtype(weight, "weight", x_base, "x_base");
  check_dim(weight, "weight", 2);
  TORCH_CHECK(weight.size(1) == x_base.size(1), "weight must have shape (N, K) with K = x_base.size(1) = ",
              x_base.size(1), ", got ", weight.sizes());
  if (bias.has_value()) {
    check_cpu_float(*bias, "bias");
    check_same_dtype(*bias, "bias", x_base, "x_base");
    check_sizes(*bias, "bias", {weight.size(0)}, "(N,)");
  }
}

std::tuple<torch::Tensor, torch::Tensor> perturbed_linear_cpu(const torch::Tensor& x_base, const OptionalTensor& x_pert,
                                                              const torch::Tensor& weight, const OptionalTensor& bias,
                                                              int64_t seed, int64_t weight_offset, int64_t bias_offset,
                                                              double mu) {
  check_linear_inputs(x_base, x_pert, weight, bias);
  check_finite(mu, "mu");
  const int64_t n = weight.size(0), k = weight.size(1);
  check_key(seed, weight_offset, checked_product(n, k, "weight's numel"), "weight_offset");
  check_key(seed, bias_offset, bias.has_value() ? n : 0, "bias_offset");
  // rank 0: the kernel's full-direction mode
  const cpu::LinearKey key{static_cast<uint64_t>(seed), static_cast<uint64_t>(weight_offset),
                           static_cast<uint64_t>(bias_offset), 0, 0, 0, 0};
  return cpu::perturbed_linear(x_base, x_pert, weight, bias, key, mu);
}

std::tuple<torch::Tensor, torch::Tensor> lowrank_perturbed_linear_cpu(
    const torch::Tensor& x_base, const OptionalTensor& x_pert, const torch::Tensor& weight, const OptionalTensor& bias,
    int64_t seed, int64_t bias_offset, double mu, int64_t rank, int64_t u_seed, int64_t u_offset, int64_t v_offset) {
  check_linear_inputs(x_base, x_pert, weight, bias);
  check_finite(mu, "mu");
  const int64_t n = weight.size(0), k = weight.size(1);
  check_key(seed, bias_offset, bias.has_value() ? n : 0, "bias_offset");
  check_lowrank_keys(rank, n, k, seed, u_seed, u_offset, v_offset);
  const cpu::LinearKey key{static_cast<uint64_t>(seed),   0, static_cast<uint64_t>(bias_offset), rank,
                           static_cast<uint64_t>(u_seed), static_cast<uint64_t>(u_offset),
                           static_cast<uint64_t>(v_offset)};
  return cpu::perturbed_linear(x_base, x_pert, weight, bias, key, mu);
}

std::tuple<torch::Tensor, torch::Tensor> lora_perturbed_linear_cpu(
    const torch::Tensor& x_base, const OptionalTensor& x_pert, const torch::Tensor& weight, const OptionalTensor& bias,
    const torch::Tensor& lora_a, const torch::Tensor& lora_b, double scale, int64_t seed, int64_t a_offset,
    int64_t b_offset, double mu) {
  check_linear_inputs(x_base, x_pert, weight, bias);
  check_cpu_float(lora_a, "lora_a");
  check_same_dtype(lora_a, "lora_a", x_base, "x_base");
  check_dim(lora_a, "lora_a", 2);
  const int64_t n = weight.size(0), k = weight.size(1), r = lora_a.size(0);
  check_sizes(lora_a, "lora_a", {r, k}, "(r, K)");
  check_cpu_float(lora_b, "lora_b");
  check_same_dtype(lora_b, "lora_b", x_base, "x_base");
  check_sizes(lora_b, "lora_b", {n, r}, "(N, r) with r = lora_a.size(0)");
  check_finite(scale, "scale");
  check_finite(mu, "mu");
  check_key(seed, a_offset, lora_a.numel(), "a_offset");
  check_key(seed, b_offset, lora_b.numel(), "b_offset");
  const cpu::LoraKey key{static_cast<uint64_t>(seed), static_cast<uint64_t>(a_offset),
                         static_cast<uint64_t>(b_offset)};
  return cpu::lora_perturbed_linear(x_base, x_pert, weight, bias, lora_a, lora_b, scale, key, mu);
}

// The parameter as the core sees it; low-rank directions need it 2-D.
cpu::ParamSpec param_spec(const torch::Tensor& param, int64_t rank) {
  check_cpu_float(param, "param");
  TORCH_CHECK(rank == 0 || param.dim() == 2, "low-rank updates (rank > 0) need a 2-D param, got shape ",
              param.sizes());
  const int64_t rows = param.dim() == 2 ? param.size(0) : 1;
  const int64_t cols = param.dim() == 2 ? param.size(1) : param.numel();
  return cpu::ParamSpec{param.data_ptr(), static_cast<cpu::ScalarKind>(scalar_kind(param, "param")), param.numel(),
                        rows, cols};
}

// Full directions z_j[i] = randn(seeds[j], offset + i) over the param's flat index.
cpu::DirectionSpec full_directions(const cpu::ParamSpec& p, const torch::Tensor& seeds, const torch::Tensor& grads,
                                   int64_t offset) {
  check_seeds_grads(seeds, grads, offset, p.numel);
  return cpu::DirectionSpec{seeds.data_ptr<int64_t>(), grads.data_ptr<float>(), seeds.size(0),
                            static_cast<uint64_t>(offset), 0, 0, 0, 0};
}

// Low-rank directions z_j = U V_j^T / sqrt(rank) of a 2-D param.
cpu::DirectionSpec lowrank_directions(const cpu::ParamSpec& p, const torch::Tensor& seeds, const torch::Tensor& grads,
                                      int64_t rank, int64_t u_seed, int64_t u_offset, int64_t v_offset) {
  check_seeds_grads(seeds, grads, 0, 0);
  // Every V_j is keyed on seeds[j]; the key range does not depend on the seed value.
  check_lowrank_keys(rank, p.rows, p.cols, 0, u_seed, u_offset, v_offset);
  return cpu::DirectionSpec{seeds.data_ptr<int64_t>(), grads.data_ptr<float>(), seeds.size(0), 0, rank,
                            static_cast<uint64_t>(u_seed), static_cast<uint64_t>(u_offset),
                            static_cast<uint64_t>(v_offset)};
}

void zo_sgd_update_cpu(torch::Tensor param, const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset,
                       double lr, double weight_decay) {
  const cpu::ParamSpec p = param_spec(param, 0);
  check_finite(lr, "lr");
  check_finite(weight_decay, "weight_decay");
  cpu::zo_sgd_update(p, full_directions(p, seeds, grads, offset), lr, weight_decay);
}

void lowrank_zo_sgd_update_cpu(torch::Tensor param, const torch::Tensor& seeds, const torch::Tensor& grads, double lr,
                               double weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                               int64_t v_offset) {
  check_lowrank_rank(rank);
  const cpu::ParamSpec p = param_spec(param, rank);
  check_finite(lr, "lr");
  check_finite(weight_decay, "weight_decay");
  cpu::zo_sgd_update(p, lowrank_directions(p, seeds, grads, rank, u_seed, u_offset, v_offset), lr, weight_decay);
}

// The Adam moments and hyper-parameters, checked.
cpu::AdamHyper adam_hyper(const torch::Tensor& param, const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq,
                          double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                          bool decoupled_weight_decay) {
  check_moment(exp_avg, "exp_avg", param);
  check_moment(exp_avg_sq, "exp_avg_sq", param);
  TORCH_CHECK(exp_avg.numel() == 0 || exp_avg.data_ptr() != exp_avg_sq.data_ptr(),
              "exp_avg and exp_avg_sq must not share memory");
  check_finite(lr, "lr");
  check_finite(weight_decay, "weight_decay");
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be finite and non-negative, got ", eps);
  TORCH_CHECK(step >= 1, "step must be >= 1 (1-based, after this update), got ", step);
  return cpu::AdamHyper{lr, beta1, beta2, eps, weight_decay, step, decoupled_weight_decay};
}

void zo_adam_update_cpu(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                        const torch::Tensor& seeds, const torch::Tensor& grads, int64_t offset, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t step, bool decoupled_weight_decay) {
  const cpu::ParamSpec p = param_spec(param, 0);
  const cpu::AdamHyper hyper =
      adam_hyper(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, decoupled_weight_decay);
  cpu::zo_adam_update(p, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                      full_directions(p, seeds, grads, offset), hyper);
}

void lowrank_zo_adam_update_cpu(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                                const torch::Tensor& seeds, const torch::Tensor& grads, double lr, double beta1,
                                double beta2, double eps, double weight_decay, int64_t step,
                                bool decoupled_weight_decay, int64_t rank, int64_t u_seed, int64_t u_offset,
                                int64_t v_offset) {
  check_lowrank_rank(rank);
  const cpu::ParamSpec p = param_spec(param, rank);
  const cpu::AdamHyper hyper =
      adam_hyper(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, decoupled_weight_decay);
  cpu::zo_adam_update(p, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                      lowrank_directions(p, seeds, grads, rank, u_seed, u_offset, v_offset), hyper);
}

void perturb_cpu(torch::Tensor param, int64_t seed, int64_t offset, double alpha) {
  const cpu::ParamSpec p = param_spec(param, 0);
  check_key(seed, offset, p.numel);
  check_finite(alpha, "alpha");
  cpu::perturb(p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), alpha);
}

}  // namespace

void bind_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("philox_randn_cpu", &philox_randn_cpu, "Fill a contiguous CPU tensor with randn(seed, offset + i)",
        py::arg("out"), py::kw_only(), py::arg("seed"), py::arg("offset"));
  m.def("philox_words_cpu", &philox_words_cpu, "Philox4x32-10 words into an int32 (n, 4) CPU tensor",
        py::arg("out"), py::kw_only(), py::arg("seed"), py::arg("offset"));
  m.def("num_threads", &cpu::num_threads, "OpenMP threads used by the CPU kernels");

  m.def("perturbed_linear_cpu", &perturbed_linear_cpu,
        "(y_base, y_pert) of a linear layer and its perturbation W + mu*Z", py::arg("x_base"), py::arg("x_pert"),
        py::arg("weight"), py::arg("bias"), py::kw_only(), py::arg("seed"), py::arg("weight_offset"),
        py::arg("bias_offset"), py::arg("mu"));
  m.def("lowrank_perturbed_linear_cpu", &lowrank_perturbed_linear_cpu,
        "(y_base, y_pert) of a linear layer and its perturbation W + mu*U V^T/sqrt(rank)", py::arg("x_base"),
        py::arg("x_pert"), py::arg("weight"), py::arg("bias"), py::kw_only(), py::arg("seed"),
        py::arg("bias_offset"), py::arg("mu"), py::arg("rank"), py::arg("u_seed"), py::arg("u_offset"),
        py::arg("v_offset"));
  m.def("lora_perturbed_linear_cpu", &lora_perturbed_linear_cpu,
        "(y_base, y_pert) of a frozen linear layer with LoRA adapters, the adapters perturbed", py::arg("x_base"),
        py::arg("x_pert"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::kw_only(),
        py::arg("scale"), py::arg("seed"), py::arg("a_offset"), py::arg("b_offset"), py::arg("mu"));
  m.def("zo_sgd_update_cpu", &zo_sgd_update_cpu,
        "In place: param -= lr * (sum_j grads[j] z_j + weight_decay * param)", py::arg("param"), py::arg("seeds"),
        py::arg("grads"), py::kw_only(), py::arg("offset"), py::arg("lr"), py::arg("weight_decay"));
  m.def("lowrank_zo_sgd_update_cpu", &lowrank_zo_sgd_update_cpu,
        "In place: zo_sgd_update of a 2-D param with z_j = U V_j^T / sqrt(rank)", py::arg("param"),
        py::arg("seeds"), py::arg("grads"), py::kw_only(), py::arg("lr"), py::arg("weight_decay"), py::arg("rank"),
        py::arg("u_seed"), py::arg("u_offset"), py::arg("v_offset"));
  m.def("zo_adam_update_cpu", &zo_adam_update_cpu,
        "In place: one Adam / AdamW step of param and its moments with gradient sum_j grads[j] z_j",
        py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("seeds"), py::arg("grads"),
        py::kw_only(), py::arg("offset"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("decoupled_weight_decay"));
  m.def("lowrank_zo_adam_update_cpu", &lowrank_zo_adam_update_cpu,
        "In place: zo_adam_update of a 2-D param with z_j = U V_j^T / sqrt(rank)", py::arg("param"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("seeds"), py::arg("grads"), py::kw_only(), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("decoupled_weight_decay"), py::arg("rank"), py::arg("u_seed"), py::arg("u_offset"),
        py::arg("v_offset"));
  m.def("perturb_cpu", &perturb_cpu, "In place: param += alpha * z, z keyed (seed, offset)", py::arg("param"),
        py::kw_only(), py::arg("seed"), py::arg("offset"), py::arg("alpha"));
  m.def("_linear_tile_bytes_cpu", &cpu::linear_tile_bytes, "Tile budget (bytes) of the perturbed linear kernels");
  m.def("_set_linear_tile_bytes_cpu", &cpu::set_linear_tile_bytes,
        "Set the tile budget (bytes, for tests); returns the previous value", py::arg("bytes"));
}

}  // namespace heron
