"""Penalty.state_dict / load_state_dict: values are copied into the tensors the
Penalty holds, never shared with the state dict or between Penalties (issue 20,
item 2); mismatches are errors before anything changes."""

import pytest
import torch
from torch import nn

import regext


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))


def test_loading_copies_into_the_held_tensor():
    t = torch.tensor(0.5, dtype=torch.float64)
    m = model()
    pen = regext.Penalty(m, l2=t)
    pen.load_state_dict(pen.state_dict())
    assert pen.l2 is t
    t.fill_(0.1)  # a schedule updating its tensor in place still reaches the Penalty
    torch.testing.assert_close(pen(), regext.fused_penalty(m.parameters(), 0.0, 0.1))


def test_two_penalties_loaded_from_one_state_share_nothing():
    m = model()
    sd = regext.Penalty(m, l1=torch.tensor(0.25), l2=0.5).state_dict()
    a = regext.Penalty(m, l1=torch.tensor(0.0), l2=0.0)
    b = regext.Penalty(m, l1=torch.tensor(0.0), l2=0.0)
    held_a, held_b = a.l1, b.l1
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    assert a.l1 is held_a and b.l1 is held_b
    assert float(a.l1) == float(b.l1) == 0.25 and a.l2 == b.l2 == 0.5
    sd["l1"].fill_(9.0)
    a.l1.fill_(1.0)
    assert float(b.l1) == 0.25  # neither the state dict nor a reaches b
    assert a.l1.untyped_storage().data_ptr() != b.l1.untyped_storage().data_ptr()


def test_loading_converts_dtype_and_keeps_the_held_device_and_dtype():
    m = model()
    held = torch.tensor(0.0, dtype=torch.float32)
    pen = regext.Penalty(m, l1=held)
    pen.load_state_dict({"step": 7, "l1": torch.tensor(0.125, dtype=torch.float64), "l2": 0.0,
                         "groups": [{"l1": None, "l2": None}]})
    assert pen.l1 is held and held.dtype == torch.float32 and float(held) == 0.125
    assert pen.step == 7
    pen.load_state_dict({"step": 8, "l1": 0.375, "l2": 0.0, "groups": [{"l1": None, "l2": None}]})
    assert pen.l1 is held and float(held) == 0.375  # a number copied into the tensor


def test_group_overrides_are_restored_as_copies():
    m = model()
    pen = regext.Penalty(m, l1=0.1)
    pen.groups[0].l2 = torch.tensor(0.03)
    sd = pen.state_dict()
    fresh = regext.Penalty(m, l1=0.1)
    fresh.load_state_dict(sd)
    assert float(fresh.groups[0].l2) == pytest.approx(0.03)
    assert fresh.groups[0].l2 is not sd["groups"][0]["l2"]
    sd["groups"][0]["l2"].fill_(5.0)
    assert float(fresh.groups[0].l2) == pytest.approx(0.03)
    back = regext.Penalty(m, l1=0.1)
    back.groups[0].l2 = 0.7
    back.load_state_dict(regext.Penalty(m, l1=0.1).state_dict())
    assert back.groups[0]._l2 is None  # "no override" restored: follows the default again


def test_schedules_stay_as_built_and_mismatches_change_nothing():
    m = model()
    sched = regext.Penalty(m, l1=lambda s: 0.1 * s)
    sd = sched.state_dict()
    assert sd["l1"] == "schedule"
    resumed = regext.Penalty(m, l1=lambda s: 0.1 * s)
    sd["step"] = 4
    resumed.load_state_dict(sd)
    assert resumed.step == 4 and callable(resumed.l1)

    held = torch.tensor(0.5)
    target = regext.Penalty(m, l1=held, l2=0.2)
    target.step = 2
    with pytest.raises(ValueError, match=r"Penalty.load_state_dict: l1 is a schedule in the "
                                         r"state but a tensor in this Penalty"):
        target.load_state_dict({**sd, "l2": 0.9})
    with pytest.raises(ValueError, match=r"l1 is a number in the state but a schedule"):
        regext.Penalty(m, l1=lambda s: s).load_state_dict(regext.Penalty(m, 0.1).state_dict())
    with pytest.raises(TypeError, match=r"l1 must be a number or a 0-dim floating-point "
                                        r"tensor, got a tensor of shape \(2,\)"):
        target.load_state_dict({"step": 1, "l1": torch.zeros(2), "l2": 0.9,
                                "groups": [{"l1": None, "l2": None}]})
    with pytest.raises(ValueError, match=r"l2 must be a finite number >= 0, got -1.0"):
        target.load_state_dict({"step": 1, "l1": 0.3, "l2": -1.0,
                                "groups": [{"l1": None, "l2": None}]})
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -3"):
        target.load_state_dict({"step": -3, "l1": 0.3, "l2": 0.9,
                                "groups": [{"l1": None, "l2": None}]})
    with pytest.raises(ValueError, match=r"the state has no 'groups' entry"):
        target.load_state_dict({"step": 1, "l1": 0.3, "l2": 0.9})
    # Nothing was half-applied by any failed load.
    assert target.l1 is held and float(held) == 0.5 and target.l2 == 0.2 and target.step == 2


def test_a_compiled_penalty_sees_the_restored_value():
    from torch._dynamo.testing import CompileCounterWithBackend
    m = model()
    held = torch.tensor(0.5, dtype=torch.float64)
    pen = regext.Penalty(m, l1=held)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda: pen(), fullgraph=True, backend=counter)
    compiled()
    first = counter.frame_count
    pen.load_state_dict({"step": 0, "l1": 0.125, "l2": 0.0, "groups": [{"l1": None, "l2": None}]})
    torch.testing.assert_close(compiled(), regext.fused_penalty(m.parameters(), 0.125))
    assert counter.frame_count == first  # no recompilation
