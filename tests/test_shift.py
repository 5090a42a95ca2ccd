import numpy as np
import pytest

from fedshift.core.errors import ScenarioError
from fedshift.shift import BlockSchedule, ConstantSchedule, CosineSchedule, LinearSchedule, ModeSampler, TraceSchedule

T = 16


@pytest.mark.parametrize("cls", [LinearSchedule, CosineSchedule])
def test_round_zero_all_day_and_half_period_all_night(cls):
    s = cls(2, period=T)
    assert s.q(0) == pytest.approx(1.0)
    assert s.q(T // 2) == pytest.approx(0.0)
    assert s.q(T) == pytest.approx(1.0)  # periodic
    for t in range(3 * T):
        w = s.weights(t)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()


def test_linear_and_cosine_match_the_paper_formulas():
    lin, cos = LinearSchedule(2, period=T), CosineSchedule(2, period=T)
    for t in range(2 * T):
        phase = (t % T) / T
        assert lin.q(t) == pytest.approx(2 * abs(phase - 0.5))
        assert cos.q(t) == pytest.approx((np.cos(2 * np.pi * phase) + 1) / 2)


def test_block_cyclic_halves():
    s = BlockSchedule(2, period=T)
    assert [s.q(t) for t in range(T)] == [1.0] * (T // 2) + [0.0] * (T // 2)


def test_power_biases_towards_night():
    base, powered = LinearSchedule(2, period=T), LinearSchedule(2, period=T, power=2.0)
    for t in range(T):
        assert powered.q(t) == pytest.approx(base.q(t) ** 2)
        assert powered.weights(t).sum() == pytest.approx(1.0)
    assert powered.q(2) < base.q(2)  # p > 1 favours night
    assert LinearSchedule(2, period=T, power=0.5).q(2) > base.q(2)


def test_phase_offset_shifts_the_wave():
    s = LinearSchedule(2, period=T, phase=0.5)
    assert s.q(0) == pytest.approx(0.0) and s.q(T // 2) == pytest.approx(1.0)


def test_k_modes_each_peak_once_per_period():
    for cls in (LinearSchedule, CosineSchedule, BlockSchedule):
        s = cls(4, period=20)
        for k in range(4):
            assert s.weights(5 * k)[k] == pytest.approx(1.0)
        for t in range(40):
            assert s.weights(t).sum() == pytest.approx(1.0)
    # between two peaks the weight moves from one mode to its neighbour only
    w = LinearSchedule(4, period=20).weights(2)
    assert w[0] > 0 and w[1] > 0 and w[2] == 0 and w[3] == 0


def test_constant_weights_are_normalised():
    s = ConstantSchedule(3, weights=[1, 1, 2])
    assert np.allclose(s.weights(7), [0.25, 0.25, 0.5])


def test_trace_reads_rows_in_order_and_wraps(tmp_path):
    p = tmp_path / "trace.csv"
    p.write_text("round,day,night\n0,1,0\n1,0.5,0.5\n2,0,2\n")
    table = TraceSchedule.read_csv(p, ["day", "night"])
    s = TraceSchedule(2, table)
    assert np.allclose([s.q(t) for t in range(5)], [1, 0.5, 0, 1, 0.5])


@pytest.mark.parametrize("text,fragment", [
    ("day,night\n", "at least one data row"),
    ("day,dusk\n1,0\n", "one column per mode"),
    ("day,night\n1,x\n", "line 2"),
    ("day,night\n-1,2\n", ">= 0"),
])
def test_trace_errors_name_the_file_and_problem(tmp_path, text, fragment):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ScenarioError) as e:
        TraceSchedule.read_csv(p, ["day", "night"])
    assert fragment in str(e.value) and "bad.csv" in str(e.value)


def _sampler(schedule=None, seed=3, m=10):
    pools = [np.arange(0, 30), np.arange(30, 60)]
    return ModeSampler(schedule or LinearSchedule(2, period=T), pools, m, seed)


def test_sampler_counts_pools_and_no_duplicates():
    s = _sampler()
    for t in range(2 * T):
        cohort = s.cohort(t)
        ids = [c for c, _ in cohort]
        assert len(ids) == 10 and len(set(ids)) == 10
        for cid, mode in cohort:
            assert (mode == 0) == (cid < 30)
    assert all(m == 0 for _, m in s.cohort(0))       # q = 1: all day
    assert all(m == 1 for _, m in s.cohort(T // 2))  # q = 0: all night


def test_sampler_day_count_is_binomial_in_q():
    s = _sampler(ConstantSchedule(2, weights=[0.3, 0.7]), m=10)
    counts = np.array([s.counts(t)[0] for t in range(4000)])
    assert counts.mean() == pytest.approx(3.0, abs=0.1)
    assert counts.var() == pytest.approx(10 * 0.3 * 0.7, rel=0.1)


def test_same_cohort_whatever_the_call_order():
    a, b = _sampler(seed=7), _sampler(seed=7)
    forward = [a.cohort(t) for t in range(20)]
    backward = [b.cohort(t) for t in reversed(range(20))][::-1]
    assert forward == backward
    assert _sampler(seed=7).cohort(5) == forward[5]
    assert _sampler(seed=8).cohort(5) != forward[5] or _sampler(seed=8).cohort(6) != forward[6]


def test_k_mode_sampler_is_multinomial():
    pools = [np.arange(k * 20, (k + 1) * 20) for k in range(3)]
    s = ModeSampler(ConstantSchedule(3, weights=[0.2, 0.3, 0.5]), pools, 10, 0)
    counts = np.array([s.counts(t) for t in range(3000)])
    assert (counts.sum(1) == 10).all()
    assert np.allclose(counts.mean(0), [2, 3, 5], atol=0.15)


def test_sampler_rejects_pools_smaller_than_a_round():
    with pytest.raises(ValueError, match="fewer than clients_per_round"):
        ModeSampler(LinearSchedule(2, period=4), [np.arange(5), np.arange(5, 30)], 10, 0)
