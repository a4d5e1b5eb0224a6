"""``bnbench bench``: a smoke run, the CPU memory measure against closed forms, bad arguments."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from bnbench import bench


def test_quick_run_writes_table_and_raw_numbers(tmp_path, capsys):
    prefix = tmp_path / "b"
    argv = ["--quick", "--variants", "bn,ghost,frozen", "--out", str(prefix)]
    assert bench.main(argv) == 0
    stdout = capsys.readouterr().out
    md = (tmp_path / "b.md").read_text()
    data = json.loads((tmp_path / "b.json").read_text())

    command = "bnbench bench --quick --variants bn,ghost,frozen --out " + str(prefix)
    assert md.splitlines()[0] == f"$ {command}"  # the .md begins with the command
    assert data["command"] == command
    assert data["environment"]["torch"] == torch.__version__
    assert "| variant |" in stdout and "| variant |" in md
    assert "memory (cpu): bytes autograd saves" in md

    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == ["bn", "ghost", "frozen"]
    for name, row in rows.items():
        (layer,) = row["layers"]
        assert "error" not in layer, (name, layer)
        assert math.isfinite(layer["ratio"]) and layer["ratio"] > 0, name
        assert layer["ratio_q1"] <= layer["ratio"] <= layer["ratio_q3"]
        assert layer["mem_ratio"] > 0
        assert row["variant"] in md
    # bn (bnbench's BatchNorm2d) against torch.nn.BatchNorm2d: the measurement ran and is sane
    # (not a timing assertion: the machine may be busy)
    for result in (rows["bn"]["layers"][0], rows["bn"]["step"]):
        assert 0.2 < result["ratio"] < 5, result
        assert result["mem_ratio"] == pytest.approx(1.0)
    assert rows["bn"]["step"]["finite_loss"]
    assert rows["ghost"]["target"] == "layer ≤ 1.2×"
    assert rows["ghost"]["meets"] in ("yes", "no", "~yes", "~no")


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
    # exp saves its result, which is the output: one storage; views of the input: one storage
    assert bench.saved_bytes(_lone(torch.nn.Identity(), x)) == 4 * 24  # the output is x itself
    case = bench.Case(lambda: None, lambda: x.exp(), lambda y: y.sum().backward())
    assert bench.saved_bytes(case) == 4 * 24
    case = bench.Case(lambda: None, lambda: x[:2] * x[2:], lambda y: y.sum().backward())
    assert bench.saved_bytes(case) == 4 * 24 + 4 * 12  # x once (both halves) + the output


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--layer-shape", "1,2"], "expected N,C,H,W"),
    (["--repeats", "0"], "must be a positive int"),
    (["--device", "tpu"], "invalid choice"),
    (["--variants", "bn,nope"], "unknown variant 'nope'"),
    (["--variants", "ghost:nbz=2"], "unknown option nbz"),
    (["--variants", "ghost:nbs"], "options are key=value"),
    (["--model-arch", "vgg"], "--model-arch vgg: choose one of"),
    (["--no-layer", "--no-model"], "nothing to measure"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, needle, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bnbench bench: error: ") and needle in err[0], err[0]
    assert captured.out == ""


def test_cuda_request_without_cuda_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert bench.main(["--help"]) == 0
    assert "--layer-shape" in capsys.readouterr().out


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


def test_cbn_cost_references_take_no_options(capsys):
    assert bench.main(["--quick", "--variants", "cbn_floor:window=2"]) == 2
    assert "cbn_floor takes no options" in capsys.readouterr().err


def test_cost_reference_row_is_step_only(tmp_path):
    prefix = tmp_path / "r"
    assert bench.main(["--quick", "--variants", "bn,cbn_floor", "--out", str(prefix)]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    row = data["rows"][1]
    assert row["name"] == "cbn_floor" and row["layers"] == []
    assert math.isfinite(row["step"]["ratio"]) and row["step"]["finite_loss"]
    lines = [ln for ln in (tmp_path / "r.md").read_text().splitlines() if ln.startswith("|")]
    header, ref_row = lines[0], next(ln for ln in lines if ln.startswith("| cbn_floor"))
    assert header.count("|") == ref_row.count("|")  # the layer cells are there, empty
    assert "| – | – |" in ref_row
