"""Series completion: silence plus slice-position evidence (dicomnode.series.completion)."""

from __future__ import annotations

import random

from dicomnode.config import CompletionConfig
from dicomnode.series.completion import SeriesState, evaluate
from dicomnode.types import SeriesKey

KEY = SeriesKey("1.2.3", "1.2.3.4")
POLICY = CompletionConfig(quiet_seconds=5.0, gap_timeout_seconds=60.0, gap_policy="warn")
T0 = 1_700_000_000.0


def stack(n: int, spacing: float = 2.5, start: float = -100.0) -> tuple[float, ...]:
    return tuple(start + spacing * i for i in range(n))


def state(positions: tuple[float, ...], *, last: float = T0, **changes: object) -> SeriesState:
    values: dict[object, object] = {
        "key": KEY,
        "first_arrival": last - 10.0,
        "last_arrival": last,
        "instance_count": len(positions),
        "positions": tuple(sorted(positions)),
    }
    values.update(changes)
    return SeriesState(**values)  # type: ignore[arg-type]


def test_nothing_is_decided_during_the_quiet_period() -> None:
    verdict = evaluate(state(stack(40)), T0 + 4.9, POLICY)
    assert not verdict.ready and not verdict.fail
    assert "receiving" in verdict.reason


def test_complete_evenly_spaced_stack_is_ready_after_the_quiet_period() -> None:
    verdict = evaluate(state(stack(40)), T0 + 5.0, POLICY)
    assert verdict.ready and not verdict.fail and verdict.warning == ""
    assert "40 evenly spaced slices" in verdict.reason


def test_gap_waits_for_the_gap_timeout() -> None:
    positions = stack(40)[:20] + stack(40)[22:]  # two slices missing
    verdict = evaluate(state(positions), T0 + 30.0, POLICY)
    assert not verdict.ready
    assert "2 missing slices" in verdict.reason


def test_gap_after_timeout_is_ready_with_a_warning_under_warn_policy() -> None:
    positions = stack(40)[:20] + stack(40)[22:]
    verdict = evaluate(state(positions), T0 + 60.0, POLICY)
    assert verdict.ready and not verdict.fail
    assert "incomplete series" in verdict.warning and "2 missing slices" in verdict.warning


def test_gap_after_timeout_fails_under_fail_policy() -> None:
    positions = stack(40)[:20] + stack(40)[22:]
    policy = CompletionConfig(quiet_seconds=5.0, gap_timeout_seconds=60.0, gap_policy="fail")
    verdict = evaluate(state(positions), T0 + 60.0, policy)
    assert verdict.ready and verdict.fail
    assert "incomplete series" in verdict.reason and "2 missing slices" in verdict.reason
    assert "between -52.50 and -45.00 mm" in verdict.reason


def test_missing_slices_arriving_before_the_timeout_complete_the_series() -> None:
    late = state(stack(40), last=T0 + 40.0)  # the gap filled 40 s later
    assert not evaluate(late, T0 + 42.0, POLICY).ready
    verdict = evaluate(late, T0 + 45.0, POLICY)
    assert verdict.ready and verdict.warning == ""


def test_a_late_instance_restarts_the_quiet_period() -> None:
    assert evaluate(state(stack(39)), T0 + 6.0, POLICY).ready
    with_late_slice = state(stack(40), last=T0 + 6.0)
    assert not evaluate(with_late_slice, T0 + 7.0, POLICY).ready
    assert evaluate(with_late_slice, T0 + 11.0, POLICY).ready


def test_arrival_order_does_not_matter() -> None:
    positions = list(stack(60))
    random.Random(3).shuffle(positions)
    verdict = evaluate(state(tuple(positions)), T0 + 5.0, POLICY)
    assert verdict.ready and verdict.warning == ""


def test_multiframe_instance_is_judged_by_silence_alone() -> None:
    enhanced = state((), instance_count=1, multiframe=True)
    assert not evaluate(enhanced, T0 + 4.0, POLICY).ready
    verdict = evaluate(enhanced, T0 + 5.0, POLICY)
    assert verdict.ready and "multi-frame" in verdict.reason


def test_unknown_positions_are_judged_by_silence_alone() -> None:
    partly_known = state(stack(10)[:5] + stack(10)[7:], instance_count=12)  # 4 without position
    verdict = evaluate(partly_known, T0 + 5.0, POLICY)
    assert verdict.ready and "without a slice position" in verdict.reason


def test_mixed_orientations_are_judged_by_silence_alone() -> None:
    verdict = evaluate(state(stack(10)[::3], orientation_consistent=False), T0 + 5.0, POLICY)
    assert verdict.ready and "different orientations" in verdict.reason


def test_series_without_new_instances_is_not_ready() -> None:
    taken = state(stack(40), processed_count=40)
    verdict = evaluate(taken, T0 + 100.0, POLICY)
    assert not verdict.ready and "no instance arrived" in verdict.reason


def test_gap_report_counts_the_missing_slices() -> None:
    positions = (0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 9.0)
    verdict = evaluate(state(positions), T0 + 60.0, POLICY)
    assert verdict.ready and "3 missing slices" in verdict.warning
    assert "2.00 and 5.00 mm" in verdict.warning and "7.00 and 9.00 mm" in verdict.warning


def test_spacing_jitter_within_tolerance_is_not_a_gap() -> None:
    jittered = (0.0, 3.0, 6.2, 9.0, 12.1, 15.0)
    assert evaluate(state(jittered), T0 + 5.0, POLICY).ready
    strict = CompletionConfig(quiet_seconds=5.0, gap_timeout_seconds=60.0, spacing_tolerance=0.01)
    verdict = evaluate(state(jittered), T0 + 5.0, strict)
    assert not verdict.ready and "uneven step" in verdict.reason


def test_duplicate_positions_are_not_steps() -> None:
    verdict = evaluate(state((0.0, 0.0, 2.0, 2.0, 4.0, 6.0)), T0 + 5.0, POLICY)
    assert verdict.ready and verdict.warning == ""
