"""The perturbation contract (stream version 2): every backend reproduces Triton's tl.randn4x stream,
element c being word c % 4 of tl.randn4x(seed, c // 4); data of another stream version is refused."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import heron
from heron.kernels import backends, reference
from heron.kernels.stream import ParameterLayout, check_key
from tests.helpers import CPU_BACKENDS, DEVICE_BACKENDS, skip_unavailable

SIZES = [1, 7, 4097, 10**6 + 3]
KEYS = [  # (seed, offset): small, counters above 2**32, seeds above 2**32, both near the top
    (0, 0),
    (42, 123),
    (7, 2**32 - 5),
    (2**35 + 1, 2**34 - 500_001),  # the group counter c // 4 carries into its high word mid-range
    (2**33 + 5, 2**40 + 7),
    (2**62 + 17, 2**62 - 11),
]


def _size_budget(backend: str, n: int) -> bool:
    # The Triton interpreter runs at a few M elements/s: keep the million-element case for
    # compiled backends and the reference.
    return not (backend == "triton" and backends.triton_interpreted() and n > 5000)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("seed", "offset"), KEYS)
def test_words_bit_identical_to_reference(device_type, backend, n, seed, offset):
    skip_unavailable(device_type, backend)
    if not _size_budget(backend, n):
        pytest.skip("interpreter too slow for this size")
    got = heron.philox_words(n, seed, offset, device=device_type, backend=backend).cpu()
    want = reference.philox_words(seed, offset + torch.arange(n, dtype=torch.int64))
    assert torch.equal(got, want)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("seed", "offset"), KEYS)
def test_normals_match_reference(device_type, backend, n, seed, offset):
    skip_unavailable(device_type, backend)
    if not _size_budget(backend, n):
        pytest.skip("interpreter too slow for this size")
    got = heron.seeded_randn(n, seed, offset, device=device_type, backend=backend).cpu()
    want = reference.randn(seed, offset, n)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert (got - want).abs().max().item() <= 1e-5


def _triton_here():
    """(triton, triton.language, device) for kernels written in a test: the GPU, or the CPU through
    the interpreter; skips the test where neither runs."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not backends.triton_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    return triton, tl, device


def test_reference_words_match_triton_at_known_points():
    """Triton's own tl.randint4x (interpreter or GPU) against the reference, independently of
    heron_kernels' launchers: a tiny kernel written here."""
    triton, tl, device = _triton_here()

    @triton.jit
    def words(out, seed, offset, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK).to(tl.int64)
        a, b, c, d = tl.randint4x(seed, offset + i)
        tl.store(out + 4 * i, a.to(tl.int32, bitcast=True))
        tl.store(out + 4 * i + 1, b.to(tl.int32, bitcast=True))
        tl.store(out + 4 * i + 2, c.to(tl.int32, bitcast=True))
        tl.store(out + 4 * i + 3, d.to(tl.int32, bitcast=True))

    for seed, offset in KEYS:
        out = torch.empty(16, 4, dtype=torch.int32, device=device)
        words[(1,)](out, seed, offset, BLOCK=16)
        want = reference.philox_words(seed, offset + torch.arange(16))
        assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, want)


# (seed, offset, n) against tl.randn4x: starts and ends mid-group, single elements, element counters
# across 2**32, group counters (c // 4) across 2**32, and the last counters below 2**63.
RANDN4X_CASES = [
    (0, 0, 64),
    (42, 1, 10),
    (5, 3, 1),
    (11, 2, 2),
    (9, 6, 7),
    (7, 2**32 - 6, 23),
    (2**33 + 5, 2**34 - 13, 29),
    (2**62 + 17, 2**63 - 39, 39),
    (2**40 + 7, 2**34 - 5003, 10_007),
]


def _randn4x_interpreted(seed: int, first_group: int, groups: int) -> torch.Tensor:
    """float32 (4 * groups,): [4k + j] = word j of tl.randn4x(seed, first_group + k), computed by
    Triton's own tl.randn4x (through the interpreter on CPU), independently of heron_kernels."""
    triton, tl, device = _triton_here()

    @triton.jit
    def randn4x_kernel(out, seed, first, n_groups, BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = g < n_groups
        n0, n1, n2, n3 = tl.randn4x(seed, first + g)
        tl.store(out + 4 * g, n0, mask=mask)
        tl.store(out + 4 * g + 1, n1, mask=mask)
        tl.store(out + 4 * g + 2, n2, mask=mask)
        tl.store(out + 4 * g + 3, n3, mask=mask)

    out = torch.empty(4 * groups, dtype=torch.float32, device=device)
    randn4x_kernel[(triton.cdiv(groups, 1024),)](out, seed, first_group, groups, BLOCK=1024)
    return out.cpu()


def _randn4x_elements(seed: int, offset: int, n: int) -> torch.Tensor:
    """Elements offset .. offset + n - 1 of the v2 stream, from tl.randn4x."""
    first_group, last_group = offset // 4, (offset + n - 1) // 4
    groups = _randn4x_interpreted(seed, first_group, last_group - first_group + 1)
    start = offset - 4 * first_group
    return groups[start:start + n]


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("seed", "offset", "n"), RANDN4X_CASES)
def test_seeded_randn_is_tl_randn4x(device_type, backend, seed, offset, n):
    """Element c is word c % 4 of tl.randn4x(seed, c // 4): all four words, every alignment."""
    skip_unavailable(device_type, backend)
    want = _randn4x_elements(seed, offset, n)
    got = heron.seeded_randn(n, seed, offset, device=device_type, backend=backend).cpu()
    if backend == "triton" and backends.triton_interpreted():
        assert torch.equal(got, want)  # the same numpy math on the same words
    else:
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device_type", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backends_agree_on_millions_across_the_group_carry(device_type):
    """A few million normals whose group counter crosses 2**32, compiled backend vs the reference."""
    skip_unavailable(device_type, "torch")
    n, seed, offset = 3_000_001, 2**41 + 3, 2**34 - 1_500_002
    want = reference.randn(seed, offset, n)
    for backend in backends.available(device_type):
        if backend == "torch" or backend == "triton" and backends.triton_interpreted():
            continue
        got = heron.seeded_randn(n, seed, offset, device=device_type, backend=backend).cpu()
        assert (got - want).abs().max().item() <= 1e-5, backend


def test_words_are_the_groups_of_four():
    """philox_words row g holds the Philox words of group g; its normals are elements 4g .. 4g + 3."""
    words = heron.philox_words(3, 17, 2**32 - 1)
    want = reference.philox_words(17, torch.tensor([2**32 - 1, 2**32, 2**32 + 1]))
    assert torch.equal(words, want)
    normals = heron.seeded_randn(12, 17, 4 * (2**32 - 1), backend="torch")
    assert torch.equal(normals, reference.normals_from_words(want).flatten())


# (K, offset): rows starting on a group (K, offset multiples of 4) or not, at every offset % 4, and a
# weight whose group counter crosses 2**32.
ALIGNMENTS = [(16, 8), (16, 6), (17, 3), (12, 2**34 - 60), (33, 2**34 - 61)]


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("k", "offset"), ALIGNMENTS)
def test_fused_ops_use_the_stream_at_every_alignment(device_type, backend, k, offset):
    """The direction inside perturbed_linear, perturb_ and zo_sgd_update_ is exactly the backend's own
    seeded_randn, whether the layer's rows and the parameter start on a group of four or not."""
    from heron import functional as HF

    skip_unavailable(device_type, backend)
    n, seed = 9, 2**37 + 11
    z = heron.seeded_randn((n, k), seed, offset, device=device_type, backend=backend)
    eye = torch.eye(k, device=device_type)
    weight = torch.zeros(n, k, device=device_type)
    y_base, y_pert = HF.perturbed_linear(eye, weight, seed=seed, offset=offset, mu=1.0, x_pert=eye, backend=backend)
    assert torch.equal(y_pert - y_base, z.T)  # x = I, W = 0: y_pert = Z.T exactly
    param = torch.zeros(n, k, device=device_type)
    HF.perturb_(param, seed, alpha=1.0, offset=offset, backend=backend)
    assert torch.equal(param, z)
    param = torch.zeros(n, k, device=device_type)
    HF.zo_sgd_update_(param, seed, -1.0, lr=1.0, offset=offset, backend=backend)
    assert torch.equal(param, z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_output_is_rounded_float32_stream(dtype, backend):
    got = heron.seeded_randn((33, 31), 5, 2**35, dtype=dtype, device="cpu", backend=backend)
    want = reference.randn(5, 2**35, 33 * 31).view(33, 31).to(dtype)
    assert got.dtype == dtype
    # Same stream rounded once: at most one unit in the last place apart (the float32 values
    # may differ in their last bit between backends and round the other way).
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
    assert ((got.float() - want.float()).abs() <= ulp).all()


def test_shape_is_row_major_view_of_the_flat_stream():
    flat = heron.seeded_randn(60, 9, 11)
    shaped = heron.seeded_randn((3, 4, 5), 9, 11)
    assert torch.equal(shaped.flatten(), flat)
    assert torch.equal(heron.seeded_randn((4, 5), 9, 11 + 20), flat[20:40].view(4, 5))


def test_result_independent_of_thread_count():
    code = (
        "import hashlib, heron; x = heron.seeded_randn(300001, 3, 2**33, backend='cpu');"
        "print(hashlib.sha256(x.numpy().tobytes()).hexdigest())"
    )
    outputs = set()
    for threads in ("1", "2"):
        env = {"OMP_NUM_THREADS": threads, "PATH": "/usr/bin:/bin"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1


class TestStatistics:
    N = 2_000_000

    def test_mean_and_variance(self):
        x = heron.seeded_randn(self.N, 1234, 0).double()
        # Standard errors: mean 1/sqrt(N) = 7e-4; variance sqrt(2/N) = 1e-3. Allow 5 sigma.
        assert abs(x.mean().item()) < 5 / math.sqrt(self.N)
        assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2 / self.N)

    def test_tails_match_gaussian(self):
        x = heron.seeded_randn(self.N, 99, 5).double()
        for k, p in ((1.0, 0.31731), (2.0, 0.04550), (3.0, 0.0026998)):
            frac = (x.abs() > k).double().mean().item()
            assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / self.N)

    @pytest.mark.parametrize(("key_a", "key_b"), [((1, 0), (2, 0)), ((1, 0), (1, 10**6)), ((2**40, 0), (2**40 + 1, 0))])
    def test_different_keys_are_uncorrelated(self, key_a, key_b):
        n = 500_000
        a = heron.seeded_randn(n, key_a[0], key_a[1]).double()
        b = heron.seeded_randn(n, key_b[0], key_b[1]).double()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)

    def test_neighbouring_counters_are_uncorrelated(self):
        x = heron.seeded_randn(self.N, 3, 0).double()
        lag1 = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
        assert abs(lag1) < 5 / math.sqrt(self.N)

    def test_offset_shift_reuses_the_same_stream(self):
        a = heron.seeded_randn(1000, 8, 500)
        b = heron.seeded_randn(1500, 8, 0)
        assert torch.equal(a, b[500:])


class TestBadInput:
    @pytest.mark.parametrize("seed", [-1, -(2**40)])
    def test_negative_seed(self, seed):
        with pytest.raises(ValueError, match="seed must be non-negative"):
            heron.seeded_randn(4, seed)

    @pytest.mark.parametrize("value", [1.5, "3", None, True, torch.tensor(2.0)])
    def test_non_integer_seed(self, value):
        with pytest.raises(TypeError, match="seed must be an integer"):
            heron.seeded_randn(4, value)

    def test_non_integer_offset(self):
        with pytest.raises(TypeError, match="offset must be an integer"):
            heron.seeded_randn(4, 1, offset=2.0)

    def test_negative_offset(self):
        with pytest.raises(ValueError, match="offset must be non-negative"):
            heron.seeded_randn(4, 1, offset=-3)

    def test_seed_too_large(self):
        with pytest.raises(ValueError, match=r"seed must be below 2\*\*63"):
            heron.seeded_randn(4, 2**63)

    def test_counter_overflow(self):
        with pytest.raises(ValueError, match="overflows the 63-bit counter range"):
            heron.seeded_randn(10, 1, offset=2**63 - 5)

    def test_integer_tensor_seed_accepted(self):
        assert torch.equal(heron.seeded_randn(4, torch.tensor(7)), heron.seeded_randn(4, 7))

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
    def test_unsupported_dtype(self, dtype):
        with pytest.raises(TypeError, match="dtype must be one of"):
            heron.seeded_randn(4, 1, dtype=dtype)

    def test_unsupported_device(self):
        with pytest.raises(ValueError, match="device must be a cpu or cuda device, got meta"):
            heron.seeded_randn(4, 1, device="meta")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
    def test_cuda_without_cuda(self):
        with pytest.raises(ValueError, match="CUDA is not available"):
            heron.seeded_randn(4, 1, device="cuda")

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match=r"backend must be one of .* got 'numpy'"):
            heron.seeded_randn(4, 1, backend="numpy")

    def test_backend_for_wrong_device(self):
        with pytest.raises(heron.BackendUnavailableError, match="backend='cuda' is not available on cpu"):
            heron.seeded_randn(4, 1, backend="cuda")

    def test_bad_shape(self):
        with pytest.raises(ValueError, match="non-negative sizes"):
            heron.seeded_randn((3, -1), 1)
        with pytest.raises(TypeError, match="shape must be a sequence of ints"):
            heron.seeded_randn((3, 1.5), 1)

    def test_extension_rejects_bad_calls_without_crashing(self):
        ext = backends.extension()
        if ext is None:
            pytest.skip("extension not built")
        with pytest.raises(RuntimeError, match="seed must be non-negative"):
            ext.philox_randn_cpu(torch.empty(3), seed=-1, offset=0)
        with pytest.raises(RuntimeError, match="out must be contiguous"):
            ext.philox_randn_cpu(torch.empty(4, 4).t(), seed=1, offset=0)
        with pytest.raises(RuntimeError, match="out must be float32, bfloat16 or float16"):
            ext.philox_randn_cpu(torch.empty(3, dtype=torch.float64), seed=1, offset=0)
        with pytest.raises(RuntimeError, match="overflows"):
            ext.philox_randn_cpu(torch.empty(3), seed=1, offset=2**63 - 2)
        with pytest.raises(RuntimeError, match=r"shape \(n, 4\)"):
            ext.philox_words_cpu(torch.empty(3, 3, dtype=torch.int32), seed=1, offset=0)


class TestLayout:
    def _model(self):
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False))

    def test_dense_offsets_in_registration_order(self):
        layout = ParameterLayout.from_module(self._model(), base_offset=100)
        assert [(e.name, e.offset, e.numel) for e in layout] == [
            ("0.weight", 100, 12), ("0.bias", 112, 4), ("2.weight", 116, 8)]
        assert layout.total == 24

    def test_direction_is_slice_of_the_model_stream(self):
        layout = ParameterLayout.from_module(self._model())
        stream = heron.seeded_randn(layout.total, 77)
        for entry in layout:
            got = layout.direction(entry.name, 77)
            assert torch.equal(got.flatten(), stream[entry.offset:entry.offset + entry.numel])

    def test_frozen_parameters_skipped(self):
        model = self._model()
        model[0].weight.requires_grad_(False)
        assert [e.name for e in ParameterLayout.from_module(model)] == ["0.bias", "2.weight"]
        assert len(ParameterLayout.from_module(model, trainable_only=False)) == 3

    def test_fingerprint_stable_and_sensitive(self):
        a = ParameterLayout.from_module(self._model()).fingerprint
        assert a == ParameterLayout.from_module(self._model()).fingerprint
        assert a != ParameterLayout.from_module(self._model(), base_offset=1).fingerprint

    def test_unknown_names(self):
        with pytest.raises(KeyError, match="does not have"):
            ParameterLayout.from_module(self._model(), names=["0.weight", "9.bias"])
        with pytest.raises(KeyError, match="not in this layout"):
            ParameterLayout.from_module(self._model())["nope"]

    def test_layout_past_counter_limit(self):
        with pytest.raises(ValueError, match="beyond 2\\*\\*63"):
            ParameterLayout([("w", (2**62,)), ("v", (2**62,))], base_offset=2)


class TestDeriveSeed:
    def test_pure_and_in_range(self):
        seeds = {heron.derive_seed(1, client, 0, step) for client in range(4) for step in range(50)}
        assert len(seeds) == 200
        assert all(0 <= s < 2**63 for s in seeds)
        assert heron.derive_seed(1, 2, 3) == heron.derive_seed(1, 2, 3)

    def test_order_matters(self):
        assert heron.derive_seed(5, 1, 2) != heron.derive_seed(5, 2, 1)

    def test_bad_run_seed(self):
        with pytest.raises(ValueError, match="run_seed must be non-negative"):
            heron.derive_seed(-1, 0)


def test_check_key_returns_ints():
    assert check_key(torch.tensor(3), 4, 10) == (3, 4)


class TestStreamVersion:
    """Checkpoints, seed-and-scalar uploads and Flower messages carry the stream version; data of
    another version, or without one (written before versions existed), is refused, saying so."""

    def test_version_is_two(self):
        from heron.kernels.stream import STREAM_VERSION

        assert STREAM_VERSION == 2

    @pytest.mark.parametrize(("found", "match"), [
        (None, r"the thing carries no perturbation stream version.* this heron uses stream version 2"),
        (1, r"the thing was made with perturbation stream version 1; this heron uses stream version 2"),
        ("2", r"the thing was made with perturbation stream version '2'; this heron uses stream version 2"),
    ])
    def test_check_names_both_versions(self, found, match):
        from heron.kernels.stream import StreamVersionError, check_stream_version

        with pytest.raises(StreamVersionError, match=match):
            check_stream_version(found, "the thing")
        assert issubclass(StreamVersionError, ValueError)
        check_stream_version(2, "the thing")

    def test_checkpoint_of_another_version_is_refused(self, tmp_path, monkeypatch):
        """A checkpoint written, intact, by a heron of stream version 1. (Files written before versions
        were recorded carry no whole-file digest either, and are refused for that:
        tests/sfl/test_checkpoint.py.)"""
        from heron.sfl import checkpoint
        from heron.sfl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

        path = tmp_path / "c.safetensors"
        save_checkpoint(path, {"w": torch.ones(3)}, {"round": 1})
        tensors, metadata = load_checkpoint(path)
        assert metadata == {"round": 1}
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, "STREAM_VERSION", 1)
            save_checkpoint(path, {"w": torch.ones(3)}, {"round": 1})
        with pytest.raises(CheckpointError, match="perturbation stream version 1"):
            load_checkpoint(path)

    @pytest.mark.parametrize(("version", "match"), [(None, "carries no perturbation stream version"),
                                                     (1, "perturbation stream version 1")])
    def test_seed_upload_of_another_version_is_refused(self, version, match):
        from heron.sfl.replay import SeedScalarUpload

        wire = SeedScalarUpload(0, [(0, [5], [0.5])]).to_tensors()
        assert wire["stream_version"].dtype == torch.int64 and int(wire["stream_version"]) == 2
        del wire["stream_version"]
        if version is not None:
            wire["stream_version"] = torch.tensor(version, dtype=torch.int64)
        with pytest.raises(ValueError, match=match):
            SeedScalarUpload.from_tensors(wire)

    @pytest.mark.parametrize(("version", "match"), [(None, "carries no perturbation stream version"),
                                                     (1, "perturbation stream version 1")])
    def test_flower_messages_of_another_version_are_refused(self, version, match):
        pytest.importorskip("flwr")
        from heron.flower import codec
        from heron.sfl.engine import TrainConfig
        from heron.sfl.roles import ClientRoundResult, Upload

        state = {"w": torch.zeros(2, 3)}
        specs = codec.specs_of(state)
        request = codec.encode_request(TrainConfig(clients=1), 0, state, sync=[codec.ClientSync()])
        codec.decode_request(request, lambda config: specs)
        result = ClientRoundResult(0, state, 4, uploads=[Upload(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))],
                                   losses=[1.0, 1.0])
        spec = codec.ReplySpec(round_index=0, client_upload="parameters", clients=1, local_steps=2, upload_every=2,
                               batch_size=1, max_samples=10, num_classes=2, state=specs,
                               smashed=codec.TensorSpec((2,), torch.float32))
        reply = codec.encode_reply(result, 0, start=codec.ClientSync())
        codec.decode_reply(reply, spec)
        for content, record in ((request, codec.ROUND), (reply, codec.REPLY)):
            header = content[record]
            del header["stream-version"]
            if version is not None:
                header["stream-version"] = version
        with pytest.raises(codec.MessageRejected, match=f"{codec.ROUND}: .*{match}"):
            codec.decode_request(request, lambda config: specs)
        with pytest.raises(codec.MessageRejected, match=f"{codec.REPLY}: .*{match}"):
            codec.decode_reply(reply, spec)
