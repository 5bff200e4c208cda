"""The compiled CPU generator and fused pass (zo2/optim/philox.c via zo2.optim.native) against the pure-torch
reference, bit for bit: directions, the update-and-perturb pass, thread counts, and the ZO2_NATIVE=0 fallback."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import zo2_kernels
from zo2.optim import native, rng
from zo2_kernels import reference

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: only the reference runs here")


@contextlib.contextmanager
def pure_torch():
    """The reference path: the compiled library hidden as if it had failed to build."""
    lib, tried = native._lib, native._tried
    native._lib, native._tried = None, True
    try:
        yield
    finally:
        native._lib, native._tried = lib, tried


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# numel, start: single elements, sizes that are not multiples of 4 (or 128), slices starting mid-counter, more
# than one generator chunk, and counters crossing 2**32 (gaussian: 4 elements per counter).
CASES = [(1, 0), (3, 0), (7, 5), (130, 1), (70_001, 13), (300_007, 299), (1 << 18, 0),
         (4 * (1 << 32) + 50_000, 4 * ((1 << 32) - 3) + 1)]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_compiled_directions_are_the_reference_bits(distribution):
    r = random.Random(distribution)
    for numel, start in CASES:
        seed, key = r.getrandbits(32) | 1 << 31, r.getrandbits(32)
        count = min(numel - start, 200_003)
        got = rng.direction(seed, key, numel, start=start, count=count, distribution=distribution)
        with pure_torch():
            ref = rng.direction(seed, key, numel, start=start, count=count, distribution=distribution)
        assert got.shape == ref.shape == (count,)
        assert torch.equal(bits(got), bits(ref)), (distribution, numel, start)


def test_many_gaussian_values_are_the_reference_bits():
    """Four million normals (every float step of Box-Muller hit many times) equal the reference's."""
    got = native.gaussian(1 << 40, (1 << 40) + (1 << 20), 0xDEADBEEF, 12345)
    with pure_torch():
        ref = rng._gaussian_counters(1 << 40, (1 << 40) + (1 << 20), 0xDEADBEEF, 12345, "cpu")
    assert torch.equal(bits(got), bits(ref))


def test_one_thread_and_two_give_the_same_bits():
    with torch_threads(1):
        one = [native.gaussian(0, 50_000, 3, 4), native.rademacher(7, 3000, 3, 4), native.philox_range(0, 20_000, 3, 4)]
    with torch_threads(2):
        two = [native.gaussian(0, 50_000, 3, 4), native.rademacher(7, 3000, 3, 4), native.philox_range(0, 20_000, 3, 4)]
    assert torch.equal(bits(one[0]), bits(two[0])) and torch.equal(bits(one[1]), bits(two[1]))
    assert all(torch.equal(a, b) for a, b in zip(one[2], two[2]))


def _block(seed: int, sizes=(5, 33, 70_001, 4099, 1)):
    """A flat float32 buffer of odd-sized segments, some starting mid-parameter, some without decay."""
    g = torch.Generator().manual_seed(seed)
    segs, off = [], 0
    for i, n in enumerate(sizes):
        segs.append(zo2_kernels.Segment(off, n, 1000 + i, i % 2 == 0, start=(7 * i) % 5))
        off += n + 3  # gaps between segments are left alone
    theta = torch.randn(off, generator=g)
    return theta, zo2_kernels.SegmentTable(segs)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("seeds,coeffs,wd", [([11], [0.37], 0.01), ([11, 12, 13], [0.5, -2.0, 1e-3], 0.0)])
def test_fused_update_and_perturb_is_the_unfused_reference(distribution, seeds, coeffs, wd):
    theta, table = _block(len(seeds))
    args = (table, seeds, coeffs, 1e-3, wd, 99, 1e-3, distribution)
    covered = _covered(table, theta.numel())  # elements outside every segment are undefined in new outputs
    fused = reference.update_and_perturb(theta.clone(), *args)
    with pure_torch():
        new = reference.update(theta.clone(), table, seeds, coeffs, 1e-3, wd, distribution)
        plus, minus = reference.perturb_pair(new, table, 99, 1e-3, distribution)
    for a, b in zip(fused, (new, plus, minus)):
        assert torch.equal(bits(a)[covered], bits(b)[covered])
    assert not torch.equal(fused[1][covered], fused[2][covered])  # a real perturbation was compared
    # in place, as the engine calls it, with the elements between segments left as they were
    flat = theta.clone()
    outs = (torch.full_like(theta, 7.0), torch.full_like(theta, 7.0))
    reference.update_and_perturb(flat, *args, out=flat, out_plus=outs[0], out_minus=outs[1])
    expected = theta.clone()
    expected[covered] = new[covered]
    assert torch.equal(bits(flat), bits(expected))
    assert torch.equal(bits(outs[0])[covered], bits(plus)[covered])
    assert torch.equal(bits(outs[1])[covered], bits(minus)[covered])
    assert bool((outs[0][~covered] == 7.0).all())


def _covered(table, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    for seg in table:
        mask[seg.offset : seg.end] = True
    return mask


def test_the_fused_pass_and_pieces_do_not_depend_on_the_thread_count():
    theta, table = _block(5, sizes=(200_003, 65_537))
    with torch_threads(1):
        one = reference.update_and_perturb(theta.clone(), table, [1, 2], [0.3, -0.1], 1e-2, 0.1, 3, 1e-3)
        pair_one = reference.perturb_pair(theta, table, 4, 1e-3)
    with torch_threads(2):
        two = reference.update_and_perturb(theta.clone(), table, [1, 2], [0.3, -0.1], 1e-2, 0.1, 3, 1e-3)
        pair_two = reference.perturb_pair(theta, table, 4, 1e-3)
    covered = _covered(table, theta.numel())
    for a, b in zip((*one, *pair_one), (*two, *pair_two)):
        assert torch.equal(bits(a)[covered], bits(b)[covered])


def test_pieces_cover_each_segment_once_on_whole_counters():
    table = zo2_kernels.SegmentTable([(0, 3 * reference.CPU_PIECE + 5, 1, True, 17), (10 ** 6, 9, 2, False)])
    pieces = list(reference._pieces(table, torch.device("cpu")))
    first = table.segments[0]
    assert sum(p.numel for p in pieces) == sum(s.numel for s in table)
    assert [p.start for p in pieces[:5]] == [17, reference.CPU_PIECE, 2 * reference.CPU_PIECE,
                                             3 * reference.CPU_PIECE, 0]
    assert all(p.offset - first.offset == p.start - first.start for p in pieces[:4])
    assert all(p.numel <= reference.CPU_PIECE for p in pieces)
    assert list(reference._pieces(table, torch.device("meta"))) == list(table)


def test_zo2_native_0_turns_the_compiled_path_off_quietly(monkeypatch, recwarn):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("ZO2_NATIVE", "0")
    assert native.library() is None
    assert native.gaussian(0, 4, 1, 2) is None and native.rademacher(0, 1, 1, 2) is None
    theta, table = _block(1, sizes=(1000, 77))
    off = reference.update_and_perturb(theta.clone(), table, [5], [0.1], 1e-3, 0.0, 6, 1e-3)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("ZO2_NATIVE")
    assert native.library() is not None
    on = reference.update_and_perturb(theta.clone(), table, [5], [0.1], 1e-3, 0.0, 6, 1e-3)
    covered = _covered(table, theta.numel())
    assert all(torch.equal(bits(a)[covered], bits(b)[covered]) for a, b in zip(off, on))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_an_error_in_a_piece_reaches_the_caller():
    def boom(item):
        raise ValueError(f"piece {item}")

    with torch_threads(2), pytest.raises(ValueError, match="piece"):
        native.map_pieces(boom, range(4))
