"""The public functional API of heron's fused zeroth-order ops.

Each function validates its input (naming the argument, and the shape/dtype/device it got),
flattens leading batch dims, makes inputs contiguous (a copy for non-contiguous tensors), and
calls the `torch.library` op, which dispatches to Triton (CUDA tensors), C++ (CPU tensors) or the
PyTorch reference. `backend` pins an implementation ("triton", "cuda", "cpu", "torch").

Offsets follow heron's stream contract (heron.kernels.stream): parameter element (n, k) of an (N, K)
weight keyed by (seed, offset) uses counter offset + n*K + k. Defaults lay out the bias right
after the weight, as heron.ParameterLayout does for nn.Linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from heron.kernels import backends, chunked
from heron.kernels.ops import FLOAT_DTYPES  # importing ops registers torch.ops.heron.*
from heron.kernels.stream import COUNTER_LIMIT, check_int, check_key


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_float_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {_describe(t)}")
    return t


def _check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {_describe(t)}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {_describe(t)}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got {_describe(t)}")


FLOAT32_MAX = torch.finfo(torch.float32).max  # the kernels compute in float32: larger scalars become inf


def check_scalar(value: object, name: str, *, nonzero: bool = False, non_negative: bool = False) -> float:
    """`value` (a real number or a one-element real tensor) as a float that is finite in float32,
    the precision the kernels compute in, or a TypeError / ValueError naming `name` and what it got.
    nonzero: also refuse values that are 0 in float32 (e.g. 1e-50)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), got {value}") from None
    if not abs(number) <= FLOAT32_MAX:  # NaN fails too
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), got {number}")
    if nonzero and float(torch.tensor(number, dtype=torch.float32)) == 0.0:
        raise ValueError(f"{name} must be non-zero in float32 (it divides the finite difference), got {number}")
    if non_negative and number < 0.0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    return number


def check_finite_float32(t: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming `name` when a floating tensor holds a value that is not finite in float32
    (NaN, inf, or beyond float32's range: what check_scalar refuses, for a whole tensor)."""
    bad = ~(t.detach().abs() <= FLOAT32_MAX)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite in float32 (|value| <= {FLOAT32_MAX:.4g}), got {t[index].item()}"
                         + (f" at index {index}" if index else ""))


def _check_disjoint(*named: tuple[torch.Tensor, str]) -> None:
    """Raise a ValueError when two of the tensors share memory (the same tensor, views of each other,
    or partly overlapping views): an in-place op that writes one while reading another would be wrong.
    Sorted by start address, so many tensors (a whole model's parameters and moments) check quickly."""
    spans = []
    for t, name in named:
        if t.numel():
            extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
            spans.append((t.data_ptr(), t.data_ptr() + extent * t.element_size(), name))
    spans.sort(key=lambda span: span[0])
    furthest = None  # the span reaching furthest among those before
    for span in spans:
        if furthest is not None and span[0] < furthest[1]:
            first, second = furthest, span
            raise ValueError(f"{first[2]} and {second[2]} must not share memory, got overlapping byte ranges "
                             f"[{first[0]:#x}, {first[1]:#x}) and [{second[0]:#x}, {second[1]:#x})")
        if furthest is None or span[1] > furthest[1]:
            furthest = span


def check_betas(betas: object) -> tuple[float, float]:
    """Adam's (beta1, beta2), each in [0, 1), or a TypeError / ValueError saying what betas got."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (check_scalar(b, f"betas[{i}]") for i, b in enumerate(betas))
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
    return beta1, beta2


def _backend_name(backend: str | None, device: torch.device) -> str:
    return backends.resolve(backend, device)


def _check_linear_inputs(x, weight, bias, x_pert) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks x (..., K), weight (N, K), bias (N,), x_pert like x; returns (x2d, x_pert2d)."""
    _check_float_tensor(x, "x")
    _check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {_describe(weight)}")
    _check_like(weight, "weight", x, "x")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must equal weight's in_features {weight.shape[1]}: x has {_describe(x)}, "
                         f"weight has {_describe(weight)}")
    if bias is not None:
        _check_float_tensor(bias, "bias")
        _check_like(bias, "bias", x, "x")
        _check_shape(bias, "bias", (weight.shape[0],), "out_features of weight")
    # The ops are forward-only (zeroth order): inputs are detached so tensors that require grad,
    # such as a module's parameters, can be passed without building an autograd graph.
    rows = math.prod(x.shape[:-1])  # not reshape(-1, K): ambiguous when K is 0
    x2d = x.detach().reshape(rows, x.shape[-1]).contiguous()
    if x_pert is None:
        return x2d, None
    _check_float_tensor(x_pert, "x_pert")
    _check_like(x_pert, "x_pert", x, "x")
    _check_shape(x_pert, "x_pert", tuple(x.shape), "the shape of x")
    return x2d, x_pert.detach().reshape(rows, x.shape[-1]).contiguous()


def _frozen(t: torch.Tensor | None) -> torch.Tensor | None:
    """Detached and contiguous (a copy only when non-contiguous)."""
    return None if t is None else t.detach().contiguous()


def _unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


def perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, seed: int, offset: int = 0,
    mu: float, x_pert: torch.Tensor | None = None, bias_offset: int | None = None, backend: str | None = None,
    scratch_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and perturbed streams of a linear layer in one pass over the weights.

    y_base = x @ W.T + b;  y_pert = x_pert @ (W + mu Z).T + (b + mu z_b)

    Args:
        x: (..., in) base-stream input (float32/bfloat16/float16).
        weight: (out, in); bias: (out,) or None; same dtype and device as x.
        seed, offset: Z[o, i] = randn(seed, offset + o*in + i).
        mu: the perturbation scale; finite and non-zero.
        x_pert: (..., in) perturbed-stream input, or None when both streams share x (the first
            perturbed layer): then y_pert = y_base + mu * x @ Z.T + mu z_b and x is read once.
        bias_offset: z_b[o] = randn(seed, bias_offset + o); default offset + out*in.
        backend: None (best for the device) or "triton" / "cuda" / "cpu" / "torch".
        scratch_budget: on CUDA tensors, the bytes of perturbation scratch the op may take
            (heron.kernels.chunked: W + mu Z for chunks of output rows, then cuBLAS); None: the global
            budget (chunked.set_scratch_budget, 32 MiB by default); 0: the fused kernel, no scratch.
            perturbed_linear_scratch_bytes says what a call takes. CPU tensors ignore it.
    Returns:
        (y_base, y_pert), each (..., out) in x's dtype (float32 accumulation).
    Non-contiguous inputs are copied to contiguous ones first.
    """
    x2d, xp2d = _check_linear_inputs(x, weight, bias, x_pert)
    mu = check_scalar(mu, "mu", nonzero=True)
    scratch_budget = None if scratch_budget is None else chunked.check_budget(scratch_budget)
    out_features, in_features = weight.shape
    seed, offset = check_key(seed, offset, out_features * in_features, offset_name="offset")
    bias_offset = offset + out_features * in_features if bias_offset is None else bias_offset
    _, bias_offset = check_key(seed, bias_offset, out_features, offset_name="bias_offset")
    y_base, y_pert = torch.ops.heron.perturbed_linear(
        x_base=x2d, x_pert=xp2d, weight=_frozen(weight), bias=_frozen(bias), seed=seed, weight_offset=offset,
        bias_offset=bias_offset, mu=mu, backend=_backend_name(backend, x.device), scratch_budget=scratch_budget)
    return _unflatten(y_base, x), _unflatten(y_pert, x)


def perturbed_linear_scratch_bytes(weight: torch.Tensor, *, scratch_budget: int | None = None) -> int:
    """Bytes of perturbation scratch perturbed_linear takes on CUDA tensors for `weight` (N, K) beyond its
    two outputs: rows * (K + 1) elements of weight's dtype for the largest chunk of rows within the budget
    (None: the global one), or 0 where the fused kernel runs (budget 0, or below one row)."""
    _check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {_describe(weight)}")
    budget = chunked.get_scratch_budget() if scratch_budget is None else chunked.check_budget(scratch_budget)
    chunks = chunked.row_chunks(*weight.shape, weight.dtype, budget)
    return 0 if chunks is None else chunks.scratch_bytes


def lowrank_offsets(offset: int, out_features: int, rank: int) -> tuple[int, int]:
    """Default (u_offset, v_offset) of a low-rank direction for a weight starting at `offset`:
    U (out x r) first, then V (in x r), inside the weight's own counter range when r(out+in) <= out*in."""
    return offset, offset + out_features * rank


def _lowrank_factor_offsets(u_seed: int, offset: int, out_features: int, in_features: int, rank: int,
                            u_offset: int | None, v_offset: int | None) -> tuple[int, int]:
    """Validated (u_offset, v_offset) of U (out x r) and V (in x r), defaulting to lowrank_offsets(offset, ...)."""
    default_u, default_v = lowrank_offsets(offset, out_features, rank)
    _, u_offset = check_key(u_seed, default_u if u_offset is None else u_offset, out_features * rank,
                            offset_name="u_offset")
    _, v_offset = check_key(u_seed, default_v if v_offset is None else v_offset, in_features * rank,
                            offset_name="v_offset")
    return u_offset, v_offset


def lowrank_perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, seed: int, rank: int, mu: float,
    offset: int = 0, u_seed: int | None = None, u_offset: int | None = None, v_offset: int | None = None,
    x_pert: torch.Tensor | None = None, bias_offset: int | None = None, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """perturbed_linear with a low-rank weight direction Z = U @ V.T / sqrt(rank), never formed.

    U (out x rank) is keyed by (u_seed, u_offset) and V (in x rank) by (seed, v_offset); passing
    the same u_seed for several steps holds the subspace U fixed (a lazy subspace) while V changes.
    The bias (if any) gets the full direction z_b keyed by (seed, bias_offset).

    Args:
        x: (..., in); weight (out, in); bias (out,) or None.
        rank: 1 <= rank <= min(out, in).
        u_seed: defaults to seed; u_offset, v_offset default to lowrank_offsets(offset, out, rank).
        bias_offset: defaults to offset + out*in.
    Returns:
        (y_base, y_pert), each (..., out) in x's dtype.
    """
    x2d, xp2d = _check_linear_inputs(x, weight, bias, x_pert)
    mu = check_scalar(mu, "mu", nonzero=True)
    out_features, in_features = weight.shape
    rank = _check_rank(rank, out_features, in_features)
    seed, offset = check_key(seed, offset, out_features * in_features, offset_name="offset")
    u_seed = seed if u_seed is None else check_int(u_seed, "u_seed", limit=COUNTER_LIMIT)
    u_offset, v_offset = _lowrank_factor_offsets(u_seed, offset, out_features, in_features, rank, u_offset, v_offset)
    bias_offset = offset + out_features * in_features if bias_offset is None else bias_offset
    _, bias_offset = check_key(seed, bias_offset, out_features, offset_name="bias_offset")
    y_base, y_pert = torch.ops.heron.lowrank_perturbed_linear(
        x_base=x2d, x_pert=xp2d, weight=_frozen(weight), bias=_frozen(bias), seed=seed, bias_offset=bias_offset, mu=mu,
        rank=rank, u_seed=u_seed, u_offset=u_offset, v_offset=v_offset, backend=_backend_name(backend, x.device))
    return _unflatten(y_base, x), _unflatten(y_pert, x)


def _check_rank(rank: object, out_features: int, in_features: int) -> int:
    rank = check_int(rank, "rank", limit=COUNTER_LIMIT)
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, min(out, in) = {min(out_features, in_features)}], got {rank}")
    return rank


def lora_perturbed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    *, scale: float, seed: int, mu: float, offset: int = 0, b_offset: int | None = None,
    x_pert: torch.Tensor | None = None, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-stream LoRA linear: frozen W, b; only the adapters A, B are perturbed.

    y_base = x @ W.T + b + scale * (x @ A.T) @ B.T
    y_pert = x_pert @ W.T + b + scale * (x_pert @ (A + mu Z_A).T) @ (B + mu Z_B).T

    Args:
        x: (..., in); weight (out, in); bias (out,) or None; lora_a (r, in); lora_b (out, r); all
            the same dtype and device.
        scale: the LoRA scale (alpha / r).
        offset: Z_A[j, i] = randn(seed, offset + j*in + i); b_offset: Z_B[o, j] = randn(seed, b_offset + o*r + j),
            default offset + r*in (A then B, as ParameterLayout lays out LoRALinear's adapters).
        x_pert: None when both streams share x (the x @ W.T work is then done once).
    Returns:
        (y_base, y_pert), each (..., out) in x's dtype.
    """
    x2d, xp2d = _check_linear_inputs(x, weight, bias, x_pert)
    for t, name in ((lora_a, "lora_a"), (lora_b, "lora_b")):
        _check_float_tensor(t, name)
        _check_like(t, name, x, "x")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got {_describe(t)}")
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    _check_shape(lora_a, "lora_a", (rank, in_features), "(r, in_features of weight)")
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_b must have shape (out_features, r) = ({out_features}, {rank}) to match weight "
                         f"{tuple(weight.shape)} and lora_a {tuple(lora_a.shape)}, got {_describe(lora_b)}")
    mu = check_scalar(mu, "mu", nonzero=True)
    scale = check_scalar(scale, "scale")
    seed, offset = check_key(seed, offset, lora_a.numel(), offset_name="offset")
    b_offset = offset + lora_a.numel() if b_offset is None else b_offset
    _, b_offset = check_key(seed, b_offset, lora_b.numel(), offset_name="b_offset")
    y_base, y_pert = torch.ops.heron.lora_perturbed_linear(
        x_base=x2d, x_pert=xp2d, weight=_frozen(weight), bias=_frozen(bias), lora_a=_frozen(lora_a),
        lora_b=_frozen(lora_b), scale=scale, seed=seed, a_offset=offset, b_offset=b_offset, mu=mu,
        backend=_backend_name(backend, x.device))
    return _unflatten(y_base, x), _unflatten(y_pert, x)


def _directions(seed, grad, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seeds int64 (q,), grads float32 (q,)) on `device` from one (seed, grad) or a list of pairs."""
    if grad is None:
        if isinstance(seed, (int, torch.Tensor)) or not isinstance(seed, Sequence) or len(seed) == 0:
            raise TypeError("seed must be an int with grad given, or a non-empty sequence of (seed, grad) pairs, "
                            f"got seed={seed!r}, grad=None")
        pairs = list(seed)
    else:
        pairs = [(seed, grad)]
    seeds, grads = [], []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"seed[{index}] must be a (seed, grad) pair, got {pair!r}")
        seeds.append(check_int(pair[0], "seed" if grad is not None else f"seed[{index}][0]", limit=COUNTER_LIMIT))
        g, name = pair[1], "grad" if grad is not None else f"seed[{index}][1] (grad)"
        if isinstance(g, torch.Tensor) and g.device.type != "cpu":
            if g.numel() != 1 or g.dtype == torch.bool or g.dtype.is_complex:
                raise TypeError(f"{name} must be a real number, got a {g.dtype} tensor of shape {tuple(g.shape)}")
            g = g.reshape(()).to(device=device, dtype=torch.float32)
            check_finite_float32(g, name)  # one host sync for a device tensor
            grads.append(g)
        else:
            grads.append(torch.tensor(check_scalar(g, name), dtype=torch.float32, device=device))
    return torch.tensor(seeds, dtype=torch.int64, device=device), torch.stack(grads)


def _lowrank_keys(param: torch.Tensor, seeds: torch.Tensor, offset: int, rank: int, u_seed, u_offset,
                  v_offset) -> dict[str, int]:
    """The validated keys of a low-rank direction (rank > 0) of a 2-D param starting at `offset`, by the
    low-rank ops' argument names."""
    if param.dim() != 2:
        raise ValueError(f"rank > 0 (low-rank directions) needs a 2-D parameter, got {_describe(param)}")
    out_features, in_features = param.shape
    rank = _check_rank(rank, out_features, in_features)
    if u_seed is None:
        if seeds.numel() != 1:
            raise ValueError("u_seed must be given for low-rank updates with several directions")
        u_seed = int(seeds[0])
    u_seed = check_int(u_seed, "u_seed", limit=COUNTER_LIMIT)
    u_offset, v_offset = _lowrank_factor_offsets(u_seed, offset, out_features, in_features, rank, u_offset, v_offset)
    return {"rank": rank, "u_seed": u_seed, "u_offset": u_offset, "v_offset": v_offset}


def _check_param(param: object, name: str = "param") -> torch.Tensor:
    _check_float_tensor(param, name)
    if param.device.type not in backends.SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"{name} must be on a cpu or cuda device, got {_describe(param)}")
    return param


def _in_place(param: torch.Tensor, update) -> torch.Tensor:
    """Run `update(contiguous_param)`; non-contiguous params go through a contiguous copy."""
    with torch.no_grad():
        if param.is_contiguous():
            update(param)
        else:
            work = param.contiguous()
            update(work)
            param.copy_(work)
    return param


def _sgd_hyper(lr, weight_decay) -> dict[str, float]:
    """The SGD ops' hyperparameter arguments, checked."""
    return {"lr": check_scalar(lr, "lr"), "weight_decay": check_scalar(weight_decay, "weight_decay", non_negative=True)}


def zo_sgd_update_(
    param: torch.Tensor, seed: int | Sequence[tuple[int, float]], grad: float | torch.Tensor | None = None, *,
    lr: float, offset: int = 0, weight_decay: float = 0.0, rank: int = 0, u_seed: int | None = None,
    u_offset: int | None = None, v_offset: int | None = None, backend: str | None = None,
) -> torch.Tensor:
    """In-place seeded SGD: param -= lr * (sum_j g_j z_j + weight_decay * param).

    Args:
        param: any shape, float32/bfloat16/float16 (math in float32).
        seed, grad: one direction's seed and projected-gradient scalar g = (L(theta+mu u) - L(theta)) / mu,
            or seed = [(seed_j, g_j), ...] for q directions applied in one pass (pass g_j / q to average).
            grad may be a 0-d real tensor; each grad must be finite in float32 (checked: one host sync
            for a CUDA tensor).
        offset: the parameter's first counter (ParameterLayout.offset).
        rank: 0 for full Gaussian directions; r > 0 for low-rank z_j = U V_j.T / sqrt(r) (2-D params),
            U keyed by (u_seed, u_offset) (u_seed defaults to the single direction's seed), V_j by
            (seed_j, v_offset); offsets default to lowrank_offsets(offset, out, r).
    Returns:
        param, updated in place.
    """
    _check_param(param)
    seeds, grads = _directions(seed, grad, param.device)
    hyper = _sgd_hyper(lr, weight_decay)
    offset = check_key(0, offset, param.numel())[1]
    name = _backend_name(backend, param.device)
    if rank == 0:
        return _in_place(param, lambda p: torch.ops.heron.zo_sgd_update_(
            param=p, seeds=seeds, grads=grads, offset=offset, **hyper, backend=name))
    keys = _lowrank_keys(param, seeds, offset, rank, u_seed, u_offset, v_offset)
    return _in_place(param, lambda p: torch.ops.heron.lowrank_zo_sgd_update_(
        param=p, seeds=seeds, grads=grads, **hyper, **keys, backend=name))


def _check_moments(param: torch.Tensor, exp_avg: object, exp_avg_sq: object, index: str = "") -> None:
    """Adam's moments of `param`: float32 tensors of its shape on its device, contiguous (names
    suffixed with `index`, e.g. "[3]", when checking one of many)."""
    for t, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        name = f"{name}s{index}" if index else name
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got "
                            f"{_describe(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
        _check_like(t, name, param, f"params{index}" if index else "param", dtype=False)
        _check_shape(t, name, tuple(param.shape), "param's shape")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _adam_hyper(lr, step, betas, eps, weight_decay, decoupled_weight_decay) -> dict[str, float | int | bool]:
    """The Adam ops' hyperparameter arguments, checked."""
    beta1, beta2 = check_betas(betas)
    step = check_int(step, "step", limit=2**62)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based count of this update), got {step}")
    return {"lr": check_scalar(lr, "lr"), "beta1": beta1, "beta2": beta2,
            "eps": check_scalar(eps, "eps", non_negative=True),
            "weight_decay": check_scalar(weight_decay, "weight_decay", non_negative=True), "step": step,
            "decoupled_weight_decay": bool(decoupled_weight_decay)}


def zo_adam_update_(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    seed: int | Sequence[tuple[int, float]], grad: float | torch.Tensor | None = None, *, lr: float, step: int,
    offset: int = 0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False, rank: int = 0, u_seed: int | None = None, u_offset: int | None = None,
    v_offset: int | None = None, backend: str | None = None,
) -> torch.Tensor:
    """In-place seeded Adam (or AdamW with decoupled_weight_decay=True) with gradient sum_j g_j z_j.

    The gradient is regenerated element by element from the seeds; no temporary the size of param.

    Args:
        param: any shape, float32/bfloat16/float16; exp_avg, exp_avg_sq: float32, param's shape and device,
            contiguous; no two of the three may share memory.
        seed, grad, offset, rank, u_seed, u_offset, v_offset: as in zo_sgd_update_.
        step: 1-based count of this update (bias correction uses beta**step).
    Returns:
        param, updated in place (moments too).
    """
    _check_param(param)
    _check_moments(param, exp_avg, exp_avg_sq)
    _check_disjoint((param, "param"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq"))
    seeds, grads = _directions(seed, grad, param.device)
    hyper = _adam_hyper(lr, step, betas, eps, weight_decay, decoupled_weight_decay)
    offset = check_key(0, offset, param.numel())[1]
    name = _backend_name(backend, param.device)
    if rank == 0:
        return _in_place(param, lambda p: torch.ops.heron.zo_adam_update_(
            param=p, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, seeds=seeds, grads=grads, offset=offset, **hyper,
            backend=name))
    keys = _lowrank_keys(param, seeds, offset, rank, u_seed, u_offset, v_offset)
    return _in_place(param, lambda p: torch.ops.heron.lowrank_zo_adam_update_(
        param=p, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, seeds=seeds, grads=grads, **hyper, **keys, backend=name))


def _checked_params(params: object, offsets: object) -> tuple[list[torch.Tensor], list[int]]:
    """params (a sequence of tensors on one device) and their first counters, checked by index."""
    if not isinstance(params, Sequence) or isinstance(params, torch.Tensor) or not params:
        raise TypeError(f"params must be a non-empty sequence of tensors, got {type(params).__name__}")
    params = [_check_param(p, f"params[{i}]") for i, p in enumerate(params)]
    if not isinstance(offsets, Sequence) or len(offsets) != len(params):
        got = f"{len(offsets)} offsets" if isinstance(offsets, Sequence) else type(offsets).__name__
        raise ValueError(f"offsets must hold one first counter per parameter ({len(params)}), got {got}")
    for i, p in enumerate(params[1:], 1):
        _check_like(p, f"params[{i}]", params[0], "params[0]", dtype=False)
    return params, [check_key(0, o, p.numel())[1] for p, o in zip(params, offsets, strict=True)]


def zo_sgd_update_many_(
    params: Sequence[torch.Tensor], seed: int | Sequence[tuple[int, float]],
    grad: float | torch.Tensor | None = None, *, lr: float, offsets: Sequence[int], weight_decay: float = 0.0,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """zo_sgd_update_ (full directions) of every tensor of `params`, params[i] keyed from offsets[i]:
    one call for a whole model's parameters (what a ZO step's optimizer does), every argument checked
    before any tensor is written, the shared ones once. Returns params, updated in place."""
    params, offsets = _checked_params(params, offsets)
    _check_disjoint(*((p, f"params[{i}]") for i, p in enumerate(params)))
    seeds, grads = _directions(seed, grad, params[0].device)
    hyper = _sgd_hyper(lr, weight_decay)
    name = _backend_name(backend, params[0].device)
    for param, offset in zip(params, offsets, strict=True):
        _in_place(param, lambda p, offset=offset: torch.ops.heron.zo_sgd_update_(
            param=p, seeds=seeds, grads=grads, offset=offset, **hyper, backend=name))
    return params


def zo_adam_update_many_(
    params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    seed: int | Sequence[tuple[int, float]], grad: float | torch.Tensor | None = None, *, lr: float, step: int,
    offsets: Sequence[int], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False, backend: str | None = None,
) -> list[torch.Tensor]:
    """zo_adam_update_ (full directions) of every tensor of `params` with its moments exp_avgs[i],
    exp_avg_sqs[i], keyed from offsets[i]: one call for a whole model's parameters, every argument
    checked before any tensor is written (no two of all the tensors may share memory), the shared
    ones once. Returns params, updated in place (moments too)."""
    params, offsets = _checked_params(params, offsets)
    for moments, name in ((exp_avgs, "exp_avgs"), (exp_avg_sqs, "exp_avg_sqs")):
        if not isinstance(moments, Sequence) or len(moments) != len(params):
            got = f"{len(moments)} tensors" if isinstance(moments, Sequence) else type(moments).__name__
            raise ValueError(f"{name} must hold one tensor per parameter ({len(params)}), got {got}")
    for i, (param, exp_avg, exp_avg_sq) in enumerate(zip(params, exp_avgs, exp_avg_sqs, strict=True)):
        _check_moments(param, exp_avg, exp_avg_sq, f"[{i}]")
    _check_disjoint(*((t, f"{name}[{i}]") for name, tensors in (("params", params), ("exp_avgs", exp_avgs),
                                                                  ("exp_avg_sqs", exp_avg_sqs))
                      for i, t in enumerate(tensors)))
    seeds, grads = _directions(seed, grad, params[0].device)
    hyper = _adam_hyper(lr, step, betas, eps, weight_decay, decoupled_weight_decay)
    name = _backend_name(backend, params[0].device)
    for param, exp_avg, exp_avg_sq, offset in zip(params, exp_avgs, exp_avg_sqs, offsets, strict=True):
        _in_place(param, lambda p, m=exp_avg, v=exp_avg_sq, offset=offset: torch.ops.heron.zo_adam_update_(
            param=p, exp_avg=m, exp_avg_sq=v, seeds=seeds, grads=grads, offset=offset, **hyper, backend=name))
    return params


def perturb_(param: torch.Tensor, seed: int, *, alpha: float, offset: int = 0,
             backend: str | None = None) -> torch.Tensor:
    """In place: param += alpha * z, z keyed by (seed, offset) (for layers without a fused forward).

    perturb_(p, s, alpha=mu) followed by perturb_(p, s, alpha=-mu) restores p up to rounding.
    """
    _check_param(param)
    alpha = check_scalar(alpha, "alpha")
    seed, offset = check_key(seed, offset, param.numel())
    name = _backend_name(backend, param.device)
    return _in_place(param, lambda p: torch.ops.heron.perturb_(param=p, seed=seed, offset=offset, alpha=alpha,
                                                               backend=name))


# Bytes of float32 logits one chunk of linear_cross_entropy holds.
_LOGIT_CHUNK_BYTES = 64 << 20


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T + bias against targets, computed in row
    chunks so the (rows x vocab) logits are never held whole (an LM head's output at batch 8 x seq
    512 x vocab 50257 is 823 MB in float32; a chunk is bounded by 64 MiB).

    Forward-only use (zeroth-order steps, evaluation) is where it saves memory: under autograd
    every chunk's logits are kept for the backward pass anyway.

    Args:
        hidden: (..., d) float; weight: (vocab, d); bias: (vocab,) or None.
        targets: (...) int64 class ids matching hidden's leading dims; ignore_index entries are
            left out of the mean.
        chunk_rows: rows per chunk (default: as many as fit the 64 MiB logits budget).
    Returns:
        a scalar float32 tensor (NaN if every target is ignored, as torch's cross_entropy).
    """
    hidden = _check_float_tensor(hidden, "hidden")
    weight = _check_float_tensor(weight, "weight")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (vocab, d) with d = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must be an int64 tensor of shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dims), got {_describe(targets) if isinstance(targets, torch.Tensor) else type(targets)}")
    if bias is not None:
        _check_shape(_check_float_tensor(bias, "bias"), "bias", (weight.shape[0],), "(vocab,)")
    for t, name in ((weight, "weight"), (bias, "bias"), (targets, "targets")):
        if t is not None:  # a meta weight would give a meaningless number, another device a late error
            _check_like(t, name, hidden, "hidden", dtype=False)
    rows = hidden.reshape(-1, hidden.shape[-1])
    labels = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = max(1, _LOGIT_CHUNK_BYTES // (4 * weight.shape[0]))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(rows[start:start + chunk_rows], weight, bias).float()
        total = total + torch.nn.functional.cross_entropy(
            logits, labels[start:start + chunk_rows], ignore_index=ignore_index, reduction="sum")
        del logits
    return total / (labels != ignore_index).sum()
