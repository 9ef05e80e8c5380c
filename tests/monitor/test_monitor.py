"""SummaryMonitor, its log and load_log: values against the oracle, no effect on training,
crash safety, clear errors before training starts."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hos
from hos import reference
from tests.helpers.tolerances import ROUNDOFF, assert_close

DT = torch.float64


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).to(DT)


def batch(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def train(net, steps, monitor=None, lr=0.1, momentum=0.9):
    """A plain loop that draws from the global RNG (dropout) and uses momentum."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    x, y = batch()
    for step in range(steps):
        if monitor is not None:
            monitor.step(step, x, y)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return opt


def state_of(net, opt):
    out = {f"p.{k}": v.detach().clone() for k, v in net.named_parameters()}
    out.update({f"b.{k}": v.clone() for k, v in net.named_buffers()})
    out.update({f"grad.{k}": v.grad.clone() for k, v in net.named_parameters()})
    for i, (p, st) in enumerate(opt.state.items()):
        out[f"m.{i}"] = st["momentum_buffer"].clone()
    out["rng"] = torch.get_rng_state()
    return out


def test_a_run_with_the_monitor_ends_bit_for_bit_where_one_without_ends(tmp_path):
    torch.manual_seed(123)
    plain = make_net()
    torch.manual_seed(7)
    opt_plain = train(plain, 9)
    watched = make_net()
    torch.manual_seed(7)
    mon = hos.SummaryMonitor(
        watched, nn.CrossEntropyLoss(), every=2, log_dir=tmp_path / "run", diag_d4=True,
        full_d3=True, optimizer=None,
    )  # fmt: skip
    opt_watched = train(watched, 9, mon)
    a, b = state_of(plain, opt_plain), state_of(watched, opt_watched)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert watched.training and all(m.training for m in watched.modules())
    assert hos.load_log(tmp_path / "run").steps.tolist() == [0, 2, 4, 6, 8]


def test_snapshots_match_the_reference_oracle_at_the_recorded_parameters(tmp_path):
    net = make_net()
    x, y = batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    mon = hos.SummaryMonitor(
        net, nn.CrossEntropyLoss(), every=3, log_dir=tmp_path, diag_d4=True, full_d3=True
    )
    seen = {}
    for step in range(7):
        if mon.should_record(step):
            seen[step] = {k: v.detach().clone() for k, v in net.named_parameters()}
        mon.step(step, x, y)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    run = hos.load_log(tmp_path)
    assert run.steps.tolist() == [0, 3, 6]
    part = hos.Partition.per_layer(net)
    assert run.names == part.names
    for t, step in enumerate(run.steps.tolist()):
        theta = seen[step]
        loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
        p = {k: v.clone().requires_grad_() for k, v in theta.items()}
        u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
        for order, logged in ((1, run.g[t]), (2, run.H[t]), (3, run.D3[t])):
            exact = reference.summary_tensor(loss, theta, u, part, order=order)
            assert_close(torch.from_numpy(logged), exact, "oracle")
        d3 = reference.summary_diagonal(loss, theta, u, part, order=3)
        d4 = reference.summary_diagonal(loss, theta, u, part, order=4)
        assert_close(torch.from_numpy(run.d3[t]), d3, "oracle")
        assert_close(torch.from_numpy(run.d4[t]), d4, "oracle")
        assert run.loss[t] == pytest.approx(float(loss(theta)), rel=ROUNDOFF["rtol"])


def test_in_memory_snapshots_and_the_loaded_log_agree(tmp_path):
    net = make_net()
    mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path, keep=True)
    train(net, 3, mon)
    run = hos.load_log(tmp_path)
    assert len(run) == 3 == len(mon.snapshots)
    for t, snap in enumerate(mon.snapshots):
        np.testing.assert_array_equal(run.H[t], snap.H)
        np.testing.assert_array_equal(run.g[t], snap.g)
        assert run.times[t] == snap.time
    assert run.d4 is None and run.D3 is None
    assert run.settings["every"] == 1 and run.settings["direction"] == "gradient"
    assert run.groups == dict(hos.Partition.per_layer(net))
    share = run.offdiagonal_share()
    assert share.shape == (3,) and np.all((share >= 0) & (share <= 1))
    H = run.H[0]
    expected = np.linalg.norm(H - np.diag(np.diag(H))) / np.linalg.norm(H)
    assert share[0] == pytest.approx(expected, rel=ROUNDOFF["rtol"])


def test_momentum_direction_reads_the_optimizer_buffer(tmp_path):
    net = make_net()
    x, y = batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    mon = hos.SummaryMonitor(
        net, nn.CrossEntropyLoss(), every=2, direction="momentum", optimizer=opt, keep=True
    )
    with pytest.warns(UserWarning, match="no momentum"):
        assert mon.step(0, x, y) is None  # no buffer before the first step
    for step in range(1, 5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if step == 4:
            loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
            theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
            grads = dict(zip(theta, torch.autograd.grad(loss(theta), list(theta.values()))))
            bufs = {k: opt.state[p]["momentum_buffer"] for k, p in net.named_parameters()}
            part = hos.Partition.per_layer(net)
            expected = [sum((grads[p] * bufs[p]).sum() for p in group) for _, group in part]
        mon.step(step, x, y)
    assert [s.step for s in mon.snapshots] == [2, 4]
    assert_close(torch.from_numpy(mon.snapshots[-1].g), torch.stack(expected), "backends")


def test_random_direction_is_fixed_and_seeded():
    net = make_net()
    x, y = batch()
    a = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, direction="random", seed=3)
    b = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, direction="random", seed=3)
    c = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, direction="random", seed=4)
    sa, sb, sc = a.record(0, x, y), b.record(0, x, y), c.record(0, x, y)
    np.testing.assert_array_equal(sa.H, sb.H)
    assert not np.allclose(sa.g, sc.g)
    np.testing.assert_array_equal(a.record(1, x, y).H, sa.H)  # same θ, same direction


def test_callable_direction_is_checked_before_training():
    net = make_net()
    names = [k for k, _ in net.named_parameters()]
    with pytest.raises(ValueError, match=r"wrong keys: missing \['0.weight'"):
        hos.SummaryMonitor(
            net, nn.CrossEntropyLoss(), every=1,
            direction=lambda p: {k: torch.ones_like(v) for k, v in p.items() if k != "0.weight"},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"returned \(2,\) for '0.weight'.*shape \(6, 5\)"):
        hos.SummaryMonitor(
            net, nn.CrossEntropyLoss(), every=1,
            direction=lambda p: {k: torch.ones(2, dtype=DT) for k in names},
        )  # fmt: skip
    ones = hos.SummaryMonitor(
        net, nn.CrossEntropyLoss(), every=1,
        direction=lambda p: {k: torch.ones_like(v) for k, v in p.items()},
    )  # fmt: skip
    x, y = batch()
    snap = ones.record(0, x, y)
    loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    u = {k: torch.ones_like(v) for k, v in theta.items()}
    exact = reference.summary_tensor(loss, theta, u, hos.Partition.per_layer(net), order=2)
    assert_close(torch.from_numpy(snap.H), exact, "oracle")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "every must be an int >= 1, got 0"),
        ({"every": 2.5}, "every must be an int >= 1, got 2.5"),
        ({"every": 1, "direction": "adam"}, "direction must be one of"),
        ({"every": 1, "direction": "momentum"}, "pass optimizer=opt"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hos.SummaryMonitor(make_net(), nn.CrossEntropyLoss(), **kwargs)


def test_momentum_of_another_optimizer_is_refused():
    net, other = make_net(), make_net()
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="does not hold parameters"):
        hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, direction="momentum", optimizer=opt)


def test_unwritable_log_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        hos.SummaryMonitor(make_net(), nn.CrossEntropyLoss(), every=1, log_dir=blocker / "run")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        hos.SummaryMonitor(make_net(), nn.CrossEntropyLoss(), every=1, log_dir=blocker)
    assert blocker.read_text() == "not a folder"


def test_a_newer_log_format_is_refused_and_left_untouched(tmp_path):
    net = make_net()
    hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path).record(0, *batch())
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["format"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(hos.LogFormatError, match="format 99, newer than this hos reads"):
        hos.load_log(tmp_path)
    with pytest.raises(hos.LogFormatError, match="format 99"):
        hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path)
    after = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert before == after


def test_a_log_of_other_groups_is_not_appended_to(tmp_path):
    net = make_net()
    hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path).record(0, *batch())
    with pytest.raises(hos.LogFormatError, match="already holds a log of other groups"):
        hos.SummaryMonitor(
            net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path,
            partition=hos.Partition.per_tensor(net),
        )  # fmt: skip
    # the same groups: the log is continued, nothing lost
    again = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path)
    again.record(5, *batch())
    assert hos.load_log(tmp_path).steps.tolist() == [0, 5]


def test_a_crash_mid_run_leaves_a_readable_log(tmp_path):
    net = make_net()
    mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path)
    x, y = batch()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        for step in range(10):
            mon.step(step, x, y)
            if step == 2:
                raise Boom
    # what a crash during the next write leaves: a partial snapshot file, a torn index line
    (tmp_path / "snapshots" / "step-0000000003.tmp").write_bytes(b"PK\x03\x04partial")
    with open(tmp_path / "index.jsonl", "a") as f:
        f.write('{"step": 3, "file": "snapsh')
    with pytest.warns(UserWarning, match="last line is incomplete"):
        run = hos.load_log(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    assert np.isfinite(run.H).all()


KILLED_WRITER = """
import sys, torch, torch.nn as nn, hos
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=sys.argv[1])
step = 0
while True:  # until killed
    mon.step(step, x, y)
    step += 1
"""


def test_a_process_killed_mid_run_leaves_a_readable_log(tmp_path):
    """SIGKILL at a random point of the writing loop (no exception handler, no flush)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    log_dir = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, str(script), str(log_dir)])
    try:
        deadline = time.monotonic() + 120
        index = log_dir / "index.jsonl"
        while time.monotonic() < deadline:
            if index.exists() and index.read_text().count("\n") >= 5:
                break
            assert proc.poll() is None, "the writer died on its own"
            time.sleep(0.05)
        else:
            raise AssertionError("the writer wrote fewer than 5 snapshots in 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is allowed (and warned about)
        run = hos.load_log(log_dir)
    assert len(run.steps) >= 5
    assert run.steps.tolist() == list(range(len(run.steps)))
    assert np.isfinite(run.H).all() and run.H.shape[1:] == (2, 2)


def test_load_log_of_a_folder_without_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no hos log at"):
        hos.load_log(tmp_path)


def test_the_monitor_reads_a_model_whose_output_is_the_loss():
    class SelfLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1).to(DT)

        def forward(self, x, labels):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    net = SelfLoss()
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(6, 3, generator=g, dtype=DT), "labels": torch.randn(6, dtype=DT)}
    mon = hos.SummaryMonitor(net, None, every=1, output="loss")
    snap = mon.record(0, inputs)
    loss = hos.model_loss(net, lambda out, _: out, inputs, None, output="loss")
    theta = {k: v.detach() for k, v in net.named_parameters()}
    p = {k: v.clone().requires_grad_() for k, v in theta.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    exact = reference.summary_tensor(loss, theta, u, hos.Partition.per_layer(net), order=2)
    assert_close(torch.from_numpy(snap.H), exact, "oracle")


def test_no_warning_on_a_plain_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = make_net()
        train(net, 3, hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1))


class _Scaled(torch.autograd.Function):
    """A custom autograd.Function: Taylor mode hands it to reverse mode (a recorded fallback)."""

    @staticmethod
    def forward(ctx, x):
        return 2.0 * x

    @staticmethod
    def backward(ctx, grad):
        return 2.0 * grad


class _CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(_Scaled.apply(self.fc1(x))))


def test_every_call_s_outcome_travels_with_its_result_and_into_the_log(tmp_path):
    torch.manual_seed(0)
    net = _CustomNet().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in net.named_parameters()}
    s = hos.summarize(loss, params, params, hos.Partition.per_layer(net))
    assert s.fallback is not None and "custom autograd.Function" in s.fallback.reasons[0]
    hos.summary_diagonal(loss, params, params, hos.Partition.per_layer(net), 4)
    assert s.fallback is not None  # the record stays with the result after the next call
    linear = nn.Linear(4, 3).double()
    theta = {k: p.detach() for k, p in linear.named_parameters()}
    plain = hos.summarize(hos.model_loss(linear, nn.CrossEntropyLoss(), x, y), theta, theta,
                          hos.Partition.per_layer(linear))  # fmt: skip
    assert plain.fallback is None
    monitor = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, log_dir=tmp_path / "log",
                                 diag_d4=True)  # fmt: skip
    monitor.record(0, x, y)
    line = json.loads((tmp_path / "log" / "index.jsonl").read_text().splitlines()[0])
    assert set(line["fallback"]) == {"summarize", "diag4"}, line  # not only the last call's
