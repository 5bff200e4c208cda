"""Fused Triton kernels (zo2_kernels) against their torch references, z statistics, stochastic rounding.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tensors, ~5 s per 1M
elements), so interpreted tensors stay small (<= ~20K elements). With CUDA the same tests run the compiled
kernels on the GPU, and the ``gpu``-marked tests add large, OPT-shaped checks.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")

# The interpreter flag is read when a @triton.jit function is created (at import of triton_ops), so it must be
# set before that import. It is restored right after, and set again only while this module's tests run
# (fixture below), so other test modules do not see an interpreted "available()" Triton.
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
triton = pytest.importorskip("triton")  # noqa: E402  (importing triton alone does not read the flag)
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import zo2_kernels  # noqa: E402
    from zo2_kernels import reference as R  # noqa: E402
    from zo2_kernels import SegmentTable, Segment  # noqa: E402

    T = importlib.import_module("zo2_kernels.triton_ops")
    if T._INTERPRET != (not HAS_CUDA):  # imported earlier under the other setting: rebuild the kernels
        T = importlib.reload(T)
finally:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

from zo2.optim import rng  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]
KEY_A = rng.param_key("model.decoder.layers.0.self_attn.q_proj.weight")
KEY_B = rng.param_key("model.decoder.layers.0.fc1.bias")
BIG_KEY = 0xFEDCBA98  # >= 2**31: exercises the unsigned key << 32


@pytest.fixture(autouse=True, scope="module")
def _interpret_env():
    """TRITON_INTERPRET=1 while this module's tests run (CPU only), as the dispatch module reads it.

    Also one intra-op thread: the big reference generations here are int64 elementwise chains that torch
    splits over threads, and on a loaded 2-core machine that was 5x slower than one thread (measured).
    """
    prev = os.environ.get("TRITON_INTERPRET")
    prev_threads = torch.get_num_threads()
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev_threads)
    if prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = prev


# --------------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _theta(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=_gen(seed)).to(dtype).to(DEV)


def _poison(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float32 tensor)."""
    xd = x.abs().to(dtype)
    return (torch.nextafter(xd, torch.full_like(xd, float("inf"))).float() - xd.float()).abs()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, distribution: str, *, exact: bool = False):
    """Kernel output vs reference: every element written, bitwise for Rademacher, float rounding for Gaussian."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "some output elements were not written (NaN poison survived)"
    if exact or distribution == "rademacher":
        assert torch.equal(actual.cpu(), expected.cpu()), (actual - expected).abs().max()
        return
    a, e = actual.float().cpu(), expected.float().cpu()
    if actual.dtype == torch.float32:
        torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6)
    else:
        # z differs from the reference in its last bits, which can move a value across a rounding boundary:
        # allow one ulp (of the larger of the two: at a power of two the spacing doubles), on few elements.
        diff = (a - e).abs()
        assert (diff <= _ulp(torch.maximum(a.abs(), e.abs()), actual.dtype) * 1.0001).all(), diff.max()
        assert (diff > 0).float().mean() < 0.01


# Multi-segment buffer: odd sizes, sizes not multiples of 4 / 128 / BLOCK, a parameter slice starting at an odd
# element, a decay-free bias, a tiny segment, a big key.
SEGS = [
    (0, 2048, KEY_A, 1),          # whole parameter, exactly one default tile
    (2048, 1, KEY_B, 0),          # one element
    (2049, 3001, 11, 1),          # odd length
    (5050, 130, BIG_KEY, 0),      # just over 128
    (5180, 4099, 77, 1, 333),     # a slice of a parameter, starting at odd element 333
    (9279, 517, 12345, 1, 4),     # a slice starting inside a counter
]
N = 9279 + 517


# ------------------------------------------------------------------------------------------------ direction
@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("start,count", [(0, 1), (0, 4096), (1, 3), (3, 130), (127, 129), (333, 5001),
                                          (1 << 33, 257), (2**40 + 5, 999),
                                          # the counter's low word wraps inside a tile: gaussian, rademacher
                                          (2**34 - 100, 300), (2**39 - 1000, 3000)])
def test_direction_matches_reference(distribution, start, count):
    got = T.direction(7, BIG_KEY, start, count, distribution, device=DEV)
    ref = R.direction(7, BIG_KEY, start, count, distribution, device=DEV)
    if distribution == "gaussian":
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # ~1e-7 relative to |z| <= ~6
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("distribution", DISTS)
def test_direction_independent_of_block_and_slicing(distribution):
    """The element -> counter mapping is fixed by rng.py: any block size, any slice, same values."""
    full = T.direction(3, KEY_A, 0, 3000, distribution, device=DEV, block=2048)
    for block in (128, 512):
        assert torch.equal(T.direction(3, KEY_A, 0, 3000, distribution, device=DEV, block=block), full)
    for start, count in [(1, 1), (5, 7), (129, 1000), (2999, 1)]:
        part = T.direction(3, KEY_A, start, count, distribution, device=DEV, block=128)
        assert torch.equal(part, full[start : start + count])


def test_direction_differs_across_seeds_keys_and_distributions():
    a = T.direction(1, KEY_A, 0, 512, device=DEV)
    assert not torch.equal(a, T.direction(2, KEY_A, 0, 512, device=DEV))
    assert not torch.equal(a, T.direction(1, KEY_B, 0, 512, device=DEV))
    r = T.direction(1, KEY_A, 0, 512, "rademacher", device=DEV)
    assert set(r.unique().tolist()) == {-1.0, 1.0}


# -------------------------------------------------------------------------------------------------- perturb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
def test_perturb_pair_matches_reference(dtype, distribution):
    theta = _theta(N, dtype)
    before = theta.clone()
    plus, minus = T.perturb_pair(theta, SEGS, 99, 1e-2, distribution,
                                 out_plus=_poison(theta), out_minus=_poison(theta))
    rplus, rminus = R.perturb_pair(theta, SEGS, 99, 1e-2, distribution)
    assert torch.equal(theta, before), "theta must be untouched"
    assert_matches(plus, rplus, distribution)
    assert_matches(minus, rminus, distribution)


def test_perturb_pair_default_outputs_and_other_output_dtype():
    theta = _theta(3000, torch.float32).view(30, 100)
    segs = [(0, 3000, KEY_A, 1)]
    plus, minus = T.perturb_pair(theta, segs, 5, 1e-3)
    assert plus.shape == theta.shape and plus.dtype == theta.dtype
    # bf16 perturbed copies of an fp32 store: one rounding, straight from the float32 sum
    p16 = torch.full((3000,), float("nan"), dtype=torch.bfloat16, device=DEV)
    m16 = p16.clone()
    T.perturb_pair(theta, segs, 5, 1e-3, "rademacher", out_plus=p16, out_minus=m16)
    rp, rm = R.perturb_pair(theta, segs, 5, 1e-3, "rademacher", out_plus=torch.empty_like(p16),
                            out_minus=torch.empty_like(m16))
    assert torch.equal(p16, rp) and torch.equal(m16, rm)


# --------------------------------------------------------------------------------------------------- update
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("q", [1, 3])
def test_update_matches_reference(dtype, distribution, q):
    theta = _theta(N, dtype, seed=1)
    seeds = [101, 2**32 - 5, 7][:q]
    coeffs = [0.731, -2.5, 1e-3][:q]
    got = T.update(theta, SEGS, seeds, coeffs, 1e-2, 0.1, distribution, out=_poison(theta))
    ref = R.update(theta, SEGS, seeds, coeffs, 1e-2, 0.1, distribution)
    assert_matches(got, ref, distribution)


@pytest.mark.parametrize("distribution", DISTS)
def test_update_in_place_with_device_coefficients(distribution):
    """out=theta (the store buffer) and seeds / coefficients as device tensors (no host sync in the engine)."""
    theta = _theta(N, torch.float32, seed=2)
    ref = R.update(theta, SEGS, [5, 6], [0.25, -1.0], 3e-3, 0.01, distribution)
    seeds = torch.tensor([5, 6], device=DEV)
    coeffs = torch.tensor([0.25, -1.0], device=DEV)
    out = T.update(theta, SEGS, seeds, coeffs, 3e-3, 0.01, distribution, out=theta)
    assert out is theta
    assert_matches(theta, ref, distribution)
    # q = 1 with a device coefficient and a Python seed
    theta2 = _theta(N, torch.float32, seed=2)
    ref1 = R.update(theta2, SEGS, [5], [0.25], 3e-3, 0.0, distribution)
    assert_matches(T.update(theta2, SEGS, [5], coeffs[:1], 3e-3, 0.0, distribution), ref1, distribution)


def test_update_weight_decay_only_on_flagged_segments():
    theta = _theta(N, torch.float32, seed=3)
    got = T.update(theta, SEGS, [1], [0.0], 0.5, 0.2, "rademacher")
    for s in SegmentTable(SEGS):
        seg_t, seg_n = theta[s.offset : s.end], got[s.offset : s.end]
        expected = seg_t - (seg_t * 0.2) * 0.5 if s.decay else seg_t
        assert torch.equal(seg_n, expected)


def test_update_without_seeds_is_a_copy():
    theta = _theta(1000, torch.float32, seed=4)
    assert torch.equal(T.update(theta, [(0, 1000, 1, 1)], [], [], 0.1, 0.5), theta)


# ------------------------------------------------------------------------------------------ update+perturb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
def test_update_and_perturb_matches_reference(dtype, distribution):
    theta = _theta(N, dtype, seed=5)
    args = (SEGS, [31], [1.7], 1e-2, 0.05, 32, 1e-3, distribution)
    new, plus, minus = T.update_and_perturb(theta, *args, out=_poison(theta), out_plus=_poison(theta),
                                            out_minus=_poison(theta))
    rnew, rplus, rminus = R.update_and_perturb(theta, *args)
    assert_matches(new, rnew, distribution)
    assert_matches(plus, rplus, distribution)
    assert_matches(minus, rminus, distribution)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_and_perturb_stochastic_rounding_in_place(dtype):
    """Low-precision store updated in place with stochastic rounding, q = 2: bitwise equal to the reference."""
    theta = _theta(N, dtype, seed=6)
    args = (SEGS, [3, 4], [0.5, -0.25], 1e-3, 0.1, 9, 1e-3, "rademacher")
    rnew, rplus, rminus = R.update_and_perturb(theta, *args, stochastic_rounding_seed=1234)
    new, plus, minus = T.update_and_perturb(theta, *args, stochastic_rounding_seed=1234, out=theta,
                                            out_plus=_poison(theta), out_minus=_poison(theta))
    assert new is theta
    for a, b in ((new, rnew), (plus, rplus), (minus, rminus)):
        assert_matches(a, b, "rademacher", exact=True)
    # stochastic rounding differs from round-to-nearest somewhere (updates are far below one ulp)
    rne = R.update(_theta(N, dtype, seed=6), SEGS, [3, 4], [0.5, -0.25], 1e-3, 0.1, "rademacher")
    assert not torch.equal(rne, new)


def test_update_and_perturb_equals_update_then_perturb():
    theta = _theta(N, torch.bfloat16, seed=7)
    new, plus, minus = T.update_and_perturb(theta, SEGS, [8], [0.3], 1e-2, 0.0, 9, 1e-2,
                                            stochastic_rounding_seed=5)
    new2 = T.update(theta, SEGS, [8], [0.3], 1e-2, 0.0, stochastic_rounding_seed=5)
    plus2, minus2 = T.perturb_pair(new2, SEGS, 9, 1e-2)
    assert torch.equal(new, new2) and torch.equal(plus, plus2) and torch.equal(minus, minus2)


@pytest.mark.parametrize("distribution", DISTS)
def test_sliced_buffer_matches_whole_buffer(distribution):
    """A kernel on buffer[lo:hi] with SegmentTable.slice computes exactly what the whole-buffer run does there."""
    table = SegmentTable(SEGS)
    theta = _theta(N, torch.float32, seed=8)
    full = T.update_and_perturb(theta, table, [1], [0.5], 1e-2, 0.1, 2, 1e-3, distribution)
    for lo, hi in [(0, 1), (3, 2500), (2047, 5181), (5181, N)]:
        part = T.update_and_perturb(theta[lo:hi], table.slice(lo, hi), [1], [0.5], 1e-2, 0.1, 2, 1e-3,
                                    distribution)
        for a, b in zip(part, full):
            assert torch.equal(a, b[lo:hi])


@pytest.mark.parametrize("distribution", DISTS)
def test_results_independent_of_block(distribution):
    segs = SEGS[:4]  # 5180 elements: small blocks mean many interpreted programs
    theta = _theta(5180, torch.float32, seed=9)
    a = T.update_and_perturb(theta, segs, [1, 2], [0.5, 0.1], 1e-2, 0.1, 2, 1e-3, distribution)
    b = T.update_and_perturb(theta, segs, [1, 2], [0.5, 0.1], 1e-2, 0.1, 2, 1e-3, distribution, block=128)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("distribution", DISTS)
def test_persistent_programs_match_one_program_per_tile(distribution):
    """programs_per_sm > 0: a few programs walk all the tiles (each loading its next tile ahead), with the
    results of one program per tile bit for bit, in place too."""
    theta = _theta(N, torch.bfloat16, seed=10)
    args = (SEGS, [3], [0.5], 1e-2, 0.1, 4, 1e-3, distribution)
    one = T.update_and_perturb(theta, *args, stochastic_rounding_seed=7, block=512)
    few = T.update_and_perturb(theta, *args, stochastic_rounding_seed=7, block=512, programs_per_sm=3)
    for a, b in zip(one, few):
        assert torch.equal(a, b)
    pair = T.perturb_pair(theta, SEGS, 4, 1e-3, distribution, block=512, programs_per_sm=2,
                          out_plus=_poison(theta), out_minus=_poison(theta))
    assert all(torch.equal(a, b) for a, b in zip(pair, T.perturb_pair(theta, SEGS, 4, 1e-3, distribution)))
    inplace = theta.clone()
    T.update(inplace, SEGS, [3], [0.5], 1e-2, 0.1, distribution, out=inplace, block=512, programs_per_sm=3)
    assert torch.equal(inplace, T.update(theta, SEGS, [3], [0.5], 1e-2, 0.1, distribution))


def test_register_cap_changes_nothing_but_the_compile_and_is_checked():
    """max_registers (ptxas maxnreg, a benchmark knob) gives the same bits; bad caps are refused up front."""
    theta = _theta(N, torch.bfloat16, seed=11)
    args = (SEGS, [3], [0.5], 1e-2, 0.1, 4, 1e-3, "gaussian")
    capped = T.update_and_perturb(theta, *args, stochastic_rounding_seed=7, block=512, max_registers=40)
    for a, b in zip(capped, T.update_and_perturb(theta, *args, stochastic_rounding_seed=7, block=512)):
        assert torch.equal(a, b)
    for bad in (20, 50, 256):
        with pytest.raises(ValueError, match="max_registers must be a multiple of 8"):
            T.perturb_pair(theta, SEGS, 4, 1e-3, max_registers=bad)


# -------------------------------------------------------------------------------------- stochastic rounding
def _sr_inputs(n: int = 4000) -> torch.Tensor:
    g = _gen(10)
    mags = torch.exp2(torch.randint(-30, 16, (n,), generator=g).float())  # 2**-30 .. 2**15
    x = torch.randn(n, generator=g) * mags
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 70000.0, -70000.0, 6e-8, -3e-8, 2e-5,
                            1e-40, -1e-40, 3.0e38, float("inf"), float("-inf"), 1.0 + 2**-20])
    return torch.cat([special, x])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf - inf on purpose
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_kernel_equals_reference(dtype):
    x = _sr_inputs().to(DEV)
    got = T.stochastic_round(x, dtype, 77, KEY_A, 5)
    ref = R.stochastic_round(x, dtype, 77, KEY_A, 5)
    assert torch.equal(got.cpu(), ref.cpu())
    nan = torch.tensor([float("nan"), -float("nan")], device=DEV)
    assert torch.isnan(T.stochastic_round(nan, dtype, 1, 2).float()).all()
    assert torch.isnan(R.stochastic_round(nan, dtype, 1, 2).float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_returns_a_neighbour(dtype):
    x = _sr_inputs(20000)
    x = x[x.abs() <= 65504]  # inside both ranges
    r = R.stochastic_round(x, dtype, 3, KEY_B).float()
    near = x.to(dtype)  # round-to-nearest: one of the two neighbours
    toward = torch.where(x > near.float(), torch.full_like(near, float("inf")), torch.full_like(near, -float("inf")))
    other = torch.nextafter(near, toward).float()
    exact = near.float() == x
    assert ((r == near.float()) | ((r == other) & ~exact)).all()
    assert (r[exact] == x[exact]).all(), "representable values must stay exact"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased(dtype):
    n, copies = 512, 1000
    g = _gen(11)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 10, (n,), generator=g).float())
    if dtype == torch.float16:
        x[:16] = torch.rand(16, generator=g) * 2**-20  # float16 subnormal range
    # copies x n elements = one long parameter: every element gets its own random word
    r = R.stochastic_round(x.repeat(copies), dtype, 21, KEY_A).float().view(copies, n)
    ulp = _ulp(x, dtype)
    err = (r.mean(0) - x) / ulp  # in ulps; each copy's error lies in (-1, 1) ulp, sd <= 0.5
    assert err.abs().max() < 6 * 0.5 / math.sqrt(copies)
    assert abs(err.mean().item()) < 5 * 0.5 / math.sqrt(copies * n)
    # the point of it: an update of 0.1 ulp survives on average, where round-to-nearest drops it
    one = torch.full((50000,), 1.0 + 0.1 * _ulp(torch.tensor([1.0]), dtype).item())
    sr_mean = R.stochastic_round(one, dtype, 5, KEY_B).double().mean().item()
    assert abs(sr_mean - one[0].item()) < 0.01 * _ulp(torch.tensor([1.0]), dtype).item()
    assert one.to(dtype).double().mean().item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_reproducible(dtype):
    x = torch.randn(3000, generator=_gen(12)) * 1e-2
    a = R.stochastic_round(x, dtype, 7, KEY_A, 100)
    assert torch.equal(a, R.stochastic_round(x, dtype, 7, KEY_A, 100))
    assert not torch.equal(a, R.stochastic_round(x, dtype, 8, KEY_A, 100))
    assert not torch.equal(a, R.stochastic_round(x, dtype, 7, KEY_B, 100))
    # element k's bits depend only on (seed, key, k): a slice rounds like the whole
    assert torch.equal(R.stochastic_round(x[37:1000], dtype, 7, KEY_A, 137), a[37:1000])
    # the rounding stream is not a direction stream (tagged counters), even with the same seed
    words = R.sr_words(7, KEY_A, 0, 512)
    dir_words = torch.stack(rng.philox4x32(torch.arange(128), 7, KEY_A), dim=1).reshape(-1)
    assert not torch.equal(words, dir_words)


# ---------------------------------------------------------------------------------------------- statistics
@pytest.fixture(scope="module")
def gaussian_samples():
    n = 1 << 22  # 4M
    a = R.direction(1234, KEY_A, 0, n)
    b = R.direction(1235, KEY_A, 0, n >> 2)  # another seed, same key
    c = R.direction(1234, KEY_B, 0, n >> 2)  # same seed, another key
    return a, b, c


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum()))


def test_gaussian_moments(gaussian_samples):
    z = gaussian_samples[0].double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of a normal, var(z^4) = 96
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # each of the four positions fed by one counter is N(0, 1) on its own (Box-Muller pairs, cos and sin)
    for j in range(4):
        zj = z[j::4]
        m = zj.numel()
        assert abs(zj.mean().item()) < 5 / math.sqrt(m)
        assert abs(zj.var().item() - 1) < 5 * math.sqrt(2 / m)


def test_gaussian_no_correlation(gaussian_samples):
    a, b, c = gaussian_samples
    n = a.numel()
    for lag in (1, 2, 3, 4, 5, 8, 128):
        assert abs(_corr(a[:-lag], a[lag:])) < 5 / math.sqrt(n), lag
    # the pair (cos, sin) of one Box-Muller draw: correlated squares would betray a shared radius misuse
    assert abs(_corr(a[0::4] ** 2, a[1::4] ** 2)) < 5 / math.sqrt(n / 4)
    m = b.numel()
    assert abs(_corr(a[:m], b)) < 5 / math.sqrt(m)
    assert abs(_corr(a[:m], c)) < 5 / math.sqrt(m)


def test_rademacher_balanced_and_uncorrelated():
    n = 1 << 22
    z = R.direction(99, KEY_A, 0, n, "rademacher")
    assert set(z[:1000].unique().tolist()) == {-1.0, 1.0}
    assert abs(z.double().mean().item()) < 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 31, 32, 33, 128):
        assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(n), lag
    # every bit position of the 32-bit words is balanced
    per_bit = z.view(-1, 32).double().mean(0)
    assert per_bit.abs().max() < 5 / math.sqrt(n / 32)
    other = R.direction(100, KEY_A, 0, n >> 2, "rademacher")
    assert abs(_corr(z[: n >> 2], other)) < 5 / math.sqrt(n >> 2)


def test_kernel_z_statistics_small():
    """The kernel's own z (small, interpreted on CPU): loose moments, as a sanity check of the wiring."""
    n = 16384
    z = T.direction(5, KEY_B, 3, n, device=DEV).double().cpu()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    for lag in (1, 2, 3, 4):
        assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(n)


# --------------------------------------------------------------------------------------- dispatch and tables
def test_get_backend():
    assert zo2_kernels.get_backend("torch") is R
    assert zo2_kernels.get_backend("auto", "cpu") is R  # auto never picks the interpreter
    assert zo2_kernels.available()
    assert zo2_kernels.get_backend("triton", DEV).BACKEND == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        zo2_kernels.get_backend("cuda")
    for mod in (R, T):
        for fn in ("direction", "perturb_pair", "update", "update_and_perturb", "stochastic_round"):
            assert callable(getattr(mod, fn))


def test_get_backend_triton_unavailable(monkeypatch):
    monkeypatch.setattr(zo2_kernels, "_triton_importable", lambda: False)
    assert not zo2_kernels.available()
    with pytest.raises(RuntimeError, match="'triton' requested but unavailable: triton is not installed"):
        zo2_kernels.get_backend("triton")
    assert zo2_kernels.get_backend("auto") is R


@pytest.mark.skipif(HAS_CUDA, reason="checks the interpreter's CPU-only rule")
def test_get_backend_triton_wrong_device_in_interpreter():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        zo2_kernels.get_backend("triton", "cuda")


def test_segment_table():
    with pytest.raises(ValueError, match="overlap"):
        SegmentTable([(0, 10, 1, 1), (5, 10, 2, 1)])
    with pytest.raises(ValueError):
        SegmentTable([(0, 10, 2**32, 1)])
    t = SegmentTable.pack([(1, 5, True), (2, 3, False), (3, 0, True), (4, 8, True)], align=8)
    assert [(s.offset, s.numel) for s in t] == [(0, 5), (8, 3), (16, 8)]
    assert not t.aligned8 and not t.covers(24) and t.end == 24  # numel 5 and 3: no vector accesses
    assert SegmentTable.pack([(1, 5, True), (2, 3, False)]).covers(8)
    t = SegmentTable.pack([(1, 16, True), (2, 8, False), (4, 8, True)])
    assert t.aligned8 and t.covers(32)
    assert t.slice(8, 24).aligned8 and not t.slice(4, 24).aligned8
    s = SegmentTable(SEGS).slice(5000, 5300)
    assert list(s) == [Segment(0, 50, 11, True, 2951), Segment(50, 130, BIG_KEY, False, 0),
                       Segment(180, 120, 77, True, 333)]
    assert not s.aligned8


def test_argument_errors():
    theta = _theta(100, torch.float32)
    with pytest.raises(ValueError, match="segments reach"):
        T.perturb_pair(theta, [(0, 101, 1, 1)], 1, 1e-3)
    with pytest.raises(ValueError, match="coefficients"):
        T.update(theta, [(0, 100, 1, 1)], [1, 2], [0.5], 1e-3, 0.0)
    with pytest.raises(ValueError, match="distribution"):
        T.perturb_pair(theta, [(0, 100, 1, 1)], 1, 1e-3, "uniform")
    with pytest.raises(ValueError, match="block"):
        T.direction(1, 1, 0, 10, device=DEV, block=96)
    with pytest.raises(ValueError, match="torch backend"):
        T.perturb_pair(theta.double(), [(0, 100, 1, 1)], 1, 1e-3)
    # the reference follows zo2.optim.update.math_dtype: float64 θ is perturbed in float64
    p64, _ = R.perturb_pair(theta.double(), [(0, 100, 1, 1)], 1, 1e-3, "rademacher")
    z = R.direction(1, 1, 0, 100, "rademacher", device=DEV).double()
    assert p64.dtype == torch.float64 and torch.equal(p64, theta.double() + z * 1e-3)


# ------------------------------------------------------------------------------------------------- on a GPU
def _opt_block_table(d: int) -> SegmentTable:
    """The parameters of one OPT decoder block of width d, packed back to back."""
    shapes = [("q", d * d, 1), ("q.b", d, 0), ("k", d * d, 1), ("k.b", d, 0), ("v", d * d, 1), ("v.b", d, 0),
              ("o", d * d, 1), ("o.b", d, 0), ("ln1.w", d, 0), ("ln1.b", d, 0), ("fc1", 4 * d * d, 1),
              ("fc1.b", 4 * d, 0), ("fc2", 4 * d * d, 1), ("fc2.b", d, 0), ("ln2.w", d, 0), ("ln2.b", d, 0)]
    return SegmentTable.pack((rng.param_key(f"layers.3.{n}"), numel, decay) for n, numel, decay in shapes)


@gpu
@needs_cuda
@pytest.mark.parametrize("distribution", DISTS)
def test_gpu_opt_block_matches_reference(distribution):
    table = _opt_block_table(256)  # ~0.8M parameters
    theta = torch.randn(table.end, device="cuda", generator=torch.Generator("cuda").manual_seed(5)).to(torch.bfloat16)
    args = (table, [17], [0.37], 1e-3, 0.1, 18, 1e-3, distribution)
    new, plus, minus = T.update_and_perturb(theta, *args, stochastic_rounding_seed=3,
                                            out=_poison(theta), out_plus=_poison(theta), out_minus=_poison(theta))
    rnew, rplus, rminus = R.update_and_perturb(theta, *args, stochastic_rounding_seed=3)
    for a, b in ((new, rnew), (plus, rplus), (minus, rminus)):
        assert_matches(a, b, distribution)


@gpu
@needs_cuda
def test_gpu_kernel_z_statistics():
    n = 1 << 24
    z = T.direction(31, KEY_A, 0, n, device="cuda").double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    for lag in (1, 2, 3, 4):
        assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(n)
    ref = R.direction(31, KEY_A, 0, 1 << 20, device="cuda")
    torch.testing.assert_close(z[: 1 << 20].float(), ref, rtol=0, atol=1e-6)


@gpu
@needs_cuda
def test_gpu_large_offsets_and_fp32_exactness():
    """Rademacher fp32 updates are bit-identical to the torch reference on the GPU (no FMA contraction)."""
    table = SegmentTable([(0, 1 << 20, KEY_A, 1, 3 << 31), (1 << 20, 12345, KEY_B, 0, 7)])
    theta = torch.randn(table.end, device="cuda")
    args = (table, [5, 6, 7], [0.1, -0.2, 0.3], 1e-2, 0.05, 8, 1e-3, "rademacher")
    for a, b in zip(T.update_and_perturb(theta, *args), R.update_and_perturb(theta, *args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", DISTS)
def test_update_with_unit_lr_forms_exactly_the_perturbed_copy(backend, dtype, distribution):
    """The engine's one-copy-at-a-time mode forms θ ± εz as update(θ, [seed], [∓ε], lr=1, λ=0): it must be
    bit-identical to perturb_pair's outputs."""
    mod = R if backend == "reference" else T
    theta = _theta(1000, dtype, seed=3)
    table = SegmentTable([(0, 600, KEY_A, True), (600, 400, KEY_B, False)])
    plus, minus = mod.perturb_pair(theta, table, 77, 1e-2, distribution)
    for sign, want in ((1.0, plus), (-1.0, minus)):
        got = mod.update(theta, table, [77], [-sign * 1e-2], 1.0, 0.0, distribution, out=torch.empty_like(theta))
        assert torch.equal(got, want), sign


# ------------------------------------------------------------------------------------------ engine dispatch
@pytest.mark.parametrize("distribution", [d if d == "gaussian" else pytest.param(d, marks=pytest.mark.slow)
                                          for d in DISTS])  # the kernels' Rademacher path is checked above
def test_engine_with_kernels_follows_the_torch_path(distribution):
    """The engine with the Triton kernels follows the torch path: Rademacher bit for bit; Gaussian to the
    rounding of z, which the projected gradient (L+ − L-)/2ε amplifies, so the parameter check replays the
    kernel run's own updates through the torch path."""
    from zo2 import ZOConfig, ZOEngine
    from zo2_testing import clone_model, padded_batch, tiny_model

    base = tiny_model("llama", seed=3)
    device = "cuda" if HAS_CUDA else "cpu"
    runs = {}
    for backend, offload in (("torch", False), ("triton", False), ("triton", True)):
        cfg = ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=4, distribution=distribution, kernels=backend,
                       offload=offload, device=device)
        engine = ZOEngine(clone_model(base), cfg)
        assert (engine.kernels is R) == (backend == "torch")
        results = [engine.step(padded_batch(seed=s)) for s in range(3)]
        runs[(backend, offload)] = (results, {n: t.cpu() for n, t in engine.trainable_state().items()})
    (r_torch, p_torch), (r_tri, p_tri), (r_off, p_off) = runs.values()
    assert [r.losses for r in r_tri] == [r.losses for r in r_off]  # offload stays exact with the kernels
    assert all(torch.equal(p_tri[n], p_off[n]) for n in p_tri)
    if distribution == "rademacher":
        assert [r.losses for r in r_tri] == [r.losses for r in r_torch]
        assert all(torch.equal(p_torch[n], p_tri[n]) for n in p_tri)
        return
    assert r_tri[0].losses == pytest.approx(r_torch[0].losses, rel=1e-5)
    replay = ZOEngine(clone_model(base), ZOConfig(weight_decay=0.01, seed=4, kernels="torch", device=device))
    for r in r_tri:
        replay.apply_update(r.update)
    for n, t in replay.trainable_state().items():
        torch.testing.assert_close(p_tri[n], t.cpu(), rtol=0, atol=1e-6)
