"""When has a series finished arriving? (PURE)

DICOM has no "end of series" message: a C-STORE association may carry part of a series, several
series, or one series may come over several associations (PS3.4 Annex B, PS3.7 9.1.1). Silence
alone is the usual answer and the usual cause of series cut in two when a sender pauses. This
module decides from evidence as well as silence:

1. **Quiet period.** Nothing is decided while an instance of the series arrived less than
   ``quiet_seconds`` ago.
2. **Evenly spaced stack.** For single-frame instances whose positions along the slice normal
   are known, the sorted positions must form an evenly spaced stack
   (:func:`dicomnode.assemble.stack_gaps`, the same rule assembly applies): every step between
   neighbours within ``spacing_tolerance`` (relative) of the median step. A step that is a
   whole multiple of it is a *gap* (slices missing, or not yet received); any other uneven
   step is waited for in the same way.
3. **Gap timeout.** With a gap, the series is given until ``last_arrival +
   gap_timeout_seconds`` for the missing slices to arrive (a PACS may resend them, or a second
   association may still be queued). Then the verdict is *ready with a warning*
   (``gap_policy = "warn"``) or *failed* with the reason (``gap_policy = "fail"``).
4. **Silence only** judges what has no comparable positions: an Enhanced (multi-frame)
   instance, instances without ImagePositionPatient/ImageOrientationPatient, a stack of fewer
   than three positions, or instances whose orientations differ (positions along different
   normals cannot be compared; assembly reports that problem).

What the rules cannot see: slices missing at either end of the stack, and a stack where every
other slice is missing (the median step is then twice the true one). Silence covers the first;
assembly checks the spacing against the slice thickness for the second.

A late instance (one arriving after the quiet period had passed but before the series was
taken) simply moves ``last_arrival`` forward and restarts every timer; an instance arriving
after the series was taken makes it pending again (``instance_count > processed_count``) and it
is judged afresh, as a whole, on its next evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicomnode.assemble import StackCheck, stack_gaps
from dicomnode.config import CompletionConfig
from dicomnode.types import SeriesKey

#: Positions closer than this (mm) are the same slice position (a duplicate, not a step).
SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class SeriesState:
    """What the index knows about one series at one moment.

    Attributes
    ----------
    key:
        Study and series.
    first_arrival, last_arrival:
        Wall-clock times (seconds since the epoch) of the first and the latest received
        instance, duplicates included.
    instance_count:
        Distinct SOP instances received.
    processed_count:
        Instances covered by the last job taken for this series (0 before the first job).
    positions:
        Position (mm) of each single-frame instance along its slice normal
        (ImagePositionPatient projected on the cross product of the ImageOrientationPatient
        cosines, PS3.3 C.7.6.2.1.1), sorted; instances without a position are left out.
    orientation_consistent:
        All instances that carry ImageOrientationPatient share one orientation.
    multiframe:
        At least one instance has more than one frame (Enhanced CT, PS3.3 A.38).
    routable:
        The series holds instances the pipeline processes (CT); non-CT series accepted under
        ``non_ct = "accept"`` are stored but never routed.
    replaced_count:
        Instances whose content was replaced by a later copy with the same SOP Instance UID.
    """

    key: SeriesKey
    first_arrival: float
    last_arrival: float
    instance_count: int
    processed_count: int = 0
    positions: tuple[float, ...] = ()
    orientation_consistent: bool = True
    multiframe: bool = False
    routable: bool = True
    replaced_count: int = 0

    @property
    def new_instances(self) -> int:
        """Instances not covered by the last job."""
        return max(self.instance_count - self.processed_count, 0)


@dataclass(frozen=True)
class Verdict:
    """The completion rule's answer for one series at one moment.

    ``ready`` means "decided now: take the series". A taken series is either processed
    (``fail`` false, possibly with a ``warning`` for the report) or failed at once with
    ``reason`` (``fail`` true). ``ready`` false means "keep waiting"; ``reason`` says for what.
    """

    ready: bool
    reason: str
    warning: str = ""
    fail: bool = False


def evaluate(state: SeriesState, now: float, policy: CompletionConfig) -> Verdict:
    """Decide whether ``state`` is a complete series (rules in the module docstring).

    Parameters
    ----------
    state:
        The series as the index sees it.
    now:
        Current wall-clock time, seconds since the epoch (the clock of ``last_arrival``).
    policy:
        Quiet period, gap timeout and gap policy.
    """
    if state.new_instances == 0:
        return Verdict(False, "no instance arrived since the last job")
    silent_for = now - state.last_arrival
    if silent_for < policy.quiet_seconds:
        return Verdict(
            False,
            f"receiving: last instance {silent_for:.1f} s ago "
            f"(quiet period {policy.quiet_seconds:g} s)",
        )
    why_silence_only = _why_silence_only(state)
    if why_silence_only:
        return Verdict(True, f"quiet for {silent_for:.1f} s; {why_silence_only}")
    stack = stack_gaps(_distinct_sorted(state.positions), policy.spacing_tolerance)
    if stack.complete:
        return Verdict(
            True,
            f"{len(state.positions)} evenly spaced slices, quiet for {silent_for:.1f} s",
        )
    return _judge_gaps(stack, state, silent_for, policy)


def _why_silence_only(state: SeriesState) -> str:
    """Why positions cannot judge this series (empty when they can)."""
    if state.multiframe:
        return "multi-frame instance: judged by silence"
    if len(state.positions) < state.instance_count:
        return "instances without a slice position: judged by silence"
    if not state.orientation_consistent:
        return "instances with different orientations: judged by silence"
    if len(_distinct_sorted(state.positions)) < 3:
        return "fewer than three slice positions: judged by silence"
    return ""


def _judge_gaps(
    stack: StackCheck, state: SeriesState, silent_for: float, policy: CompletionConfig
) -> Verdict:
    described = _describe_gaps(stack)
    if silent_for < policy.gap_timeout_seconds:
        return Verdict(
            False,
            f"waiting for {described} (gap timeout {policy.gap_timeout_seconds:g} s, "
            f"quiet for {silent_for:.1f} s)",
        )
    message = (
        f"{len(state.positions)} slices with {described}, nothing arrived for {silent_for:.0f} s"
    )
    if policy.gap_policy == "fail":
        return Verdict(True, f"incomplete series: {message}", fail=True)
    return Verdict(
        True, f"processed despite a gap: {message}", warning=f"incomplete series: {message}"
    )


def _describe_gaps(stack: StackCheck) -> str:
    parts = []
    if stack.gaps:
        missing = stack.missing_slices
        where = "; ".join(f"{g.start_mm:.2f} and {g.end_mm:.2f} mm" for g in stack.gaps[:3])
        more = f" and {len(stack.gaps) - 3} more" if len(stack.gaps) > 3 else ""
        parts.append(f"{missing} missing slice{'s' if missing != 1 else ''} (between {where}{more})")
    if stack.irregular:
        n = len(stack.irregular)
        parts.append(f"{n} uneven step{'s' if n != 1 else ''} between slices")
    return " and ".join(parts)


def _distinct_sorted(positions: Iterable[float]) -> list[float]:
    distinct: list[float] = []
    for p in sorted(positions):
        if not distinct or p - distinct[-1] > SAME_POSITION_MM:
            distinct.append(p)
    return distinct
