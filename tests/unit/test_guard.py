"""The loss guard: a NaN/inf streak or a loss that jumped past divergence_factor × its average stops the run, and
the advice names the last step whose loss was in range."""

from __future__ import annotations

import math

import pytest

from zo2.errors import DivergedError, NonFiniteLossError
from zo2.train.guard import LossGuard


def guard(**kw) -> LossGuard:
    return LossGuard(**{"max_nonfinite": 3, "divergence_factor": 10.0, "resume_command": "zo2 train --resume r",
                        "lr": 1e-3, **kw})


def feed(g: LossGuard, losses: list[float], start: int = 0) -> None:
    for i, loss in enumerate(losses, start):
        g.check(i, loss, not math.isfinite(loss))


def test_a_jump_stops_and_names_the_weights_before_the_update_that_caused_it():
    g = guard()
    feed(g, [5.0, 4.9, 5.1, 4.8, 5.0, 4.7])  # records 0..5: steps 1..6
    with pytest.raises(DivergedError) as err:
        g.check(6, 3.8e4, False)  # step 7's loss: the update of step 6 blew the weights up
    text = str(err.value)
    assert "loss of step 7 jumped" in text and "update of step 6" in text
    assert "zo2 train --resume r --resume-from-step 5 --set optim.lr=0.0001" in text


def test_noise_below_the_factor_and_a_slow_drift_pass():
    g = guard()
    feed(g, [5.0, 9.0, 3.0, 12.0, 6.0] + [6.0 * 1.1 ** k for k in range(20)])
    assert g.last_good == 24


def test_a_nan_streak_after_a_blow_up_points_before_the_last_finite_step():
    g = guard()
    feed(g, [5.0, 5.0, 5.0])
    assert g.check(3, float("nan"), True) is not None  # tolerated, with a warning line
    g.check(4, float("nan"), True)
    with pytest.raises(NonFiniteLossError) as err:
        g.check(5, float("inf"), True)
    text = str(err.value)
    assert "steps 4 to 6" in text and "--resume-from-step 2" in text


def test_the_first_update_can_be_the_culprit_and_zero_turns_the_jump_check_off():
    g = guard()
    g.check(0, 5.5, False)
    with pytest.raises(DivergedError, match="--resume-from-step 0"):
        g.check(1, 900.0, False)
    off = guard(divergence_factor=0)
    feed(off, [5.5, 900.0, 1e6])
    assert off.last_good == 2


def test_replay_restores_the_state_of_a_resumed_run():
    records = [{"step": i, "loss": loss, "skipped": not math.isfinite(loss)}
               for i, loss in enumerate([5.0, 5.0, 5.0, float("nan"), float("nan")])]
    g = guard()
    g.replay(records)
    assert g.streak == 2 and g.last_good == 2
    with pytest.raises(NonFiniteLossError, match="--resume-from-step 2"):
        g.check(5, float("nan"), True)
