"""lora_fast.energy_rank against float64 dense SVD of the formed product."""

from __future__ import annotations

import math

import pytest
import torch

from lora_fast.energy_rank import analyze
from lora_fast.energy_rank import energy_rank
from lora_fast.energy_rank import singular_values
from lora_fast.energy_rank import truncate
from lora_fast.ops.lowrank_svd import lowrank_svdvals

# sigma error allowed relative to sigma_max of the float64 dense reference
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SHAPES = [(123, 431), (431, 123), (64, 37), (5, 300), (200, 256)]
RANKS = [1, 7, 33, 64]


def dense_sigma(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    k = min(a.shape[-2], a.shape[-1], b.shape[-2])
    return torch.linalg.svdvals(scaling * (b.double() @ a.double()))[..., :k]


def energy_rank_oracle(sigma: list[float], threshold: float) -> int:
    energies = sorted((s * s for s in sigma), reverse=True)
    total = sum(energies)
    if total == 0:
        return 0
    running = 0.0
    for j, e in enumerate(energies, start=1):
        running += e
        if running >= threshold * total:
            return j
    return len(energies)


def assert_sigma_close(sigma: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert sigma.shape == ref.shape
    scale = ref.abs().amax().clamp_min(1e-300)
    err = ((sigma.double() - ref).abs() / scale).max().item()
    assert err <= TOL[dtype], f"max sigma error {err:.3e} relative to sigma_max exceeds {TOL[dtype]:.0e}"


def random_pair(m, n, r, dtype, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    # B random (not PEFT's zero init): a zero B would hide errors in the A side
    a = torch.randn(*batch, r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = torch.randn(*batch, m, r, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,n", SHAPES)
def test_singular_values_match_dense(backend, m, n, r, dtype):
    a, b = random_pair(m, n, r, dtype, seed=m * 7 + n + r)
    sigma = singular_values(a, b, scaling=0.5)
    assert sigma.dtype == dtype
    ref = dense_sigma(a, b, 0.5)
    assert_sigma_close(sigma, ref, dtype)
    assert energy_rank(sigma).tolist() == energy_rank(ref).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_leading_dims_and_tensor_scaling(backend, dtype):
    a, b = random_pair(57, 91, 7, dtype, batch=(2, 3))
    scaling = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 0.25]])
    sigma = singular_values(a, b, scaling=scaling)
    assert sigma.shape == (2, 3, 7)
    ref = dense_sigma(a, b) * scaling.abs().double().unsqueeze(-1)
    assert_sigma_close(sigma, ref, dtype)
    ranks = energy_rank(sigma)
    assert ranks.shape == (2, 3)
    assert ranks.tolist() == [[energy_rank_oracle(s, 0.95) for s in row] for row in ref.tolist()]


def test_list_of_adapters_of_different_shapes(backend):
    shapes = [(123, 431, 7), (431, 123, 1), (40, 30, 64), (300, 400, 16), (64, 64, 33)]
    pairs = [random_pair(m, n, r, torch.float64, seed=i) for i, (m, n, r) in enumerate(shapes)]
    scales = [1.0, 2.0, -0.5, 3.0, 1.0]
    sigmas = singular_values([p[0] for p in pairs], [p[1] for p in pairs], scales)
    assert isinstance(sigmas, list) and len(sigmas) == len(shapes)
    for (a, b), s, sigma in zip(pairs, scales, sigmas, strict=True):
        assert_sigma_close(sigma, dense_sigma(a, b, abs(s)), torch.float64)
    ranks = energy_rank(sigmas)
    assert ranks == [energy_rank_oracle(dense_sigma(a, b).tolist(), 0.95) for a, b in pairs]


def test_half_precision_inputs_are_analysed_in_float32(backend):
    a, b = random_pair(70, 50, 7, torch.float64)
    sigma = singular_values(a.to(torch.bfloat16), b.to(torch.bfloat16))
    assert sigma.dtype == torch.float32
    assert_sigma_close(sigma, dense_sigma(a.to(torch.bfloat16), b.to(torch.bfloat16)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_adapter(backend, dtype):
    a, b = random_pair(123, 431, 16, dtype)
    sigma = singular_values(a, torch.zeros_like(b))  # PEFT's initial state
    assert torch.equal(sigma, torch.zeros(16, dtype=dtype))
    assert int(energy_rank(sigma)) == 0
    assert not torch.isnan(energy_rank(sigma)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_adapter(backend, dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 200, generator=g, dtype=torch.float64)
    b = torch.randn(150, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    a, b = a.to(dtype), b.to(dtype)
    sigma = singular_values(a, b)
    ref = dense_sigma(a, b)
    assert_sigma_close(sigma, ref, dtype)
    assert int(energy_rank(sigma, 0.999999)) == 3


def test_ill_conditioned_factors(backend):
    # singular values of B spanning 1 .. 1e-9: Cholesky-QR alone would lose them, the fallback must not
    g = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(300, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    b = q1 @ torch.diag(torch.logspace(0, -9, 12, dtype=torch.float64)) @ q2
    a = torch.randn(12, 250, generator=g, dtype=torch.float64)
    assert_sigma_close(singular_values(a, b), dense_sigma(a, b), torch.float64)


@pytest.mark.parametrize("magnitude", [1e-200, 1e200])
def test_extreme_magnitudes_do_not_overflow(backend, magnitude):
    a, b = random_pair(80, 90, 5, torch.float64)
    sigma = singular_values(a * magnitude, b)
    ref = dense_sigma(a, b) * magnitude
    assert torch.isfinite(sigma).all()
    assert ((sigma - ref).abs().max() / ref.max()).item() < 1e-10


def test_singular_values_is_one_registered_op():
    a, b = random_pair(40, 50, 7, torch.float32, batch=(3,))
    torch.library.opcheck(lowrank_svdvals, ([a], [b], [2.0]))


@pytest.mark.parametrize(
    "a_shape,b_shape,match",
    [
        ((4, 10), (12, 5), "inner ranks"),
        ((10,), (12, 10), "ndim"),
        ((2, 4, 10), (3, 12, 4), "batch"),
        ((0, 10), (12, 0), "empty"),
    ],
)
def test_bad_shapes(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        singular_values(torch.randn(a_shape), torch.randn(b_shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise(backend, bad):
    a, b = random_pair(60, 70, 7, torch.float32)
    b[5, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        singular_values(a, b)
    with pytest.raises(ValueError, match="NaN or Inf"):
        singular_values([a, a], [b.abs().nan_to_num(0), b])  # only the second adapter is bad


def test_other_bad_inputs():
    a, b = random_pair(20, 30, 4, torch.float32)
    with pytest.raises(ValueError, match="empty list"):
        singular_values([], [])
    with pytest.raises(ValueError, match="2 A matrices but 1"):
        singular_values([a, a], [b])
    with pytest.raises(ValueError, match="floating point"):
        singular_values(a.to(torch.int64), b.to(torch.int64))
    with pytest.raises(ValueError, match="scalings"):
        singular_values([a, a], [b, b], [1.0])
    with pytest.raises(ValueError, match="broadcast"):
        singular_values(a.expand(3, 4, 30), b.expand(3, 20, 4), scaling=torch.ones(5))


def test_energy_rank_convention_and_edges():
    # cumulative energies 1, 2, 3, 4 of 4: 0.5 is reached exactly at j=2 (>=), just past it at j=3
    flat = torch.ones(4)
    assert int(energy_rank(flat, 0.5)) == 2
    assert int(energy_rank(flat, 0.5000001)) == 3
    assert int(energy_rank(flat, 1.0)) == 4
    assert int(energy_rank(torch.tensor([3.0, 4.0]), 0.95)) == 2
    assert int(energy_rank(torch.tensor([4.0, 3.0, 0.0, 0.0]), 1.0)) == 2  # trailing zeros add no energy
    assert int(energy_rank(torch.tensor([0.0, 1.0]), 0.95)) == 1  # order of input does not matter
    assert int(energy_rank(torch.zeros(5))) == 0
    batch = torch.stack([torch.tensor([10.0, 1.0, 1.0]), torch.zeros(3)])
    assert energy_rank(batch).tolist() == [1, 0]
    assert energy_rank([torch.tensor([1.0, 1.0]), torch.tensor([5.0])]) == [2, 1]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_energy_rank_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        energy_rank(torch.ones(3), threshold)


def test_energy_rank_bad_sigma():
    with pytest.raises(ValueError, match="NaN"):
        energy_rank(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-negative"):
        energy_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="k >= 1"):
        energy_rank(torch.ones(3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r", [(123, 431, 33), (60, 45, 7), (9, 200, 16)])
def test_truncate_matches_eckart_young(m, n, r, dtype):
    a, b = random_pair(m, n, r, dtype)
    full = b.double() @ a.double()
    ref = torch.linalg.svdvals(full)
    k = min(m, n, r)
    for j in (0, 1, k // 2, k):
        a_j, b_j = truncate(a, b, j)
        assert a_j.shape == (j, n) and b_j.shape == (m, j) and a_j.dtype == dtype
        err2 = torch.linalg.matrix_norm(full - b_j.double() @ a_j.double()).square()
        optimal2 = ref[j:].square().sum()
        tol = (1e-12 if dtype == torch.float64 else 1e-5) * ref.square().sum()  # relative to ||B A||_F^2
        assert abs(err2 - optimal2) <= tol, (j, err2.item(), optimal2.item())


def test_truncate_by_threshold_and_batches():
    a, b = random_pair(50, 40, 8, torch.float64, batch=(3,))
    a_j, b_j = truncate(a, b, threshold=0.9)
    j = int(energy_rank(dense_sigma(a, b), 0.9).max())
    assert a_j.shape == (3, j, 40) and b_j.shape == (3, 50, j)
    kept = torch.linalg.svdvals(b_j @ a_j).square().sum(-1) / dense_sigma(a, b).square().sum(-1)
    assert (kept >= 0.9 - 1e-12).all()
    with pytest.raises(ValueError, match="exactly one"):
        truncate(a, b)
    with pytest.raises(ValueError, match="rank must be"):
        truncate(a, b, 9)


# ---- analyze ---------------------------------------------------------------------------------------------------


class TinyBlock(torch.nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.query = torch.nn.Linear(d, d)
        self.value = torch.nn.Linear(d, d)
        self.dense = torch.nn.Linear(d, ff)


class TinyModel(torch.nn.Module):
    def __init__(self, d: int = 24, ff: int = 40, layers: int = 3):
        super().__init__()
        self.layer = torch.nn.ModuleList(TinyBlock(d, ff) for _ in range(layers))
        self.classifier = torch.nn.Linear(d, 2)

    def forward(self, x):
        for block in self.layer:
            x = block.query(x) + block.value(x)
        return self.classifier(x)


def _peft_model(use_rslora: bool = False):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value", "dense"],
        rank_pattern={"layer.1.query": 4},
        alpha_pattern={"value": 4},
        use_rslora=use_rslora,
    )
    model = peft.get_peft_model(TinyModel(), config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # PEFT initialises B to zero; every adapter must have a spectrum here
    return model, config


@pytest.mark.parametrize("use_rslora", [False, True])
def test_analyze_peft_model(backend, use_rslora):
    model, _ = _peft_model(use_rslora)
    records = analyze(model)
    assert len(records) == 9
    by_name = {rec.name: rec for rec in records}
    rec = by_name["layer.1.query"]
    assert (rec.layer, rec.kind, rec.r, rec.shape) == (1, "query", 4, (24, 24))
    assert rec.scaling == pytest.approx(16 / (math.sqrt(4) if use_rslora else 4))
    assert by_name["layer.2.value"].scaling == pytest.approx(4 / (math.sqrt(8) if use_rslora else 8))
    assert by_name["layer.0.dense"].shape == (40, 24)
    for rec in records:
        module = model.get_submodule("base_model.model." + rec.name)
        ref = dense_sigma(module.lora_A["default"].weight, module.lora_B["default"].weight, rec.scaling)
        assert_sigma_close(rec.sigma, ref, torch.float32)
        assert rec.energy_rank == energy_rank_oracle(ref.tolist(), 0.95)
        assert rec.as_dict()["sigma"] == pytest.approx(rec.sigma.tolist())


def test_analyze_saved_adapter_matches_model(tmp_path, backend):
    model, _ = _peft_model()
    model.save_pretrained(tmp_path)
    from_model = {rec.name: rec for rec in analyze(model)}
    from_disk = analyze(tmp_path)
    assert {rec.name for rec in from_disk} == set(from_model)
    for rec in from_disk:
        assert rec.scaling == pytest.approx(from_model[rec.name].scaling)
        assert torch.allclose(rec.sigma, from_model[rec.name].sigma, rtol=1e-5, atol=1e-6)
    state = model.state_dict()  # in-memory keys carry the adapter name: ….lora_A.default.weight
    with pytest.warns(UserWarning, match="scaling = 1.0"):
        in_memory = analyze({k: v for k, v in state.items() if "lora_" in k})
    assert all(rec.adapter == "default" and rec.scaling == 1.0 for rec in in_memory)
    with_config = analyze(state, config=tmp_path / "adapter_config.json")
    assert [rec.energy_rank for rec in with_config] == [from_model[rec.name].energy_rank for rec in with_config]


def test_analyze_adalora_model(backend):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, target_modules=["query", "value"], total_step=10)
    model = peft.get_peft_model(TinyModel(), config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_E" in name:
            torch.nn.init.normal_(param)
    module = model.get_submodule("base_model.model.layer.1.value")
    module.lora_E["default"].data[4:] = 0  # two pruned triplets: the update has rank 4
    records = {rec.name: rec for rec in analyze(model)}
    assert len(records) == 6
    rec = records["layer.1.value"]
    ref = torch.linalg.svdvals(module.get_delta_weight("default").double())[:6]
    assert_sigma_close(rec.sigma, ref, torch.float32)
    assert rec.r == 6 and int(energy_rank(rec.sigma, 0.999999)) == 4


def test_analyze_duck_typed_lora_modules(backend):
    class Adapter(torch.nn.Module):
        def __init__(self, n_in, n_out, r, scaling):
            super().__init__()
            self.lora_A = torch.nn.Parameter(torch.randn(r, n_in))
            self.lora_B = torch.nn.Parameter(torch.randn(n_out, r))
            self.scaling = scaling

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
    model.layers[0].q_proj = Adapter(30, 30, 4, 2.0)
    model.layers[1].o_proj = Adapter(30, 20, 6, 0.5)
    records = analyze(model)
    assert [(r.name, r.layer, r.kind, r.r) for r in records] == [
        ("layers.0.q_proj", 0, "q_proj", 4),
        ("layers.1.o_proj", 1, "o_proj", 6),
    ]
    assert_sigma_close(
        records[1].sigma, dense_sigma(model.layers[1].o_proj.lora_A, model.layers[1].o_proj.lora_B, 0.5), torch.float32
    )


def test_analyze_kind_names():
    state = {}
    for name in (
        "bert.encoder.layer.3.attention.self.query",
        "bert.encoder.layer.3.attention.output.dense",
        "bert.encoder.layer.3.output.dense",
        "model.layers.12.self_attn.q_proj",
    ):
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, 8)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(8, 2)
    records = analyze(state, config={"lora_alpha": 4})
    assert [(r.layer, r.kind) for r in records] == [
        (3, "query"),
        (3, "attention.output.dense"),
        (3, "output.dense"),
        (12, "q_proj"),
    ]
    assert all(r.scaling == 2.0 for r in records)


def test_analyze_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        analyze(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="partner"):
        analyze({"x.lora_A.weight": torch.randn(2, 4)}, config={})
    with pytest.raises(ValueError, match="no adapter weights"):
        analyze(tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        analyze({"x.lora_A": torch.randn(2, 4), "x.lora_B": torch.randn(4, 2)}, threshold=0)
    with pytest.raises(ValueError, match="expected a model"):
        analyze(42)


# ---- bad input: rows 1.4-1.10 of the shared bad-input table ----------------------------------------------------


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300, 1e-320])
def test_energy_rank_of_extreme_spectra(scale):  # row 1.4
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert int(energy_rank(sigma)) == 3
    assert int(energy_rank(sigma * scale)) == 3
    assert energy_rank(torch.stack([sigma * scale, sigma, torch.zeros(3, dtype=torch.float64)])).tolist() == [3, 3, 0]


def test_energy_rank_of_a_tiny_adapter(backend):  # row 1.4, through singular_values
    a, b = random_pair(9, 10, 8, torch.float64)
    sigma = singular_values(a * 1e-300, b)
    assert (sigma > 0).all()
    assert int(energy_rank(sigma)) == int(energy_rank(sigma / sigma.max())) == int(energy_rank(dense_sigma(a, b)))


def test_representable_sigma_of_huge_factors(backend):  # row 1.5
    a, b = random_pair(150, 29, 1, torch.float64)
    sigma = singular_values(a * 1e300, b)  # rank one: σ = |a| |b| 1e300 ≈ 6e300, representable
    expected = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b) * 1e300
    assert torch.isfinite(sigma).all()
    assert abs(sigma.item() / expected.item() - 1) < 1e-12


@pytest.mark.parametrize("m,n,r", [(30, 30, 30), (200, 150, 8)])  # the dense route, then the low-rank route
def test_overflowing_product_gives_inf_not_nan(backend, m, n, r):  # row 1.6
    a = torch.full((r, n), 1e160, dtype=torch.float64)
    b = torch.full((m, r), 1e160, dtype=torch.float64)
    sigma = singular_values(a, b)  # rank one, σ_max = 1e320 · sqrt(m n) r: beyond float64
    assert not torch.isnan(sigma).any()
    assert torch.isinf(sigma[0])
    # the others are rounding noise of a rank-one product: at most ~1e-15 of σ_max, as at unit scale
    unit = singular_values(a / 1e160, b / 1e160)
    assert torch.isfinite(sigma[1:]).all() and (unit[1:] <= 1e-13 * unit[0]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scaling_raises(backend, bad):  # row 1.8
    a, b = random_pair(20, 30, 4, torch.float32)
    with pytest.raises(ValueError, match="scaling must be finite"):
        singular_values(a, b, bad)
    with pytest.raises(ValueError, match="scaling must be finite"):
        singular_values([a, a], [b, b], [1.0, bad])
    with pytest.raises(ValueError, match="scaling contains NaN or Inf"):
        singular_values(a.expand(2, 4, 30), b.expand(2, 20, 4), torch.tensor([1.0, bad]))


def test_scaling_as_tensor_or_numpy(backend):  # row 1.9
    np = pytest.importorskip("numpy")
    a, b = random_pair(20, 30, 4, torch.float64)
    expected = dense_sigma(a, b, 2.0)
    for scaling in (2, 2.0, -2.0, torch.tensor(2.0), np.float32(2), np.float64(-2.0), np.array(2.0)):
        assert_sigma_close(singular_values(a, b, scaling), expected, torch.float64)
        first, second = singular_values([a, a], [b, b], scaling)
        assert_sigma_close(first, expected, torch.float64)
        assert_sigma_close(second, expected, torch.float64)
    for per_adapter in (np.array([2.0, 1.0]), torch.tensor([2.0, 1.0]), (2, 1.0)):
        first, second = singular_values([a, a], [b, b], per_adapter)
        assert_sigma_close(first, expected, torch.float64)
        assert_sigma_close(second, expected / 2, torch.float64)
    batched = singular_values(a.expand(2, 4, 30), b.expand(2, 20, 4), np.array([2.0, -1.0]))
    assert_sigma_close(batched, torch.stack([expected, expected / 2]), torch.float64)


@pytest.mark.parametrize("bad", ["2", None, object(), [1.0, "x"], {"s": 2}])
def test_scaling_of_the_wrong_type_is_named(bad):  # row 1.9
    a, b = random_pair(20, 30, 4, torch.float32)
    with pytest.raises(ValueError, match="scaling"):
        singular_values(a, b, bad)
    with pytest.raises(ValueError, match="scaling"):
        singular_values([a, a], [b, b], bad)


def test_energy_rank_of_lists_and_arrays():  # row 1.10
    np = pytest.importorskip("numpy")
    assert energy_rank([[3.0, 2.0, 1.0]]) == [3]
    assert energy_rank([[3.0, 2.0, 1.0], [1.0, 0.0]], 0.5) == [1, 1]
    assert energy_rank([np.array([3.0, 2.0, 1.0]), torch.tensor([5.0])]) == [3, 1]
    from_numpy = energy_rank(np.array([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    assert isinstance(from_numpy, torch.Tensor) and from_numpy.tolist() == [3, 3]
    assert int(energy_rank(np.array([3.0, 2.0, 1.0], dtype=np.float32))) == 3


@pytest.mark.parametrize(
    "bad,match",
    [
        ([3.0, 2.0, 1.0], "element 0 is the number"),
        ("abc", "sigma must be"),
        (None, "sigma must be"),
        ([[[1.0]]], "must be 1-D"),
        ([["a"]], "not a spectrum"),
        (torch.tensor([1 + 1j]), "real"),
    ],
)
def test_energy_rank_names_bad_sigma(bad, match):  # row 1.10
    with pytest.raises(ValueError, match=match):
        energy_rank(bad)


# ---- routing and grouping ---------------------------------------------------------------------------------------


def test_torch_route_makes_one_batched_call_per_shape(monkeypatch):
    """CUDA tensors, and CPU ones under LORA_FAST_BACKEND=ref, go through torch ops: one call per shape."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "ref")
    calls = {"qr": 0, "svdvals": 0}
    qr, svdvals = torch.linalg.qr, torch.linalg.svdvals

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.linalg, "qr", counted("qr", qr))
    monkeypatch.setattr(torch.linalg, "svdvals", counted("svdvals", svdvals))
    shapes = [(123, 431, 7), (60, 50, 4)] * 6 + [(30, 20, 25)] * 3  # two low-rank shapes, one dense
    pairs = [random_pair(m, n, r, torch.float32, seed=i) for i, (m, n, r) in enumerate(shapes)]
    sigmas = singular_values([a for a, _ in pairs], [b for _, b in pairs], 2.0)
    assert calls == {"qr": 4, "svdvals": 3}
    for (a, b), sigma in zip(pairs, sigmas, strict=True):
        assert_sigma_close(sigma, dense_sigma(a, b, 2.0), torch.float32)


def test_mixed_dtypes_and_routes_in_one_call(backend):
    pairs = [
        random_pair(123, 431, 7, torch.float64),
        random_pair(40, 30, 64, torch.float32),  # r >= min(m, n): dense route
        random_pair(70, 50, 7, torch.bfloat16),
        (random_pair(80, 90, 5, torch.float16)[0], random_pair(80, 90, 5, torch.float32)[1]),  # mixed: float32
    ]
    sigmas = singular_values([a for a, _ in pairs], [b for _, b in pairs])
    assert [s.dtype for s in sigmas] == [torch.float64, torch.float32, torch.float32, torch.float32]
    for (a, b), sigma in zip(pairs, sigmas, strict=True):
        assert_sigma_close(sigma, dense_sigma(a, b), torch.float64 if a.dtype == torch.float64 else torch.float32)
