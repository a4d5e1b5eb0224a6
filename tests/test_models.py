"""The ResNets: torchvision's networks (state-dict keys, outputs given the same weights), built
without importing torchvision or ``torch._dynamo`` (config validation builds them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from bnbench import norm as norms
from bnbench.models.resnet import resnet

ARCHS = ["resnet18", "resnet34", "resnet50"]
NORM_OPTIONS = {"bn": {}, "gn": {"groups": 2}, "brn": {}, "cbn": {"window": 2}}


def _torchvision(arch: str, **kwargs) -> nn.Module:
    from torchvision import models

    return getattr(models, arch)(**kwargs)


def _zeroed_weights(model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if k.endswith(".weight") and not v.any()}


@pytest.mark.parametrize("norm", list(NORM_OPTIONS))
@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_torchvisions(arch, norm):
    """Same keys in the same order, same shapes, same module names, with the same norm layers
    swapped into both (CBN's pairing relies on the names)."""
    torch.manual_seed(0)
    ours, theirs = resnet(arch, 1000), _torchvision(arch)
    for model in (ours, theirs):
        norms.convert(model, norm, **NORM_OPTIONS[norm])
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_width_and_small_input_keep_the_keys():
    ours = resnet("resnet18", 10, width=0.25, small_input=True)
    theirs = _torchvision("resnet18", num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.conv1.kernel_size == (3, 3) and ours.conv1.stride == (1, 1)
    assert ours.layer4[1].conv2.out_channels == 128 and ours.fc.in_features == 128


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_outputs_are_torchvisions_given_its_weights(arch):
    """torchvision's state dict loads (strict) and gives the same outputs, gradients and updated
    statistics, in training and in eval mode (non-trivial affine and population statistics)."""
    torch.manual_seed(0)
    theirs = _torchvision(arch, num_classes=10)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    ours = resnet(arch, 10)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        outputs, grads = [], []
        for model in (ours, theirs):
            model.train(training).zero_grad()
            y = model(x)
            y.square().sum().backward()
            outputs.append(y)
            grads.append([p.grad for p in model.parameters()])
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_what_torchvision_does(arch):
    zeroed = _zeroed_weights(resnet(arch, 10, zero_init_residual=True))
    assert zeroed == _zeroed_weights(_torchvision(arch, num_classes=10, zero_init_residual=True))
    assert zeroed and not _zeroed_weights(resnet(arch, 10))


def _probe(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_building_and_training_import_neither_dynamo_nor_torchvision():
    """What config validation does (the model on the meta device, every norm's own checks), and
    an eager training step of BRN/CBN (their steps are ``torch.compiler.disable``d lazily)."""
    code = """if True:
        import sys, torch
        from bnbench import norm as norms
        from bnbench.models.resnet import resnet
        for name in norms.NORMS:
            if norms.spec(name).prepare is None:
                with torch.device("meta"):
                    norms.convert(resnet("resnet50", 10, width=0.25), name)
        for name in ("brn", "cbn"):
            model = norms.convert(resnet("resnet18", 10, width=0.125, small_input=True), name)
            model(torch.randn(4, 3, 8, 8)).sum().backward()
        print(*(m in sys.modules for m in ("torch._dynamo", "torchvision")))
    """
    assert _probe(code) == ["False", "False"]


def test_compiled_model_runs_the_steps_eagerly_when_dynamo_came_late():
    """``torch.compile`` of models whose BRN/CBN layers were built before ``torch._dynamo`` was
    imported, compiled on their first call: the layers' training steps still run outside the
    graph (the lazily applied ``torch.compiler.disable``; inside a trace ``is_compiling()`` is
    true)."""
    code = """if True:
        import sys, torch
        import bnbench.norm.brn as brn, bnbench.norm.cbn as cbn
        from bnbench import norm as norms
        from torch import nn
        compiling = []
        for module in (brn, cbn):
            def spy(*args, _moments=module.batch_moments):
                compiling.append(torch.compiler.is_compiling())
                return _moments(*args)
            module.batch_moments = spy
        def small():  # two conv–BN pairs: enough graph for the check, little to trace
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        models = [norms.convert(small(), name, **options)
                  for name, options in (("brn", {}), ("cbn", {"window": 2}))]
        assert "torch._dynamo" not in sys.modules
        for model in models:
            compiling.clear()
            compiled = torch.compile(model, backend="eager")
            for _ in range(2):
                compiled(torch.randn(4, 3, 8, 8)).sum().backward()
            print(len(compiling), any(compiling))
    """
    assert _probe(code) == ["4", "False"] * 2  # 2 layers, 2 steps; BRN then CBN
