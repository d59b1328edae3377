"""Schedules and target entropies: the value of every kind at given steps, their bounds, recipe errors, and a
calibrated target measured over the first steps and then fixed (its state survives a JSON round trip)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlvr_entropy.methods import MethodConfigError
from rlvr_entropy.methods.schedule import EntropyTarget, Schedule


def values(spec, steps, **kwargs):
    schedule = Schedule.parse(spec, "x", **kwargs)
    return [schedule.at(s) for s in steps]


# -- values --------------------------------------------------------------------------------------------------


def test_a_number_or_a_constant_mapping_is_the_same_value_at_every_step():
    assert values(0.3, [0, 1, 1000]) == [0.3, 0.3, 0.3]
    assert values(2, [0, 7]) == [2.0, 2.0]  # ints widen to floats
    assert values({"kind": "constant", "value": 0.3}, [0, 50, 10**6]) == [0.3, 0.3, 0.3]
    assert Schedule.parse(0.3, "x").bounds() == (0.3, 0.3)


def test_linear_goes_straight_from_start_to_end_then_stays():
    spec = {"kind": "linear", "start": 0.9, "end": 0.4, "steps": 200}
    assert values(spec, [0, 1, 50, 100, 150, 199, 200, 201, 5000]) == pytest.approx(
        [0.9, 0.8975, 0.775, 0.65, 0.525, 0.4025, 0.4, 0.4, 0.4], abs=1e-12)
    assert Schedule.parse(spec, "x").bounds() == (0.4, 0.9)
    rising = {"kind": "linear", "start": 0.0, "end": 0.01, "steps": 4}
    assert values(rising, [0, 1, 2, 3, 4, 9]) == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01], abs=1e-15)
    assert Schedule.parse(rising, "x").bounds() == (0.0, 0.01)


def test_cosine_follows_half_a_cosine_from_start_to_end_then_stays():
    spec = {"kind": "cosine", "start": 0.9, "end": 0.4, "steps": 200}
    # end + (start - end) * (1 + cos(pi * step / steps)) / 2
    expected = [0.9, 0.4 + 0.25 * (1 + math.sqrt(0.5)), 0.65, 0.4 + 0.25 * (1 - math.sqrt(0.5)), 0.4, 0.4]
    assert values(spec, [0, 50, 100, 150, 200, 300]) == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(0.826776695, abs=1e-9) and expected[3] == pytest.approx(0.473223305, abs=1e-9)
    assert values({**spec, "steps": 2}, [0, 1, 2]) == pytest.approx([0.9, 0.65, 0.4], abs=1e-12)
    assert Schedule.parse(spec, "x").bounds() == (0.4, 0.9)


def test_step_multiplies_by_gamma_at_each_milestone():
    spec = {"kind": "step", "start": 0.01, "milestones": [100, 150], "gamma": 0.5}
    assert values(spec, [0, 99, 100, 149, 150, 10**6]) == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], abs=1e-15)
    assert Schedule.parse(spec, "x").bounds() == pytest.approx((0.0025, 0.01))
    growing = {"kind": "step", "start": 0.01, "milestones": [3], "gamma": 4.0}
    assert values(growing, [2, 3]) == pytest.approx([0.01, 0.04]) and Schedule.parse(growing, "x").bounds() == (0.01, 0.04)
    off = {"kind": "step", "start": 0.02, "milestones": [5], "gamma": 0.0}  # switched off at step 5
    assert values(off, [4, 5]) == [0.02, 0.0] and Schedule.parse(off, "x").bounds() == (0.0, 0.02)
    assert values({"kind": "step", "start": 0.3, "milestones": [], "gamma": 0.5}, [0, 100]) == [0.3, 0.3]


def test_a_calibrated_schedule_has_no_value_of_its_own():
    schedule = Schedule.parse({"kind": "calibrated", "steps": 3}, "x", calibrated=True)
    assert schedule.kind == "calibrated" and schedule.steps == 3 and schedule.scale == 1.0
    with pytest.raises(ValueError, match="EntropyTarget"):
        schedule.at(0)


# -- recipe errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "match"), [
    ({"kind": "exponential", "start": 1.0}, r"x.kind: 'exponential' is not one of"),
    ({"start": 1.0, "end": 0.0, "steps": 5}, "mapping with `kind`"),
    ("0.5", "expected a number or a mapping"),
    (True, "expected a number or a schedule mapping"),
    ([0.1, 0.2], "expected a number or a mapping"),
    (float("nan"), "finite number"),
    ({"kind": "linear", "start": 0.9, "end": 0.4, "steps": 200, "step": 3}, r"unknown \['step'\]"),
    ({"kind": "linear", "start": 0.9, "end": 0.4}, r"missing \['steps'\]"),
    ({"kind": "cosine", "start": 0.9, "steps": 10}, r"missing \['end'\]"),
    ({"kind": "constant"}, r"missing \['value'\]"),
    ({"kind": "constant", "value": 1.0, "start": 1.0}, r"unknown \['start'\]"),
    ({"kind": "step", "start": 0.01, "milestones": [100]}, r"missing \['gamma'\]"),
    ({"kind": "linear", "start": "high", "end": 0.4, "steps": 10}, r"x.start: expected a finite number, got 'high'"),
    ({"kind": "linear", "start": 0.9, "end": None, "steps": 10}, "x.end: expected a finite number"),
    ({"kind": "cosine", "start": 0.9, "end": 0.4, "steps": 0}, "x.steps: expected a positive integer"),
    ({"kind": "cosine", "start": 0.9, "end": 0.4, "steps": 10.0}, "x.steps: expected a positive integer"),
    ({"kind": "linear", "start": 0.9, "end": 0.4, "steps": True}, "x.steps: expected a positive integer"),
    ({"kind": "constant", "value": "a"}, "x.value: expected a finite number"),
    ({"kind": "step", "start": 0.01, "milestones": [100, 150], "gamma": -0.5}, "x.gamma must be >= 0"),
    ({"kind": "step", "start": 0.01, "milestones": [100, 150], "gamma": "half"}, "x.gamma: expected a finite number"),
    ({"kind": "step", "start": 0.01, "milestones": [150, 100], "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "step", "start": 0.01, "milestones": [100, 100], "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "step", "start": 0.01, "milestones": [0, 100], "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "step", "start": 0.01, "milestones": [10.5], "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "step", "start": 0.01, "milestones": [True], "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "step", "start": 0.01, "milestones": 100, "gamma": 0.5}, "increasing positive steps"),
    ({"kind": "calibrated", "steps": 10}, r"x.kind: 'calibrated' is not one of"),  # not allowed here
])
def test_malformed_schedules_are_refused_with_the_place_named(spec, match):
    with pytest.raises(MethodConfigError, match=match):
        Schedule.parse(spec, "x")


@pytest.mark.parametrize(("spec", "match"), [
    ({"kind": "calibrated"}, r"missing \['steps'\]"),
    ({"kind": "calibrated", "steps": 10, "scale": 0.0}, "x.scale must be > 0"),
    ({"kind": "calibrated", "steps": 10, "scale": -1.0}, "x.scale must be > 0"),
    ({"kind": "calibrated", "steps": 0}, "x.steps: expected a positive integer"),
    ({"kind": "calibrated", "steps": 10, "start": 0.5}, r"unknown \['start'\]"),
])
def test_malformed_calibrated_schedules_are_refused(spec, match):
    with pytest.raises(MethodConfigError, match=match):
        Schedule.parse(spec, "x", calibrated=True)


def test_a_target_entropy_is_never_negative():
    with pytest.raises(MethodConfigError, match="t: a target entropy must be >= 0"):
        EntropyTarget(-0.1, "t")
    with pytest.raises(MethodConfigError, match="must be >= 0"):
        EntropyTarget({"kind": "linear", "start": 0.5, "end": -0.1, "steps": 10}, "t")
    with pytest.raises(MethodConfigError, match="must be >= 0"):
        EntropyTarget({"kind": "step", "start": -0.5, "milestones": [3], "gamma": 0.0}, "t")
    assert EntropyTarget(0.0, "t").value(5, {}) == 0.0


# -- targets -------------------------------------------------------------------------------------------------


def test_a_scheduled_target_needs_no_state():
    target = EntropyTarget({"kind": "linear", "start": 0.9, "end": 0.4, "steps": 200}, "t")
    assert not target.calibrated and target.init_state() == {}
    state = target.init_state()
    target.observe(0, state, 10.0, 20.0)  # ignored: nothing to calibrate
    assert state == {} and target.value(100, state) == pytest.approx(0.65)


def test_a_calibrated_target_is_the_scaled_mean_of_the_first_steps_then_fixed():
    target = EntropyTarget({"kind": "calibrated", "steps": 2, "scale": 0.8}, "t")
    assert target.calibrated
    state = target.init_state()
    assert state == {"sum": 0.0, "count": 0.0, "value": None}
    # step 0: two micro-batches (token sums and counts, global over processes); no target yet
    target.observe(0, state, 9.0, 10.0)
    target.observe(0, state, 3.0, 5.0)
    assert target.value(0, state) is None and target.value(1, state) is None
    target.observe(1, state, 6.0, 5.0)
    assert state == {"sum": 18.0, "count": 20.0, "value": None}
    # from step 2 on: 0.8 x (18 / 20) = 0.72, and it no longer moves
    assert target.value(2, state) == pytest.approx(0.72)
    assert state["value"] == pytest.approx(0.72)
    target.observe(2, state, 100.0, 1.0)  # after calibration: ignored
    target.observe(1, state, 100.0, 1.0)  # a late measurement of a calibration step: ignored once fixed
    assert target.value(3, state) == pytest.approx(0.72) and target.value(10**6, state) == pytest.approx(0.72)
    assert state["sum"] == 18.0 and state["count"] == 20.0


def test_measurements_after_the_calibration_steps_do_not_count():
    target = EntropyTarget({"kind": "calibrated", "steps": 3}, "t")  # scale 1
    state = target.init_state()
    target.observe(0, state, 2.0, 4.0)  # 0.5
    target.observe(4, state, 50.0, 1.0)  # step 4 >= 3: not part of the calibration
    assert target.value(2, state) is None
    assert target.value(3, state) == pytest.approx(0.5)


def test_a_calibrated_target_with_nothing_measured_stays_undefined():
    target = EntropyTarget({"kind": "calibrated", "steps": 1}, "t")
    state = target.init_state()
    assert target.value(5, state) is None and state["value"] is None


def test_calibration_state_survives_a_json_round_trip_at_every_stage():
    """The owner keeps the state in its (checkpointed) method state: a resume restores it from JSON."""
    target = EntropyTarget({"kind": "calibrated", "steps": 2, "scale": 0.5}, "t")
    state = target.init_state()
    assert json.loads(json.dumps(state)) == state
    target.observe(0, state, torch.tensor(3.0), torch.tensor(4.0))  # the detached global sums LossBatch gives
    assert isinstance(state["sum"], float) and isinstance(state["count"], float)
    resumed = json.loads(json.dumps(state))
    assert resumed == state
    target.observe(1, resumed, 1.0, 4.0)
    assert target.value(2, resumed) == pytest.approx(0.25)
    again = json.loads(json.dumps(resumed))
    assert again == resumed and target.value(9, again) == pytest.approx(0.25)
