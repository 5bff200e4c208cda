"""Counter-based directions, estimators and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from zo2.config import ZOConfig
from zo2.errors import ConfigError
from zo2.optim.rng import direction, direction_seed, param_key, philox4x32
from zo2.optim.schedule import lr_at


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("start,count", [(0, 1), (1, 7), (3, 130), (127, 129), (500, 1501)])
def test_any_slice_regenerates_alone(distribution, start, count):
    full = direction(12345, param_key("w"), 2001, distribution=distribution)
    part = direction(12345, param_key("w"), 2001, start=start, count=count, distribution=distribution)
    assert torch.equal(full[start:start + count], part)


def test_directions_depend_on_seed_and_parameter():
    a = direction(1, param_key("a"), 4096)
    assert not torch.equal(a, direction(2, param_key("a"), 4096))
    assert not torch.equal(a, direction(1, param_key("b"), 4096))
    assert abs(torch.corrcoef(torch.stack([a, direction(1, param_key("b"), 4096)]))[0, 1]) < 0.06


def test_gaussian_statistics():
    z = direction(99, 7, 1 << 20).double()
    assert abs(z.mean().item()) < 5e-3 and abs(z.var().item() - 1) < 5e-3
    for lag in (1, 2, 3, 4, 5):
        corr = (z[:-lag] * z[lag:]).mean().item()
        assert abs(corr) < 5e-3, lag
    assert abs((z ** 4).mean().item() - 3.0) < 3e-2  # Gaussian kurtosis


def test_rademacher_is_balanced_signs():
    r = direction(5, 6, 1 << 16, distribution="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 0.02
    assert abs((r[:-1] * r[1:]).mean().item()) < 0.02


def test_philox_known_answer():
    # Random123's published known-answer test for Philox4x32-10 with zero counter and zero key.
    c = torch.zeros(1, dtype=torch.int64)
    out = [int(x) for x in philox4x32(c, 0, 0)]
    assert out == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_direction_seeds_are_distinct_across_steps_and_directions():
    seeds = {direction_seed(0, s, d) for s in range(200) for d in range(3)}
    assert len(seeds) == 600
    assert direction_seed(1, 0) != direction_seed(0, 0)


def test_schedules():
    assert lr_at(5, 0.1) == 0.1
    assert [lr_at(s, 1.0, "constant", warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(10, 1.0, "linear", 0, 10) == 0.0 and lr_at(5, 1.0, "linear", 0, 10) == 0.5
    assert lr_at(0, 1.0, "cosine", 0, 10) == 1.0
    assert lr_at(5, 1.0, "cosine", 0, 10) == pytest.approx(0.5)
    assert lr_at(10, 1.0, "cosine", 0, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(7, 2.0, "cosine", 2, 12) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kwargs,field", [({"lr": -1.0}, "optim.lr"), ({"eps": 0.0}, "optim.eps"),
                                          ({"estimator": "centrl"}, "optim.estimator"), ({"q": 0}, "optim.q"),
                                          ({"lr_schedule": "cosine"}, "optim.total_steps")])
def test_bad_optim_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ZOConfig(**kwargs)


def test_did_you_mean_for_a_misspelled_choice():
    with pytest.raises(ConfigError, match="Did you mean 'central'"):
        ZOConfig(estimator="centrl")


def test_compiled_cpu_philox_gives_the_reference_words_and_directions():
    """The compiled generator (zo2/optim/philox.c) computes the reference's integers exactly — counters above 2**32
    and keys with the top bit set included — so directions are the same bits with it and without."""
    import random

    from zo2.optim import native

    if native.library() is None:
        pytest.skip("no C compiler here: the reference runs (warned), which the other tests cover")
    rng = random.Random(0)
    for m0, n in [(0, 1), (5, 3000), ((1 << 32) - 3, 10), (rng.getrandbits(40), 777)]:
        seed, key = rng.getrandbits(32) | 1 << 31, rng.getrandbits(32)
        ref = philox4x32(torch.arange(m0, m0 + n, dtype=torch.int64), seed, key)
        got = native.philox_range(m0, m0 + n, seed, key)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (m0, n)
    lib = native._lib
    with_native = [direction(7, param_key("w"), 70_001, start=13, distribution=d) for d in ("gaussian", "rademacher")]
    try:
        native._lib = None  # the pure-torch path
        without = [direction(7, param_key("w"), 70_001, start=13, distribution=d) for d in ("gaussian", "rademacher")]
    finally:
        native._lib = lib
    assert all(torch.equal(a, b) for a, b in zip(with_native, without))


def test_without_a_compiler_the_reference_runs_with_one_warning(tmp_path, monkeypatch):
    from zo2.optim import native

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached: it must build
    with pytest.warns(RuntimeWarning, match="could not build the compiled CPU Philox generator"):
        assert native.library() is None
    assert native.philox_range(0, 4, 1, 2) is None
    ref = direction(3, param_key("v"), 999)
    monkeypatch.setattr(native, "_tried", True)  # warned once: later calls stay quiet
    assert torch.equal(direction(3, param_key("v"), 999), ref)


def test_the_generator_builds_into_an_empty_cache(tmp_path, monkeypatch):
    """What a new machine does on first use: compile philox.c into the cache, load it, get the reference's words."""
    import shutil

    from zo2.optim import native

    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.library() is not None
    assert [p.suffix for p in (tmp_path / "zo2").iterdir()] == [".so"]  # no temporary file left beside it
    ref = philox4x32(torch.arange(10, 50, dtype=torch.int64), 11, 12)
    assert all(torch.equal(a, b) for a, b in zip(ref, native.philox_range(10, 50, 11, 12)))
