"""``bnbench <command>``: ``train`` (a Hydra application) and ``bench``.

Overrides are composed and validated once *before* Hydra runs, so every bad input (unknown key
or group option, wrong type, bad value, unwritable output dir) ends in one line
``bnbench: error: …`` and exit status 2 instead of a traceback. Validation imports what it needs
only (torch, the trainer and torch.distributed come after it), so that the line comes fast.

Exit statuses: 0 done; 2 a ``bnbench: error:`` line said why; 130 interrupted (Ctrl-C: one
``bnbench: interrupted`` line naming the last checkpoint and the command that resumes the run);
141 the reader of the output went away (``bnbench train --help | head``), quietly; 1 a bug (a
traceback).
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import itertools
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bnbench.errors import BnbenchError

USAGE = """usage: bnbench <command> [args]

commands:
  train [overrides]   train a model (Hydra app: -m for sweeps, --cfg job, --help)
                      e.g. bnbench train norm=gn trainer.epochs=3
  eval run=DIR [...]  evaluate a run's checkpoint with chosen statistics (Hydra app, -m)
  analyze NAME run=DIR [key=value ...]
                      an analysis of a run (Fig. 2 channel trace, A.2 estimators, A.3 layerwise)
  experiment P/NAME   run a paper's table or figure end to end [scale=smoke|cpu|paper]
  report P/NAME       write an experiment's report beside the paper's numbers [scale=…]
  bench [options]     time each normalization layer against nn.BatchNorm2d

Run 'bnbench train --help' for the config groups and keys."""

#: Commands whose module's ``main(argv) -> int`` runs them.
COMMANDS = {"eval": "bnbench.eval_app", "experiment": "bnbench.experiment",
            "report": "bnbench.report", "analyze": "bnbench.analysis"}

#: Hydra flags that take a value (their value is not an override).
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
#: Hydra flags that print something and exit, running no job: the overrides are not validated
#: (help for a bad command line still helps) and no processes are launched.
INFO_FLAGS = frozenset({"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                        "--version"})
#: ... and ``--cfg``/``-c``, which print the composed config (validated, but no job runs).
PRINT_FLAGS = INFO_FLAGS | {"--cfg", "-c"}
#: Config groups of train.yaml's defaults list that command lines used to append: ``+norm=X``
#: (or ``++norm=X``) is read as ``norm=X``, the same job.
_APPENDED_DEFAULTS = ("norm",)
#: Set by :func:`bnbench.distributed.launch_local` in the processes it starts: the launcher's pid
#: (they die with it, and leave reporting an interrupt to it).
LAUNCHER_ENV = "BNBENCH_LAUNCHER_PID"
#: Exit status of an interrupted run (128 + SIGINT), and of one whose output reader went away.
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
#: Override keys that :func:`resume_command` sets itself (or that start another kind of run).
_NOT_RESUMED = ("hydra.run.dir", "trainer.resume", "hydra.sweep.dir", "hydra.sweep.subdir",
                "hydra.mode", "cluster", "hydra/launcher")


def fail(message: str) -> int:
    print(f"bnbench: error: {message}", file=sys.stderr, flush=True)
    return 2


def given_flags(args: Sequence[str]) -> set[str]:
    """The flags among Hydra's command line (``--cfg=job`` counts as ``--cfg``)."""
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("-")}


def canonical_args(args: Sequence[str]) -> list[str]:
    """Hydra's command line with ``+norm=X``/``++norm=X`` spelled ``norm=X`` (its group is in
    the defaults list, where Hydra refuses to append it again)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif arg.startswith("+") and arg.lstrip("+").split("=", 1)[0] in _APPENDED_DEFAULTS:
            arg = arg.lstrip("+")
        out.append(arg)
    return out


def split_overrides(args: Sequence[str]) -> tuple[list[str], bool]:
    """The override arguments among Hydra's command line, and whether it is a multirun."""
    overrides, skip, multirun = [], False, False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def _root_cause(err: BaseException) -> BaseException:
    from omegaconf.errors import OmegaConfBaseException

    seen = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _valid_keys(full_key: str) -> list[str]:
    from bnbench.config import TrainConfig

    return valid_keys(TrainConfig, full_key)


def valid_keys(schema: type, full_key: str) -> list[str]:
    """The keys of the deepest config node of ``schema`` above ``full_key`` (a typo'd group:
    the top level), for "valid keys here" messages."""
    from omegaconf import OmegaConf

    root = OmegaConf.structured(schema)
    parts = full_key.split(".")[:-1]
    while parts:
        node = OmegaConf.select(root, ".".join(parts))
        if node is not None and hasattr(node, "keys"):
            return list(node.keys())
        parts.pop()
    return list(root.keys())


def _chosen_norm(job: Sequence[str]) -> str | None:
    """The variant a job's overrides select: ``norm.name=X`` (a value: it wins over the group),
    else the last ``+norm=X``/``norm=X``."""
    picks: dict[str, str] = {}
    for override in job:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("norm", "norm.name"):
            picks[key] = value
    return picks.get("norm.name", picks.get("norm"))


def _run_keys(options: frozenset[str]) -> list[str]:
    """The trainer's ``norm.*`` keys that apply to a variant with these layer options."""
    keys = ["burnin_epochs"] if "burnin" in options else []
    if "momentum" in options:  # BN family: the FrozenBN switch
        keys += ["freeze_at_epoch", "freeze_stats", "freeze_warmup_epochs"]
    return keys + (["scale_schedule"] if "schedule_scale" in options else [])


def _unknown_key(key: str, job: Sequence[str]) -> str:
    if key.startswith("norm.") and key.count(".") == 1:
        from bnbench import norm  # (torch: only for the keys of a norm variant)
        from bnbench.config import NormConfig

        name = _chosen_norm(job) or NormConfig.name
    else:
        name = norm = None
    if norm is not None and name in norm.NORMS:  # the variant's own options, not every variant's
        options = norm.spec(name).options
        keys = [*sorted(options), *_run_keys(options)]
        return f"unknown key {key}; norm={name} takes: {', '.join(keys)}"
    return f"unknown key {key}; valid keys here: {', '.join(_valid_keys(key))}"


def describe(err: BaseException, job: Sequence[str] = ()) -> str:
    """One line for a Hydra/OmegaConf composition error (``job``: the overrides composed)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, ValidationError

    if isinstance(err, OverrideParseException):  # the override's syntax
        first = str(err.message).strip().splitlines()[0]
        value = str(err.override).partition("=")[2]
        hint = " (quote a value with spaces or '=': key='a b')" if re.search(r"[ =]", value) else ""
        return f"{err.override}: {first}{hint}"
    if isinstance(err, MissingConfigException):
        group = (err.missing_cfg_file or "").split("/")[0]
        name = (err.missing_cfg_file or "").split("/")[-1]
        options = ", ".join(err.options or [])
        return f"{group}={name}: unknown option; choose one of {options}"
    cause = _root_cause(err)
    key = getattr(cause, "full_key", None)
    override = re.match(r"Could not override '([^']+)'", str(err))
    append = re.search(r"To append to your default list use (\S+)", str(err))
    if override and append:  # a group that is not in the defaults list (cluster)
        return f"{override.group(1)}: not a default group here; use {append.group(1)}"
    again = re.match(r"Multiple values for (\S+)\. To override a value use 'override \S+ (\S+)'",
                     str(err))
    if again:  # +group=X for a group of the defaults list (model, dataset)
        group, name = again.group(1), again.group(2).strip("'")
        return f"+{group}={name}: {group} is in the defaults list already; use {group}={name}"
    if override and not isinstance(cause, ValidationError):
        return _unknown_key(override.group(1), job)
    if isinstance(cause, ConfigKeyError) and key:
        return _unknown_key(key, job)
    if isinstance(cause, ValidationError) and key:
        first = str(cause.msg if hasattr(cause, "msg") else cause).splitlines()[0]
        return f"{key}: {first}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def _chosen_once(overrides: Sequence[str]) -> None:
    """``norm`` chosen at most once, in either spelling: Hydra refused a second ``+norm=X`` (in
    its words) and would take the last ``norm=X``; two choices are more often a sweep without
    ``-m`` than a choice."""
    seen: dict[str, str] = {}
    for override in overrides:
        key, eq, value = override.lstrip("+").partition("=")
        if not eq or key not in _APPENDED_DEFAULTS:
            continue
        if key in seen:
            first = seen[key].partition("=")[2]
            raise BnbenchError(f"{key}: chosen twice ({seen[key]}, {override}); choose one, or "
                               f"sweep over both with -m {key}={first},{value}")
        seen[key] = override


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of every job a (multi)run of ``bnbench train`` will start."""

    def kept(override: str) -> bool:  # the run dir is composed too (check_fresh_run_dir)
        key = override.lstrip("+~").split("=", 1)[0]
        return not key.startswith("hydra") or key == "hydra.run.dir"

    return expand_sweeps([o for o in overrides if kept(o)], multirun)


def expand_sweeps(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of every job: Hydra's basic sweeper's cartesian product of the sweeps
    (``a,b``, ``range(…)``, ``glob(…)``), in command-line order; a sweep without ``-m`` is an
    error. Pass no ``hydra.*`` overrides other than the run dir (they are Hydra's own)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = GlobalHydra.instance()  # in a compose context: glob() lists the group's options
    parser = OverridesParser.create(hydra.config_loader() if hydra.is_initialized() else None)
    choices: dict[str, list[str]] = {}  # a key given twice: its last value, at its first place
    for override in parser.parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif not multirun:
            raise BnbenchError(f"{override.input_line}: a sweep; add -m to run one job per value")
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise BnbenchError(f"{key}: Hydra's basic sweeper takes choices (a,b), range() and "
                               "glob() sweeps, not interval()")
    if not multirun:
        return [overrides]
    return [list(job) for job in itertools.product(*choices.values())]


def _given_dir(overrides: list[str], multirun: bool) -> str | None:
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(key)]
    return given[-1] if given else None


_PSEUDO_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
              "securityfs", "tracefs", "pstore", "bpf", "configfs", "efivarfs", "mqueue",
              "hugetlbfs", "fusectl", "binfmt_misc", "autofs", "nsfs"}


def _file_system(path: Path) -> str | None:
    """The type of the file system holding ``path`` (``/proc/self/mounts``), if known."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _check_output_dir(overrides: list[str], multirun: bool) -> None:
    """The output dir can be created: a real ``mkdir`` in its deepest existing ancestor (mode
    bits say nothing for root or special file systems); an error names the real cause."""
    given = _given_dir(overrides, multirun)
    target = Path(given or ("multirun" if multirun else "outputs")).absolute()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BnbenchError(f"output dir {target}: {probe} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bnbench-probe-", dir=probe))
    except OSError as err:
        kind = _file_system(probe)
        why = os.strerror(err.errno) if err.errno else str(err)
        if kind in _PSEUDO_FS:  # /proc answers ENOENT, /sys EPERM: neither is the cause
            raise BnbenchError(
                f"output dir {target}: {probe} is on a {kind} file system (the kernel's, not "
                f"storage): directories cannot be created there ({why})") from err
        if err.errno == errno.EROFS:
            raise BnbenchError(f"output dir {target}: {probe} is on a read-only file system"
                               ) from err
        raise BnbenchError(f"output dir {target}: cannot create directories in {probe} ({why})"
                           ) from err


def validate_overrides(args: Sequence[str]) -> list:
    """Compose the config of every job and check its values (returned); raise BnbenchError."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from bnbench.config import register, validate

    given, multirun = split_overrides(args)
    _chosen_once(given)
    overrides = canonical_args(given)
    _check_output_dir(overrides, multirun)
    register()
    GlobalHydra.instance().clear()
    cfgs = []
    with initialize_config_module("bnbench.configs", version_base="1.3"):
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            OverridesParser.create().parse_overrides(overrides)  # hydra.* ones too: their syntax
            jobs = _jobs(overrides, multirun)
        except BnbenchError:
            raise
        except Exception as err:
            raise BnbenchError(describe(err)) from err
        for job in jobs:
            try:
                cfg = compose("train", overrides=job, return_hydra_config=True)
            except Exception as err:  # Hydra/OmegaConf composition errors
                raise BnbenchError(describe(err, job)) from err
            validate(cfg)
            cfgs.append(cfg)
    GlobalHydra.instance().clear()
    return cfgs


def check_fresh_run_dir(args: Sequence[str], cfgs: list) -> None:
    """A new (not resumed) run refuses a run dir that holds another run: Hydra would overwrite
    its ``.hydra/`` and the metrics of two runs would mix. The dir is the composed
    ``hydra.run.dir`` (``++``, quotes, interpolations, config files). Every rank checks: no
    rank writes before all have joined the process group. Sweeps are not checked."""
    from omegaconf import OmegaConf

    if split_overrides(args)[1] or not cfgs:
        return
    run_dir = OmegaConf.select(cfgs[0], "hydra.run.dir")
    if run_dir and (Path(run_dir) / "metrics.jsonl").exists() and not cfgs[0].trainer.resume:
        raise BnbenchError(f"hydra.run.dir={run_dir} already holds a run; trainer.resume=true "
                           "continues it, or choose another dir")


#: Hydra's commands: one at most (Hydra's ValueError traceback otherwise).
_COMMANDS = {"--run": {"--run", "-r"}, "-m": {"-m", "--multirun"}, "--cfg": {"--cfg", "-c"},
             "--info": {"--info", "-i"}, "--shell-completion": {"--shell-completion", "-sc"}}


def _check_commands(args: Sequence[str]) -> None:
    given = given_flags(args)
    if given & {"--help", "-h", "--hydra-help", "--version"}:
        return  # help comes first in Hydra
    chosen = [name for name, spellings in _COMMANDS.items() if given & spellings]
    if len(chosen) > 1:
        raise BnbenchError(f"{' and '.join(chosen)}: choose one of --run, -m, --cfg, --info, "
                           "--shell-completion")
    if "--resolve" in given and "--cfg" not in chosen:
        raise BnbenchError("--resolve: only with --cfg (or --help)")


def _train(args: list[str]) -> int:
    try:
        _check_commands(args)
    except BnbenchError as err:
        return fail(str(err))
    if not given_flags(args) & INFO_FLAGS:
        try:
            cfgs = validate_overrides(args)  # before torch and the trainer are imported
            check_fresh_run_dir(args, cfgs)
            nprocs = {cfg.dist.nproc for cfg in cfgs}
            if len(nprocs) > 1:
                raise BnbenchError("dist.nproc: every job of a sweep must use the same value")
            nproc = nprocs.pop()
            from bnbench import distributed as D

            if D.should_launch(nproc, args):  # dist.nproc=N: N processes of this command
                return D.launch_local(nproc, ["train", *canonical_args(args)])
        except BnbenchError as err:
            return fail(str(err))
    from bnbench import distributed as D
    from bnbench import hydra_app

    args = canonical_args(args)
    if D.launch_rank() > 0:
        # Other ranks of a torchrun job / srun step write no Hydra output (rank 0 owns the run dir).
        args = [*args, *D.worker_overrides(split_overrides(args)[1])]
    if not given_flags(args) & PRINT_FLAGS and not isinstance(sys.stdout, _PipeSafe):
        sys.stdout = _PipeSafe(sys.stdout)  # before Hydra's log handlers take sys.stdout
    sys.argv = ["bnbench train", *args]
    hydra_app.main()
    return 0


# -- interrupts, broken pipes, launcher death -------------------------------------------------


def resume_command(args: Sequence[str], run_dir: str | os.PathLike) -> str:
    """The command line that resumes the run in ``run_dir`` that ``bnbench train <args>``
    started (``args``: its overrides and flags; a sweep: the job's overrides)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            kept.append(arg)
            continue
        if arg in _VALUE_FLAGS:
            skip = True
        key = arg.lstrip("+~").split("=", 1)[0]
        if arg in ("-m", "--multirun") or (not arg.startswith("-") and key in _NOT_RESUMED):
            continue
        kept.append(arg)
    return shlex.join(["bnbench", "train", *kept, "trainer.resume=true",
                       f"hydra.run.dir={run_dir}"])


def interrupted_line(run_dir: str | os.PathLike | None, command: str | None,
                     signum: int = signal.SIGINT) -> str:
    """The one line that an interrupted run prints: where its last checkpoint is and how to
    resume it (``run_dir`` ``None``: interrupted before the run dir existed)."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if run_dir is None or command is None:
        return f"bnbench: {what} before the run started"
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if last.exists():
        return f"bnbench: {what}; the last checkpoint is {last}; resume with: {command}"
    return (f"bnbench: {what} before the first checkpoint of {run_dir}; start it again there "
            f"with: {command}")


def under_launcher() -> bool:
    """A process that ``bnbench train dist.nproc=N`` started (the launcher reports for it)."""
    return LAUNCHER_ENV in os.environ


_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """In a process that ``dist.nproc=N`` started: be killed (SIGKILL) when the launcher dies,
    even by ``kill -9``, instead of training on as an orphan that writes the run dir.

    The launcher (torchrun's agent, inside the ``bnbench`` process) is this process's parent;
    Linux's ``PR_SET_PDEATHSIG`` delivers the signal when it exits. A launcher that died before
    this call (its pid is gone): exit at once."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or "TORCHELASTIC_RUN_ID" not in os.environ or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the launcher's own teardown still applies
        return
    try:
        os.kill(int(launcher), 0)
    except ProcessLookupError:
        os._exit(EXIT_INTERRUPTED)
    except (OSError, ValueError):
        pass


class _PipeSafe:
    """``sys.stdout`` of a training run: when its reader goes away (``bnbench train … | head``)
    the output goes to ``/dev/null`` from then on and the run goes on (its log is in the run
    dir), instead of a logging traceback per line and a failed run."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _lost(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no file descriptor: drop the stream's writes instead
            self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._lost()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``bnbench train --help | head``): no traceback, no
    second error when Python flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    die_with_launcher()
    printing = not args or args[0] in ("-h", "--help") or bool(given_flags(args[1:]) & (
        PRINT_FLAGS if args[0] == "train" else {"-h", "--help"}))
    if printing and argv is None and hasattr(signal, "SIGPIPE"):
        # A command that only prints (help, --cfg): a closed pipe ends it as it ends `cat`.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if args else 2
        command, rest = args[0], args[1:]
        # torch.compile's C++ toolchain check warns "No CUDA runtime is found" on CPU-only
        # machines with a CUDA build of PyTorch: noise in every GhostBN/BRN/CBN run here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        if command == "train":
            return _train(rest)
        if command == "bench":
            from bnbench.bench import main as bench_main

            return bench_main(rest)
        if command in COMMANDS:
            module = importlib.import_module(COMMANDS[command])
            return module.main(rest)
    except BnbenchError as err:
        return fail(str(err))
    except KeyboardInterrupt:  # outside a job (validation, start-up): nothing to resume
        if not under_launcher() and os.environ.get("RANK", "0") == "0":
            print(interrupted_line(None, None), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return fail(f"unknown command {command!r}; choose one of train, eval, analyze, experiment, "
                "report, bench")


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()  # a pipe closed after the last write fails here, not at exit
    except BrokenPipeError:
        code = _quiet_broken_pipe()
    sys.exit(code)
