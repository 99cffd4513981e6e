import pytest

from benchmarks import latency
from benchmarks.latency import first_call_ms, measure_latency, steady_seconds


def fake_clock(monkeypatch, durations):
    """perf_counter advancing by each call's duration in turn (the next of `durations` per fn() call)."""
    now = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: now[0])
    pending = iter(durations)

    def fn():
        now[0] += next(pending)

    return fn


def test_warms_up_until_the_last_five_runs_agree_with_the_five_before(monkeypatch):
    # OpenVINO-like: slow first runs, then steady at 18 ms with a little noise
    fn = fake_clock(monkeypatch, [0.080, 0.060, 0.045, 0.032, 0.030, 0.026, 0.022, 0.020]
                    + [0.018, 0.0185, 0.0179, 0.018, 0.0181] * 10)
    seconds, runs, stable = steady_seconds(fn, budget_s=60)
    assert stable and seconds == pytest.approx(0.018, rel=0.01)
    assert runs == 16  # runs 12-16 (median 18 ms) are the first within 5% of the five before them (7-11: 18.5 ms)


def test_a_part_that_never_settles_is_reported_unstable_within_its_budget(monkeypatch):
    fn = fake_clock(monkeypatch, [0.01 * (1.1 ** i) for i in range(1000)])  # ever slower
    seconds, runs, stable = steady_seconds(fn, budget_s=1.0)
    assert not stable and runs < 1000 and seconds > 0.01


def test_latency_of_a_model_steady_and_its_first_call(bright_runtime):
    first = first_call_ms(bright_runtime)
    timings = measure_latency(bright_runtime, budget_s=5)
    assert first > 0 and timings["latency_2d_ms"] > 0 and timings["latency_3d_s"] > 0
    assert timings["warmup_runs"] >= 10 and isinstance(timings["latency_stable"], bool)
