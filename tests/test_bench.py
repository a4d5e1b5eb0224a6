"""``bnbench bench``: ratios from torch.utils.benchmark Measurements, the CPU memory measure against
closed forms, the variant set-ups, bad arguments, and tiny end-to-end runs."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from torch import nn
from torch.utils import benchmark

from bnbench import bench


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=no_constant)


# -- timing ---------------------------------------------------------------------------------------
class StubTimer:
    """A Timer whose blocked_autorange returns fixed block times per sub_label (and records the
    order of the calls); the statement itself runs once per call."""

    raw = {bench.BASELINE: [0.010, 0.012, 0.030], "v": [0.015, 0.018, 0.020]}
    calls: list[str] = []

    def __init__(self, stmt, globals, label, sub_label, description, num_threads):
        assert stmt == "run()" and num_threads == 3
        self.run, self.sub_label = globals["run"], sub_label
        self.spec = benchmark.TaskSpec(stmt=stmt, setup="pass", label=label, sub_label=sub_label,
                                       description=description, num_threads=num_threads)

    def blocked_autorange(self, min_run_time):
        assert min_run_time == 0.5
        self.run()
        StubTimer.calls.append(self.sub_label)
        return benchmark.Measurement(number_per_run=10, raw_times=list(self.raw[self.sub_label]),
                                     task_spec=self.spec)


def test_ratio_is_the_ratio_of_the_merged_medians():
    StubTimer.calls = []
    runs = {"base": 0, "var": 0}
    base, var = bench.time_pair(lambda: runs.__setitem__("base", runs["base"] + 1),
                                lambda: runs.__setitem__("var", runs["var"] + 1),
                                label="L", description="D", variant="v", repeats=4,
                                min_time=0.5, threads=3, timer=StubTimer)
    # interleaved A B, B A, A B, B A; each side's four Measurements merged
    assert StubTimer.calls == [bench.BASELINE, "v", "v", bench.BASELINE] * 2
    assert runs == {"base": 4, "var": 4}
    assert (base.task_spec.sub_label, var.task_spec.sub_label) == (bench.BASELINE, "v")
    result = bench.ratio(base, var)
    # per-iteration times (block / 10): base 1.0, 1.2, 3.0 ms ×4, variant 1.5, 1.8, 2.0 ms ×4
    assert result["base_ms"] == pytest.approx(1.2) and result["var_ms"] == pytest.approx(1.8)
    assert result["ratio"] == pytest.approx(1.8 / 1.2)
    assert result["base_iqr_ms"] == pytest.approx(3.0 - 1.0)
    assert result["var_iqr_ms"] == pytest.approx(2.0 - 1.5)
    assert result["runs"] == [12, 12]
    assert result["noisy"]  # the baseline's IQR is larger than its median: torch warns


def test_real_timer_sees_a_twice_as_long_statement():
    """Not a precise timing assertion (the machine may be busy): sleeps of 2 and 4 ms."""
    base, var = bench.time_pair(lambda: time.sleep(0.002), lambda: time.sleep(0.004),
                                label="sleep", description="", variant="x2", repeats=2,
                                min_time=0.05, threads=1)
    assert 1.3 < bench.ratio(base, var)["ratio"] < 3


# -- memory ---------------------------------------------------------------------------------------
def _lone(layer: nn.Module, x: torch.Tensor) -> bench.Case:
    grad = torch.randn_like(x)

    def prepare():
        x.grad = None

    return bench.Case(prepare, lambda: layer(x), lambda y: y.backward(grad),
                      [*layer.parameters(), *layer.buffers()])


def test_cpu_memory_of_batchnorm_is_the_closed_form():
    n, c, h, w = 8, 3, 5, 7
    x = torch.randn(n, c, h, w, requires_grad=True)
    layer = nn.BatchNorm2d(c).train()
    # autograd keeps the input and the per-channel batch mean and inverse std (the weight and
    # running statistics it also keeps are the layer's own state, excluded); plus the output
    expected = 4 * (n * c * h * w) + 4 * (n * c * h * w) + 2 * 4 * c
    assert bench.saved_bytes(_lone(layer, x)) == expected
    assert x.grad is not None  # the backward ran


def test_cpu_memory_counts_a_shared_storage_once():
    x = torch.randn(4, 6, requires_grad=True)
    assert bench.saved_bytes(_lone(torch.nn.Identity(), x)) == 4 * 24  # the output is x itself
    case = bench.Case(lambda: None, lambda: x.exp(), lambda y: y.sum().backward())
    assert bench.saved_bytes(case) == 4 * 24  # exp saves its result, which is the output
    case = bench.Case(lambda: None, lambda: x[:2] * x[2:], lambda y: y.sum().backward())
    assert bench.saved_bytes(case) == 4 * 24 + 4 * 12  # x once (both halves) + the output


# -- variants -------------------------------------------------------------------------------------
def test_default_variants_are_all_accepted_by_the_registry():
    variants = bench.parse_variants(None)
    assert [v.spec for v in variants] == list(bench.DEFAULT_VARIANTS)
    assert not any("kernel" in v.options for v in variants)


def test_cbn_lone_layer_sees_its_conv_input_without_the_conv_running():
    """The timed statement replays the conv's forward hooks: CBN gets its conv's input, the
    window fills, and the conv itself never runs."""
    (variant,) = bench.parse_variants("cbn:window=3")
    base, var, module = bench.layer_cases(variant, (4, 3, 5, 5), torch.device("cpu"), 0)
    conv_calls = []
    module[0].register_forward_pre_hook(lambda *a: conv_calls.append(1))
    for _ in range(4):
        base.iteration()
        var.iteration()
    assert conv_calls == []
    assert bench.state_note(module) == "window full in 1/1 layers"


def test_brn_is_measured_past_its_schedules():
    (variant,) = bench.parse_variants("brn")
    _, var, module = bench.layer_cases(variant, (4, 3, 5, 5), torch.device("cpu"), 0)
    var.iteration()
    assert bench.state_note(module) == "r_max,d_max=3,5"


def test_cbn_with_nbs_steps_simulated_devices():
    """``cbn:nbs=4`` on the quick step (batch 16): every CBN layer keeps 4 devices' windows, the
    loss stays finite."""
    from bnbench.norm.cbn import CrossIterationBatchNorm2d

    args = bench._resolve(bench.build_parser().parse_args(["--quick"]))
    (variant,) = bench.parse_variants("cbn:nbs=4:window=2")
    base, var, module, finite = bench.model_cases(variant, args, torch.device("cpu"), 0)
    for _ in range(2):
        base.iteration()
        var.iteration()
    layers = [m for m in module.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert layers and all(m.history_devices() == 4 for m in layers)
    assert bench.state_note(module) == f"window full in {len(layers)}/{len(layers)} layers"
    assert finite()


def test_nbs_rows_are_compared_with_their_one_device_row():
    def row(label, name, options, ratio=None):
        step = None if ratio is None else {"ratio": ratio}
        return {"variant": label, "name": name, "options": options, "step": step, "notes": []}

    rows = {r["variant"]: r for r in [
        row("cbn(window=4)", "cbn", {"window": 4, "burnin": 0}, 2.0),
        row("cbn(window=4,nbs=8)", "cbn", {"window": 4, "burnin": 0, "nbs": 8}, 2.5),
        row("ghost(nbs=8)", "ghost", {"nbs": 8}, 1.1),  # not per device
        row("naive_cbn(window=4,nbs=8)", "naive_cbn", {"window": 4, "burnin": 0, "nbs": 8}, 1.5),
        row("brn", "brn", {}), row("brn(nbs=8)", "brn", {"nbs": 8}, 1.2),  # brn: no step
        row("cbn_floor", "cbn_floor", {}, 1.2), row("cbn_floor(nbs=8)", "cbn_floor", {"nbs": 8},
                                                    1.5),
    ]}
    bench.compare_devices(rows, 64)
    cbn = rows["cbn(window=4,nbs=8)"]
    assert cbn["step"]["vs_one_device"] == pytest.approx(1.25)
    assert cbn["notes"] == ["step 1.25× cbn(window=4) (8 devices of 8 vs one of 64)"]
    assert rows["cbn_floor(nbs=8)"]["step"]["vs_one_device"] == pytest.approx(1.25)
    for label in ("cbn(window=4)", "ghost(nbs=8)", "naive_cbn(window=4,nbs=8)", "brn(nbs=8)"):
        assert "vs_one_device" not in (rows[label]["step"] or {}) and not rows[label]["notes"]


@pytest.mark.parametrize("kind,per_conv", [("cbn_floor", 1), ("cbn_official_jac", 2)])
def test_cbn_cost_references_do_the_jacobian_work_and_change_nothing(kind, per_conv):
    """The reference rows add the Jacobian passes (counted: weight-gradient convolutions in the
    forward) and leave the BN model's outputs and gradients as they were."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountConvBackward(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                CountConvBackward.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    ref = bench.convert_variant(copy.deepcopy(plain), bench.parse_variants(kind)[0])
    x = torch.randn(2, 3, 5, 5)
    with CountConvBackward():
        y = ref(x)
    assert CountConvBackward.calls == per_conv * 2  # two convs
    y.square().sum().backward()
    y0 = plain(x)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    for p, p0 in zip(ref.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p0.grad, rtol=0, atol=0)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, padding=1, bias=False),
                                  nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                                  nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect")])
def test_cbn_floor_per_device_is_each_devices_weight_gradient(conv):
    """``cbn_floor:nbs=2``'s one grouped convolution equals, device by device, the autograd
    weight gradient of ``½ Σ y²`` (∂y = y) over that device's samples alone."""
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    conv = conv.double()
    y = conv(x).detach()
    got = bench.floor_jacobian(conv, x, y, nbs=2)
    want = []
    for part in x.split(2):
        conv.zero_grad()
        out = conv(part)
        out.backward(out.detach())  # ∂(½ Σ y²)/∂W = Σ_p y(p)·patch(p)
        want.append(conv.weight.grad.reshape(conv.out_channels, -1).clone())
    torch.testing.assert_close(got.reshape(3 * conv.out_channels, -1), torch.cat(want))
    torch.testing.assert_close(bench.floor_jacobian(conv, x, y),
                               bench.floor_jacobian(conv, x, y, nbs=6))  # one device


# -- command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--layer-shape", "1,2"], "expected N,C,H,W"),
    (["--repeats", "0"], "--repeats=0: must be a positive integer"),
    (["--repeats", "two"], "invalid int value: 'two'"),
    (["--min-time", "nan"], "--min-time=nan: must be a positive number"),
    (["--precise-batch", "-4"], "--precise-batch=-4: must be a positive integer"),
    (["--warmup", "-1"], "--warmup=-1: must be a non-negative integer"),
    (["--device", "tpu"], "invalid choice"),
    (["--variants", "bn,nope"], "unknown variant 'nope'"),
    (["--variants", "ghost:nbz=2"], "nbz"),
    (["--variants", "ghost:kernel=eager"], "kernel"),
    (["--variants", "ghost:nbs"], "options are key=value"),
    (["--variants", "ghost,ghost:nbs=4"], "ghost(nbs=4) is listed more than once"),
    (["--variants", "cbn_floor:window=2"], "cbn_floor takes only nbs=N"),
    (["--variants", "cbn_floor:nbs=0"], "nbs must be a positive integer"),
    (["--variants", "cbn_official_jac:nbs=2"], "cbn_official_jac takes no options"),
    (["--model-arch", "vgg"], "--model-arch vgg: choose one of"),
    (["--no-layer", "--no-model", "--no-first-step", "--no-precise"], "nothing to measure"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, needle, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bnbench: error: ") and needle in err[0], err[0]
    assert captured.out == ""


def test_cuda_request_without_cuda_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is available" in err[0], err


def test_help_exits_0(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--layer-shape" in out and "--json" in out and "kernel" not in out


# -- end to end -----------------------------------------------------------------------------------
def test_quick_run_writes_the_ratios_and_valid_json(tmp_path, capsys):
    path = tmp_path / "sub" / "b.json"
    argv = ["--quick", "--no-first-step", "--variants", "bn,ghost,frozen,cbn_floor",
            "--json", str(path)]
    assert bench.main(argv) == 0
    md = capsys.readouterr().out
    data = _strict_json(path.read_text())

    command = "bnbench bench " + " ".join(argv)
    assert md.splitlines()[0] == f"$ {command}" and data["command"] == command
    env = data["environment"]
    assert env["collect_env"]["torch_version"] == torch.__version__
    assert env["machine"] in md and "## Environment (torch.utils.collect_env)" in md
    assert "## Medians (torch.utils.benchmark.Compare)" in md

    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == ["bn", "ghost", "frozen", "cbn_floor"]
    for name in ("bn", "ghost", "frozen"):
        (layer,) = rows[name]["layers"]
        for result in (layer, rows[name]["step"]):
            assert "error" not in result, (name, result)
            assert result["ratio"] == pytest.approx(result["var_ms"] / result["base_ms"])
            assert result["ratio"] > 0 and result["mem_ratio"] > 0
        assert rows[name]["step"]["finite_loss"]
        assert rows[name]["first_step"] is None
    # bnbench's BN against torch's: the measurement ran and is sane (not a timing assertion)
    assert 0.2 < rows["bn"]["step"]["ratio"] < 5
    assert rows["bn"]["step"]["mem_ratio"] == pytest.approx(1.0)
    ref = rows["cbn_floor"]
    assert ref["layers"] == [] and math.isfinite(ref["step"]["ratio"])
    assert data["precise"]["samples"] == 64 and data["precise"]["ratio"] > 0

    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header, ref_line = lines[0], next(ln for ln in lines if ln.startswith("| cbn_floor"))
    assert header == "| variant | layer 16×16×8×8 | step | layer mem | step mem | notes |"
    assert header.count("|") == ref_line.count("|")  # the layer cells are there, empty
    assert ref_line.startswith("| cbn_floor | – |")


def test_first_step_child_prints_its_times(capsys):
    spec = {"name": "ghost", "options": {"nbs": 2}, "arch": "resnet18", "width": 0.125,
            "small_input": True, "num_classes": 3, "batch": 4, "image_size": 8, "seed": 0,
            "threads": 1, "device": "cpu"}
    t0 = time.perf_counter()
    bench.first_step(json.dumps(spec), t0)
    got = json.loads(capsys.readouterr().out)
    assert 0 < got["first_step_s"] < got["process_s"] and math.isfinite(got["loss"])


def test_first_step_runs_in_fresh_processes(tmp_path, capsys):
    prefix = tmp_path / "f"
    argv = ["--quick", "--no-layer", "--no-model", "--no-precise", "--variants", "ln",
            "--out", str(prefix)]
    assert bench.main(argv) == 0
    data = _strict_json((tmp_path / "f.json").read_text())
    assert (tmp_path / "f.md").read_text() + "\n" == capsys.readouterr().out
    (row,) = data["rows"]
    first = row["first_step"]
    assert set(first) == {"first_step", "process"}
    for result in first.values():
        assert result["runs"] == [1, 1] and result["ratio"] > 0
        assert result["ratio"] == pytest.approx(result["var_ms"] / result["base_ms"])
    assert first["process"]["base_ms"] > first["first_step"]["base_ms"]
    assert data["precise"] is None and row["step"] is None
