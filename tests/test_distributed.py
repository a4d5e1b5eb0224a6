"""Multi-process behaviour with 2 gloo processes on CPU.

Layer level (spawned workers, :mod:`dist_helpers`): SyncBN ≡ BN of the concatenated batch,
PreciseBN over ranks ≡ one process, ShuffleBN ≡ a manual shuffle → per-group BN → un-shuffle,
per-process BRN/CBN/naive CBN ≡ one process whose ``nbs`` simulates the processes.
Run level (the real CLI under torchrun / ``dist.nproc``): 2 ranks × b ≡ 1 process × 2b, one run
dir, kill + resume, a failing rank ends the run. SLURM: the environment mapping.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import (
    C,
    batch,
    bn_layer,
    precise_data,
    precise_worker,
    run_jobs,
    shuffle_worker,
    small_net,
    syncbn_worker,
)

from bnbench import distributed as D
from bnbench.errors import BnbenchError

TOL = {"rtol": 1e-10, "atol": 1e-10}
CHUNKS = [[0, 2, 4], [1, 3, 5]]  # PreciseBN: each rank half of the batches, interleaved
PRECISE = {
    "population": {},
    "batch_mean": {"estimator": "batch_mean"},
    "layerwise": {"layerwise": True},
}
SYNC_SIZES = {"equal": [4, 4], "unequal": [3, 6], "empty": [5, 0]}

#: Every layer-level job, run by one pair of workers (starting processes is the cost).
JOBS = [
    *[(f"syncbn-{k}", syncbn_worker, (v, 0)) for k, v in SYNC_SIZES.items() if k != "empty"],
    ("syncbn-group1", syncbn_worker, ([4, 6], 1)),
    *[(f"precise-{k}", precise_worker, (CHUNKS, v)) for k, v in PRECISE.items()],
    ("shuffle-equal", shuffle_worker, ([4, 4], False)),
    ("shuffle-unequal", shuffle_worker, ([3, 5], False)),
    ("shuffle-ddp", shuffle_worker, ([4, 4], True)),
    ("syncbn-empty", syncbn_worker, (SYNC_SIZES["empty"], 0)),
]


@pytest.fixture(scope="module")
def layer_runs():
    return run_jobs(JOBS)


def results(runs: dict, name: str) -> list:
    out = runs[name]
    if isinstance(out, Exception):
        raise out
    return out


# -- SyncBN ---------------------------------------------------------------------------------


def _reference_bn(sizes: list[int], steps: int = 2) -> dict:
    """Plain BN over the concatenated batch of all ranks (our layer and F.batch_norm)."""
    parts = [batch(r, sizes) for r in range(len(sizes))]
    x = torch.cat([p[0] for p in parts])
    w = torch.cat([p[1] for p in parts])
    layer = bn_layer()
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for _ in range(steps):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        (y * w).sum().backward()
        F.batch_norm(x, mean, var, None, None, True, 0.1, 1e-5)  # the EMA of PyTorch's BN
    torch.testing.assert_close(layer.running_mean, mean, **TOL)
    torch.testing.assert_close(layer.running_var, var, **TOL)
    return {"y": y.detach(), "dx": xr.grad, "layer": layer}


@pytest.mark.parametrize("case", list(SYNC_SIZES))
def test_syncbn_equals_bn_of_the_concatenated_batch(case, layer_runs):
    outs = results(layer_runs, f"syncbn-{case}")
    sizes = SYNC_SIZES[case]
    ref = _reference_bn(sizes)
    start = 0
    for r, out in enumerate(outs):
        n = sizes[r]
        assert out["group_world"] == 2
        torch.testing.assert_close(out["y"], ref["y"][start : start + n], **TOL)
        torch.testing.assert_close(out["dx"], ref["dx"][start : start + n], **TOL)
        # every rank: the EMA of the global batch statistics (an empty rank too)
        torch.testing.assert_close(out["running_mean"], ref["layer"].running_mean, **TOL)
        torch.testing.assert_close(out["running_var"], ref["layer"].running_var, **TOL)
        assert out["tracked"] == 2
        if n:  # inference with batch statistics: the rank's own groups, never other ranks'
            own = bn_layer(eval_stats="batch", eval_nbs=2).eval()
            with torch.no_grad():
                torch.testing.assert_close(out["y_eval"], own(batch(r, sizes)[0]), **TOL)
        start += n
    # affine gradients: per-rank contributions sum to the global gradient (DDP would average)
    for key in ("dweight", "dbias"):
        total = sum(out[key] for out in outs)
        torch.testing.assert_close(total, getattr(ref["layer"], key[1:]).grad, **TOL)


def test_syncbn_group_size_one_is_per_rank_bn(layer_runs):
    sizes = [4, 6]
    outs = results(layer_runs, "syncbn-group1")
    for r, out in enumerate(outs):
        assert out["group_world"] == 1
        x, w = batch(r, sizes)
        layer = bn_layer()
        for _ in range(2):
            layer.zero_grad()
            xr = x.clone().requires_grad_(True)
            y = layer(xr)
            (y * w).sum().backward()
        torch.testing.assert_close(out["y"], y.detach(), **TOL)
        torch.testing.assert_close(out["dx"], xr.grad, **TOL)
        torch.testing.assert_close(out["dweight"], layer.weight.grad, **TOL)
        torch.testing.assert_close(out["running_var"], layer.running_var, **TOL)


def test_sync_group_single_process_and_bad_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.sync_process_group(0) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BnbenchError, match="no process group"):
        D.sync_process_group(0)


# -- PreciseBN ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(PRECISE))
def test_precise_bn_over_ranks_equals_one_process(case, layer_runs):
    from bnbench.population import update_population_stats

    outs, kwargs = results(layer_runs, f"precise-{case}"), PRECISE[case]
    model = small_net()
    data = precise_data()
    update_population_stats(model, lambda: iter(data), **kwargs)
    ref = {k: v for k, v in model.state_dict().items() if "running" in k}
    for out in outs:
        assert out.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], **TOL)


# -- ShuffleBN ------------------------------------------------------------------------------


def _reference_shuffle(sizes: list[int], perm: torch.Tensor) -> dict:
    """Gather, permute, per-rank BN on each slice (its own module copy), un-permute."""
    x = torch.cat([batch(r, sizes, seed=3)[0] for r in range(len(sizes))]).requires_grad_(True)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64)
    nets = [small_net() for _ in sizes]
    shuffled = x[perm]
    outs, start = [], 0
    for net, n in zip(nets, sizes):
        outs.append(net(shuffled[start : start + n]))
        start += n
    y = torch.empty_like(torch.cat(outs))
    y[perm] = torch.cat(outs)
    (y * w).sum().backward()
    return {"x": x, "y": y.detach(), "nets": nets}


@pytest.mark.parametrize("sizes", [[4, 4], [3, 5]], ids=["equal", "unequal"])
def test_shuffle_bn_matches_manual_reference(sizes, layer_runs):
    outs = results(layer_runs, "shuffle-" + ("equal" if sizes[0] == sizes[1] else "unequal"))
    perm = outs[0]["perm"]
    assert torch.equal(outs[1]["perm"], perm)  # one permutation for all ranks
    assert sorted(perm.tolist()) == list(range(sum(sizes)))
    assert not torch.equal(perm, torch.arange(sum(sizes)))
    ref = _reference_shuffle(sizes, perm)
    start = 0
    for r, out in enumerate(outs):
        mine = slice(start, start + sizes[r])
        # outputs of the rank's own samples, in their original order
        torch.testing.assert_close(out["y"], ref["y"][mine], **TOL)
        torch.testing.assert_close(out["dx"], ref["x"].grad[mine], **TOL)
        net = ref["nets"][r]  # rank r normalized slice r of the shuffled batch
        for k, p in net.named_parameters():
            torch.testing.assert_close(out["grads"][k], p.grad, **TOL)
        for k, b in net.state_dict().items():
            if "running" in k:
                torch.testing.assert_close(out["buffers"][k], b, **TOL)
        start += sizes[r]
    # the statistics are those of the shuffled groups, not of each rank's own samples
    own = small_net()
    own(batch(0, sizes, seed=3)[0])
    assert not torch.allclose(own[1].running_mean, outs[0]["buffers"]["1.running_mean"])


def test_shuffle_bn_under_ddp_averages_gradients(layer_runs):
    sizes = [4, 4]
    outs = results(layer_runs, "shuffle-ddp")
    perm = outs[0]["perm"]
    ref = _reference_shuffle(sizes, perm)
    for r, out in enumerate(outs):
        mine = slice(4 * r, 4 * r + 4)
        torch.testing.assert_close(out["y"], ref["y"][mine], **TOL)
        for k, _ in ref["nets"][0].named_parameters():
            mean = sum(dict(n.named_parameters())[k].grad for n in ref["nets"]) / len(sizes)
            torch.testing.assert_close(out["grads"][k], mean, **TOL)
        # eval: no shuffle, the rank's own EMA statistics
        net = copy.deepcopy(ref["nets"][r]).eval()
        with torch.no_grad():
            torch.testing.assert_close(out["eval_y"], net(batch(r, sizes, seed=3)[0]), **TOL)


def test_shuffle_bn_single_process_is_identity():
    from bnbench.shuffle import ShuffleBN

    net = small_net()
    x = batch(0, [6])[0]
    torch.testing.assert_close(ShuffleBN(net)(x), small_net()(x), **TOL)


# -- per-device variants: nbs simulates processes ------------------------------------------
#: ``name → (norm, options, EMA averaged every step)``: BRN's r, d read the EMA, so the
#: processes average it after every step (what ``nbs`` simulates); CBN's EMA does not feed back,
#: and is averaged once at the end, as the trainer does (``dist.ema_sync=average``).
DEVICE_CASES = {
    "cbn": ("cbn", {"window": 3, "burnin": 1, "momentum": 0.3}, False),
    "naive_cbn": ("naive_cbn", {"window": 3, "burnin": 1, "momentum": 0.3, "neg_var": "drop"},
                  False),
    "brn": ("brn", {"rmax": 1.5, "dmax": 0.3, "warmup_iters": 0, "rmax_iters": 0,
                    "dmax_iters": 0, "momentum": 0.3}, True),
}
DEVICE_B, DEVICE_STEPS, DEVICE_LR = 4, 5, 0.05


def _device_net(name: str, options: dict) -> torch.nn.Module:
    """:func:`small_net` (two conv+norm pairs, float64, fixed init), CBN paired with its convs."""
    from bnbench.norm.cbn import pair_convs

    net = small_net(name, **options)
    pair_convs(net)
    return net


def _device_sgd(net: torch.nn.Module, rows: slice, after_backward) -> dict:
    """``DEVICE_STEPS`` SGD steps on ``rows`` of each step's batch of ``2·DEVICE_B`` (loss
    ``Σ y·w``); ``after_backward(net)`` runs before each update. The outputs and input gradients
    of every step, the last gradients, and the final state dict."""
    ys, dxs = [], []
    for step in range(DEVICE_STEPS):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(2 * DEVICE_B, C, 3, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        w = torch.randn(2 * DEVICE_B, 3, generator=gen, dtype=torch.float64)
        x = x[rows].clone().requires_grad_(True)
        net.zero_grad()
        y = net(x)
        (y * w[rows]).sum().backward()
        after_backward(net)
        ys.append(y.detach())
        dxs.append(x.grad)
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(DEVICE_LR * p.grad)
    return {"y": ys, "dx": dxs, "grads": grads,
            "state": {k: v.clone() for k, v in net.state_dict().items()}}


def per_device_worker(rank: int, world: int, case: str) -> dict:
    """One process of ``world``, batch ``DEVICE_B``, per-process ``case``; gradients summed over
    the processes (DDP averages: a scale of the loss), EMA averaged by the trainer's function."""
    import torch.distributed as dist

    from bnbench.evaluate import sync_population_stats

    name, options, every_step = DEVICE_CASES[case]

    def after_backward(net: torch.nn.Module) -> None:
        for p in net.parameters():
            dist.all_reduce(p.grad)
        if every_step:
            sync_population_stats(net, "average")

    net = _device_net(name, options)
    out = _device_sgd(net, slice(rank * DEVICE_B, (rank + 1) * DEVICE_B), after_backward)
    sync_population_stats(net, "average")
    out["state"] = {k: v.clone() for k, v in net.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def device_runs():
    return run_jobs([(case, per_device_worker, (case,)) for case in DEVICE_CASES])


def _device_block(key: str, value: torch.Tensor, rank: int, devices: int) -> torch.Tensor:
    """Device ``rank``'s part of a CBN history buffer (``hist_dvar`` is channel-major)."""
    return value.chunk(devices, 0 if key.endswith(".hist_dvar") else 1)[rank]


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_processes_equal_one_process_with_nbs_devices(case, device_runs):
    """2 gloo processes × b with per-process ``case`` ≡ 1 process with batch 2b and ``nbs=b``,
    over several SGD steps in float64: every step's outputs and input gradients, the summed
    weight gradients, the weights, the averaged EMA, and each process's CBN window (its device's
    block of the history buffers)."""
    outs = results(device_runs, case)
    name, options, _ = DEVICE_CASES[case]
    ref = _device_sgd(_device_net(name, {**options, "nbs": DEVICE_B}), slice(None),
                      lambda net: None)
    histories = 0
    for rank, out in enumerate(outs):
        rows = slice(rank * DEVICE_B, (rank + 1) * DEVICE_B)
        for step in range(DEVICE_STEPS):
            torch.testing.assert_close(out["y"][step], ref["y"][step][rows], **TOL)
            torch.testing.assert_close(out["dx"][step], ref["dx"][step][rows], **TOL)
        for key, grad in ref["grads"].items():
            torch.testing.assert_close(out["grads"][key], grad, **TOL, msg=key)
        assert out["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            buffer = key.rsplit(".", 1)[1]
            if buffer.startswith("hist_") and buffer != "hist_state" and value.numel():
                value = _device_block(key, value, rank, 2)
                histories += 1
            torch.testing.assert_close(out["state"][key], value, **TOL, msg=key)
    # ranks × layers × history buffers (naive CBN keeps no Jacobians)
    assert histories == (0 if name == "brn" else 2 * 2 * (6 if name == "cbn" else 2))
    if name != "brn":
        key = "4.hist_mean"  # the processes' windows differ: each kept its own
        assert not torch.equal(outs[0]["state"][key], outs[1]["state"][key])
        assert int(outs[0]["state"]["4.hist_state"][0]) == 2


# -- SLURM ----------------------------------------------------------------------------------


SLURM_JOB = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_TASKS_PER_NODE": "8(x2)",
}
#: What a task of a torchrun job / SLURM job may find in its environment (cleared by the tests).
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT")


@pytest.fixture
def slurm_task(monkeypatch):
    """``slurm_task(**env)``: this process becomes a SLURM task with exactly ``env`` (plus
    ``SLURM_JOB``'s values unless overridden); everything is restored afterwards."""
    for key in [*LAUNCH_ENV, "SUBMITIT_EXECUTOR"]:
        monkeypatch.setenv(key, "")  # recorded (absent or not), so anything set later is undone
        monkeypatch.delenv(key)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)

    def become(job=SLURM_JOB, **env: str) -> None:
        for key in list(os.environ):
            if key.startswith("SLURM_"):
                monkeypatch.delenv(key)
        for key, value in {**job, **env}.items():
            monkeypatch.setenv(key, value)

    return become


def test_env_from_slurm_maps_a_two_node_job(slurm_task):
    slurm_task(SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NODEID="1")
    env = D.env_from_slurm()
    port = env.pop("MASTER_PORT")
    assert env == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007",  # the job's first node
    }
    assert 20000 <= int(port) <= 60000
    assert "SUBMITIT_EXECUTOR" not in os.environ  # the reading leaves no trace
    # every task of the job agrees on the rendezvous, again after a requeue (same job id)
    for procid, node in (("0", "0"), ("15", "1")):
        slurm_task(SLURM_PROCID=procid, SLURM_LOCALID="0", SLURM_NODEID=node)
        other = D.env_from_slurm()
        assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == ("gpu007", port)
        assert other["RANK"] == procid
    # another job, or another task of a job array, gets another port
    slurm_task(SLURM_PROCID="0", SLURM_JOB_ID="123457")
    assert D.env_from_slurm()["MASTER_PORT"] != port
    array = {**SLURM_JOB, "SLURM_PROCID": "0", "SLURM_ARRAY_JOB_ID": "77"}
    ports = set()
    for task in ("1", "2"):
        slurm_task(array, SLURM_ARRAY_TASK_ID=task)
        ports.add(D.env_from_slurm()["MASTER_PORT"])
    assert len(ports) == 2


def test_env_from_slurm_user_choices_win(slurm_task, monkeypatch):
    slurm_task(SLURM_PROCID="1", SLURM_LOCALID="1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("MASTER_ADDR", "head")
    out = D.env_from_slurm()
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("head", "29999")


@pytest.mark.parametrize(
    "hostlist,first",
    [
        ("node1", "node1"),
        ("gpu[001-003,010]", "gpu001"),
        ("c[09-10],a[1-2],b7", "c09"),
        ("", socket.gethostname()),  # no node list: this host
    ],
)
def test_env_from_slurm_master_is_the_first_node(hostlist, first, slurm_task):
    slurm_task(SLURM_PROCID="0", SLURM_JOB_NODELIST=hostlist)
    assert D.env_from_slurm()["MASTER_ADDR"] == first


def test_env_from_slurm_errors_are_one_line(slurm_task):
    slurm_task({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})  # no SLURM_JOB_ID
    with pytest.raises(BnbenchError, match="SLURM: SLURM_JOB_ID is not set"):
        D.env_from_slurm()
    slurm_task(SLURM_PROCID="0", SLURM_JOB_NODELIST="gpu[001-")
    with pytest.raises(BnbenchError, match="SLURM: cannot read this task's environment"):
        D.env_from_slurm()
    assert "SUBMITIT_EXECUTOR" not in os.environ


def test_slurm_rank_launch_and_join(slurm_task, monkeypatch):
    slurm_task(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="0")
    assert D.launch_rank() == 5
    assert not D.should_launch(2, ["dist.nproc=2"])  # a 16-task step: the processes exist
    slurm_task(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1")
    assert D.launch_rank() == 0
    assert D.should_launch(2, ["dist.nproc=2"])  # one task: bnbench starts its processes
    assert not D.init_from_env("gloo")  # a world of one: no group, but torch's variables set
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == (
        "0", "1", "gpu007")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # inside a submitit job: the same reading
    assert D.env_from_slurm()["RANK"] == "0" and os.environ["SUBMITIT_EXECUTOR"] == "slurm"


def test_slurm_detection_defers_to_torchrun():
    task = {**SLURM_JOB, "SLURM_PROCID": "0"}
    assert D.under_slurm(task)
    assert not D.under_slurm({**task, "TORCHELASTIC_RUN_ID": "x", "RANK": "0"})
    assert not D.under_slurm({})


def test_should_launch_only_outside_a_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert D.should_launch(2, ["dist.nproc=2"])
    assert not D.should_launch(1, [])
    for printing in (["--cfg", "job"], ["--cfg=job"], ["-c", "all"], ["--info"], ["--help"],
                     ["--hydra-help"], ["-sc", "install=bash"]):
        assert not D.should_launch(2, ["dist.nproc=2", *printing]), printing
    with pytest.raises(BnbenchError, match="tasks_per_node"):
        D.should_launch(2, ["+cluster=slurm", "dist.nproc=2"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not D.should_launch(2, ["dist.nproc=2"])  # a torchrun worker: the group exists


def test_worker_overrides_write_nothing():
    assert "hydra.output_subdir=null" in D.worker_overrides(False)
    sweep = [o for o in D.worker_overrides(True) if o.startswith("hydra.sweep.dir=")]
    assert sweep and Path(sweep[0].split("=", 1)[1]).is_dir()  # a scratch dir, removed at exit


def test_slurm_cluster_config_composes():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from bnbench.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        cfg = compose("train", overrides=["+cluster=slurm"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one task per GPU
    assert launcher.max_num_timeout > 0 and cfg.trainer.resume is True
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "now:" not in cfg.hydra.sweep.dir
    assert cfg.dist.nproc == 1


# -- whole runs through the CLI -------------------------------------------------------------


TINY = [
    "dataset.num_train=256",
    "dataset.num_val=64",
    "dataset.resolution=8",
    "model.width=0.125",
    "trainer.threads=1",
    "trainer.float64=true",
    "precise.num_samples=128",
    "precise.batch_size=16",  # = b, so PreciseBN's batches are the same in both layouts
    "eval.batch_size=32",
    "trainer.progress=false",
]
B = 16  # per-process batch of the 2-rank runs; the 1-process runs use 2B
#: ``bnbench`` with rank R failing at training step S: ``FAIL_ENTRY R S train ...``.
FAIL_ENTRY = Path(__file__).with_name("fail_entry.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def bnbench(*args: str, cwd: Path, cache: Path, torchrun: int = 0, env=None, popen=False,
            program=("-m", "bnbench")):
    """``python -m bnbench ...`` or ``torchrun --standalone --nproc-per-node=N -m bnbench ...``
    (``program``: what python/torchrun runs instead of ``-m bnbench``, e.g. a script)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "SUBMITIT_"))
    }
    full_env = {**base, "BNBENCH_CACHE": str(cache), **(env or {})}
    if torchrun:
        torchrun_bin = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun_bin), "--standalone", f"--nproc-per-node={torchrun}", *program]
    else:
        cmd = [sys.executable, *program]
    cwd.mkdir(parents=True, exist_ok=True)
    if popen:
        return subprocess.Popen(
            [*cmd, *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    out = subprocess.run(
        [*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )
    return out


def _ok(out) -> None:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same trajectory (float64: to rounding), same metrics, same final weights and buffers."""
    ea, eb = _events(a), _events(b)
    assert [(e["epoch"], e["split"], e["stats"]) for e in ea] == [
        (e["epoch"], e["split"], e["stats"]) for e in eb
    ]
    for x, y in zip(ea, eb):
        assert x["top1"] == y["top1"], (x, y)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-9 if x["split"] == "train" else 1e-5)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-9, atol=1e-10, msg=k)
    sa, sb = _summary(a), _summary(b)
    assert sa["final_top1"] == sb["final_top1"] and sa["iterations"] == sb["iterations"]
    assert sa["global_batch"] == sb["global_batch"] == 2 * B


@pytest.fixture(scope="module")
def bn_two_ranks(tmp_path_factory, cache) -> tuple[Path, object]:
    """torchrun, 2 ranks × B, per-rank BN, 3 epochs (also the uninterrupted run for resume)."""
    cwd = tmp_path_factory.mktemp("bn2")
    out = bnbench(
        "train",
        *TINY,
        f"trainer.batch_size={B}",
        "trainer.epochs=3",
        "hydra.run.dir=run",
        cwd=cwd,
        cache=cache,
        torchrun=2,
    )
    _ok(out)
    return cwd / "run", out


@pytest.mark.slow
def test_two_ranks_bn_equals_one_process_ghost(bn_two_ranks, tmp_path, cache):
    run, out = bn_two_ranks
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # one run dir, nothing else
    assert "32 (16 × 2 processes)" in out.stdout  # the batch plan: global batch, per process
    s = _summary(run)
    assert (s["world_size"], s["batch_per_process"], s["normalization_batch"]) == (2, B, B)
    ghost = bnbench(
        "train",
        *TINY,
        f"trainer.batch_size={2 * B}",
        "+norm=ghost",
        f"norm.nbs={B}",
        "trainer.epochs=3",
        "hydra.run.dir=ghost",
        cwd=tmp_path,
        cache=cache,
    )
    _ok(ghost)
    assert_same_run(run, tmp_path / "ghost")


@pytest.mark.slow
def test_self_launched_syncbn_equals_one_process_bn(tmp_path, cache):
    args = ["train", *TINY, "trainer.epochs=2"]
    sync = bnbench(
        *args,
        "dist.nproc=2",
        "+norm=syncbn",
        f"trainer.batch_size={B}",
        cwd=tmp_path / "sync",
        cache=cache,
    )
    _ok(sync)
    # ONE run dir, the timestamped one of rank 0; no other output anywhere in the cwd
    assert [p.name for p in (tmp_path / "sync").iterdir()] == ["outputs"]
    runs = [p for p in (tmp_path / "sync" / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / ".hydra").is_dir()
    assert len(list((tmp_path / "sync").rglob("summary.json"))) == 1
    s = _summary(runs[0])
    assert (s["world_size"], s["batch_per_process"], s["normalization_batch"]) == (2, B, 2 * B)
    bn = bnbench(
        *args, f"trainer.batch_size={2 * B}", "hydra.run.dir=bn", cwd=tmp_path, cache=cache
    )
    _ok(bn)
    assert_same_run(runs[0], tmp_path / "bn")


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    workers = [int(c) for c in children.read_text().split()] if children.exists() else []
    for p in [pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p, signal.SIGKILL)


def _kill_after_first_checkpoint(args: list[str], cwd: Path, cache) -> Path:
    """Start a 2-rank run in ``cwd``, SIGKILL its process tree once ``last.pt`` exists."""
    proc = bnbench(*args, cwd=cwd, cache=cache, torchrun=2, popen=True)
    ckpt = cwd / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    return ckpt


@pytest.mark.slow
def test_killed_two_rank_run_resumes_exactly(bn_two_ranks, tmp_path, cache):
    ref, _ = bn_two_ranks
    args = ["train", *TINY, f"trainer.batch_size={B}", "trainer.epochs=3", "hydra.run.dir=run"]
    ckpt = _kill_after_first_checkpoint(args, tmp_path, cache)
    assert ckpt.exists(), "no checkpoint before the kill"
    assert torch.load(ckpt, weights_only=False)["state"]["epoch"] < 3  # killed mid-run
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = bnbench(*args, "trainer.resume=true", cwd=tmp_path, cache=cache, torchrun=2)
    _ok(resumed)
    assert "resumed from" in resumed.stdout
    a, b = _summary(ref), _summary(tmp_path / "run")
    assert a["final_top1"] == b["final_top1"] and a["iterations"] == b["iterations"]
    wa, wb = _weights(ref), _weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("nbs", [B // 2], ids=["nbs"])  # (2 devices per rank)
def test_killed_two_rank_cbn_run_resumes_each_ranks_history(nbs, tmp_path, cache):
    """CBN's window history differs per rank: each rank's checkpoint shard brings back its own
    (resuming every rank from rank 0's history would change rank 1's normalization); with
    ``nbs`` each rank's history holds the windows of its simulated devices."""
    args = ["train", *TINY, f"trainer.batch_size={B}", "trainer.epochs=3", "+norm=cbn",
            "norm.burnin_epochs=0.5", *([f"norm.nbs={nbs}"] if nbs else []),
            "hydra.run.dir=run"]
    ref = tmp_path / "ref"
    ref.mkdir()
    _ok(bnbench(*args, cwd=ref, cache=cache, torchrun=2))
    ckpt = _kill_after_first_checkpoint(args, tmp_path, cache)
    state = torch.load(ckpt, weights_only=False)
    assert state["state"]["epoch"] < 3
    it = state["state"]["iteration"]
    shards = [torch.load(ckpt.with_name(f"last.rank{r}.it{it}.pt"), weights_only=False)
              for r in (0, 1)]
    key = "layer1.0.bn1.hist_mean"
    assert not torch.equal(shards[0]["buffers"][key], shards[1]["buffers"][key])  # per rank
    channels = shards[0]["buffers"]["layer1.0.bn1.running_mean"].numel()
    assert shards[0]["buffers"][key].shape[1] == (B // nbs if nbs else 1) * channels  # devices
    resumed = bnbench(*args, "trainer.resume=true", cwd=tmp_path, cache=cache, torchrun=2)
    _ok(resumed)
    wa, wb = _weights(ref / "run"), _weights(tmp_path / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    final = _summary(tmp_path / "run")["iterations"]
    assert sorted(p.name for p in ckpt.parent.glob("last.rank*.pt")) == [
        f"last.rank{r}.it{final}.pt" for r in (0, 1)]
    for r in (0, 1):  # every rank's final buffers (its history, its EMA): the uninterrupted run's
        name = f"last.rank{r}.it{final}.pt"
        want = torch.load(ref / "run" / "checkpoints" / name, weights_only=False)["buffers"]
        got = torch.load(ckpt.with_name(name), weights_only=False)["buffers"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), r


def test_failing_rank_ends_the_torchrun_job(tmp_path, cache):
    start = time.time()
    out = bnbench(
        "train",
        *TINY,
        f"trainer.batch_size={B}",
        "precise.enabled=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
        cache=cache,
        torchrun=2,
        program=(str(FAIL_ENTRY), "1", "3"),  # rank 1 fails at its training step 3
    )
    assert out.returncode != 0
    assert time.time() - start < 120  # nothing hung
    errors = [line for line in out.stderr.splitlines() if line.startswith("bnbench: error:")]
    assert errors[0] == "bnbench: error: rank 1/2: injected failure at training step 3", errors
    assert not (tmp_path / "run" / "summary.json").exists()  # rank 0 did not finish either
    # every rank exited non-zero (torchrun lists each failed process: error, or its SIGTERM)
    assert set(re.findall(r"rank\s*: (\d+) \(local_rank", out.stderr)) == {"0", "1"}, out.stderr
    # the survivor, if it noticed before torchrun stopped it, says why in one line
    assert all("rank 1 failed or stopped answering" in line for line in errors[1:]), errors
    assert "[rank0]: Traceback" not in out.stderr


def test_nan_loss_in_a_self_launched_run_propagates_the_exit_status(tmp_path, cache):
    out = bnbench(
        "train",
        *TINY,
        f"trainer.batch_size={B}",
        "dist.nproc=2",
        "optim.lr=1e30",
        "optim.warmup_epochs=0",
        "hydra.run.dir=run",
        cwd=tmp_path,
        cache=cache,
    )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("bnbench: error:")]
    assert errors and all("loss became nan" in e or "another process" in e for e in errors)
    assert "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_srun_style_slurm_tasks_with_shuffle_bn(tmp_path, cache):
    """Two SLURM-like tasks (as ``srun -n 2 bnbench train ...`` starts them), ShuffleBN on."""
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODEID": "0",
        "MASTER_PORT": str(_free_port()),
    }
    args = ["train", *TINY, f"trainer.batch_size={B}", "dist.shuffle_bn=true", "trainer.epochs=1"]
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "SUBMITIT_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnbench", *args],
            cwd=tmp_path,
            env={
                **base,
                **job,
                "BNBENCH_CACHE": str(cache),
                "SLURM_PROCID": str(r),
                "SLURM_LOCALID": str(r),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    assert "(16 × 2 processes)" in outs[0][0] and "16 samples (ShuffleBN)" in outs[0][0]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # rank 0's dir only
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1
    s = _summary(runs[0])
    assert s["world_size"] == 2 and set(s["final_top1"]) == {"ema", "precise"}


def test_cluster_and_nproc_exclude_each_other(capsys):
    from bnbench import cli

    assert cli.main(["train", "+cluster=slurm", "dist.nproc=2"]) == 2
    assert "tasks_per_node" in capsys.readouterr().err


def test_slurm_cfg_job_on_the_command_line(tmp_path, cache):
    out = bnbench("train", "+cluster=slurm", "--cfg", "job", cwd=tmp_path, cache=cache)
    _ok(out)
    assert "resume: true" in out.stdout and not list(tmp_path.iterdir())


# -- a dist.nproc job as a whole: Ctrl-C, a stalled rank, a killed launcher ---------------------


def _child_pids(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    kids = []
    for task in tasks.iterdir() if tasks.exists() else []:
        with contextlib.suppress(OSError):
            kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _rank_pids(launcher: int, world: int = 2, timeout: float = 120) -> dict[int, int]:
    """``rank → pid`` of the processes that the ``dist.nproc`` launcher ``launcher`` started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for pid in _child_pids(launcher):
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                found = [e[5:] for e in env if e.startswith(b"RANK=")]
                if found:
                    ranks[int(found[0])] = pid
        if len(ranks) == world:
            return ranks
        time.sleep(0.05)
    raise AssertionError(f"the launcher {launcher} did not start {world} ranks")


def _alive(pid: int) -> bool:
    """Running, stopped or sleeping; not gone and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _launch(cwd: Path, cache: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``bnbench train dist.nproc=2 <TINY> <args>`` in a session of its own, stderr piped."""
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "SUBMITIT_"))}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "bnbench", "train", "dist.nproc=2", *TINY,
         f"trainer.batch_size={B}", *args],
        cwd=cwd,
        env={**base, "BNBENCH_CACHE": str(cache), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def _job_cleanup(proc: subprocess.Popen):
    """Whatever the test saw: nothing of the job outlives it (SIGCONT for a stopped rank)."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in [proc.pid, *pids]:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(OSError):
                    os.killpg(pid, sig)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


def _bnbench_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bnbench:")]


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_line(tmp_path, cache):
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it): every rank stops,
    the job prints ONE line (not one per rank) naming the checkpoint and the resume command, 130."""
    proc = _launch(tmp_path, cache, "trainer.epochs=100", "hydra.run.dir=run")
    with _job_cleanup(proc) as pids:
        pids += _rank_pids(proc.pid).values()
        _wait_for(tmp_path / "run" / "checkpoints" / "last.pt", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        (line,) = _bnbench_lines(err)
        run = tmp_path / "run"
        assert line.startswith(f"bnbench: interrupted; the last checkpoint is {run}/checkpoints/"
                               "last.pt; resume with: bnbench train dist.nproc=2 "), err
        assert line.endswith(f" trainer.resume=true hydra.run.dir={run}"), line
        assert not [pid for pid in pids if _alive(pid)]


@pytest.mark.slow
def test_killed_launcher_takes_its_ranks_along(tmp_path, cache):
    """kill -9 of the ``dist.nproc`` launcher: its ranks die with it (they trained on and wrote
    the run dir before) and the run dir stops changing."""
    proc = _launch(tmp_path, cache, "trainer.epochs=100", "hydra.run.dir=run")
    with _job_cleanup(proc) as pids:
        pids += _rank_pids(proc.pid).values()
        run = tmp_path / "run"
        _wait_for(run / "checkpoints" / "last.pt", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 5
        while [pid for pid in pids if _alive(pid)] and time.time() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)], "ranks outlived their launcher"

        def state() -> dict:
            return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")
                    if p.is_file()}

        before = state()
        time.sleep(1.5)  # one epoch of this run takes less
        assert state() == before


@pytest.mark.slow
def test_stalled_rank_ends_the_run_within_the_timeout(tmp_path, cache):
    """A rank stopped (SIGSTOP) in the middle of training: the collective waiting for it fails
    after BNBENCH_DIST_TIMEOUT_S, one line names both ranks, the job ends (it hung for 1800 s)."""
    limit = 10
    proc = _launch(tmp_path, cache, "trainer.epochs=100", "hydra.run.dir=run",
                   env={D.TIMEOUT_ENV: str(limit)})
    with _job_cleanup(proc) as pids:
        ranks = _rank_pids(proc.pid)
        pids += ranks.values()
        _wait_for(tmp_path / "run" / "checkpoints" / "last.pt", proc)
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.time()
        _, err = proc.communicate(timeout=limit + 60)
        took = time.time() - start
        assert proc.returncode == 2, err
        assert took < limit + 15, f"the job ended {took:.0f} s after the stall"
        assert "Traceback" not in err, err
        (line,) = _bnbench_lines(err)
        assert line.startswith(f"bnbench: error: rank 0/2: timed out after {limit} s waiting for "
                               "rank 1 in a collective operation: it stopped or hung"), line
        assert not [pid for pid in pids if _alive(pid)]


def test_collective_timeout_default_and_knob(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.timeout_s() + 30 <= 300  # a stalled rank ends the run within 5 minutes
    monkeypatch.setenv(D.TIMEOUT_ENV, "3600")
    assert D.timeout_s() == 3600.0
    for bad in ("0", "-5", "soon", "inf"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(BnbenchError, match=f"{D.TIMEOUT_ENV}={bad}: must be a positive"):
            D.timeout_s()


def test_roll_call_names_the_ranks_that_do_not_answer():
    """After a failed collective the ranks still running answer; the others are named."""
    import threading

    store = torch.distributed.HashStore()
    store.set("p/2", "1")  # rank 2 answered already; rank 1 answers late, rank 3 never
    late = threading.Timer(0.2, store.set, ("p/1", "1"))
    late.start()
    start = time.monotonic()
    assert D.roll_call(store, "p/", 0, 4, wait=1.0) == [3]
    assert time.monotonic() - start >= 0.9  # waited for rank 3 until the end
    late.join()
    assert D.roll_call(store, "p/", 3, 4, wait=0.0) == []  # everyone answered
