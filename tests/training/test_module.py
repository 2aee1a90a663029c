from __future__ import annotations

import math

import pytest

from training.module import lr_factor


def test_constant_schedule_warms_up_then_holds():
    f = lr_factor("constant", warmup_steps=4, total_steps=-1)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(10**6) == 1.0


def test_cosine_schedule_decays_to_zero_at_max_steps():
    f = lr_factor("cosine", warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0
    after = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never rises after warm-up
    assert f(60) == pytest.approx(0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.0, abs=1e-12) and f(500) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_schedule_errors_name_the_setting():
    with pytest.raises(ValueError, match="lr_decay"):
        lr_factor("linear", 0, 100)
    with pytest.raises(ValueError, match="max_steps"):
        lr_factor("cosine", 10, -1)  # no trainer.max_steps: a cosine has nowhere to end


def test_cosine_run_shorter_than_its_warmup_only_warms_up():
    f = lr_factor("cosine", warmup_steps=10, total_steps=3)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
