"""Command line: argument parsing only; every flag is generated from a config dataclass field.

Each command's settings are declared once, as documented fields (``ewc.config.param``) of its
config: ``RunConfig`` / ``CompareConfig`` (with their ``TrainConfig``), ``experiments.stream.Config``,
``experiments.rl.Config`` and each analysis experiment's ``Config``. A field ``a_b`` becomes
``--a-b`` with its help, default, choices and reader; the parsed flags build the config back,
which validates itself, and the command's library function runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from ewc.checks import Registered
from ewc.config import default_of, field_check
from ewc.executors.base import ExecutorError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str) -> int:
    """An integer flag's reader: digits only (``1e3`` or ``2.5`` is an error that says so)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _tuple_reader(item: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            values = tuple(item(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item.__name__} values, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _shown(f: dataclasses.Field, default: Any) -> str:
    if "shown" in f.metadata:
        return str(f.metadata["shown"])
    if isinstance(default, tuple | list):
        return ",".join(str(v) for v in default)
    return str(default)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``config_cls`` (``a_b`` → ``--a-b``); nested configs add theirs."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        if meta.get("nested"):
            add_config_flags(parser, f.default_factory, meta.get("skip", ()))  # type: ignore[arg-type]
            continue
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                title, _, description = meta["group"].partition(": ")
                groups[meta["group"]] = parser.add_argument_group(title, description or None)
            target = groups[meta["group"]]
        default = default_of(f)
        help_text = meta.get("help", "")
        if meta.get("positional"):
            constraint = field_check(f)
            choices = (
                tuple(constraint.registry) if isinstance(constraint, Registered) else meta.get("choices")
            )
            extra = {k: meta[k] for k in ("type", "metavar") if k in meta}
            target.add_argument(f.name, choices=choices, help=help_text, **extra)
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name}
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if isinstance(default, bool):
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif meta.get("action") == "append":
            kwargs.update(action="append", type=meta["type"], default=default)
        else:
            if "type" in meta:
                kind = meta["type"]
            elif isinstance(default, tuple):
                kind = _tuple_reader(type(default[0]) if default else int)
            else:
                kind = str if default is None else type(default)
            kind = _integer if kind is int else kind
            choices = meta.get("choices")
            constraint = field_check(f)
            if isinstance(constraint, Registered):  # the registry as it stands when the parser is built
                choices = tuple(constraint.registry)
            kwargs.update(type=kind, default=default, choices=choices)
        if meta.get("action") != "append" and (default is not None or "shown" in meta):
            help_text = f"{help_text} (default: {_shown(f, default)})"
        target.add_argument(*flags, help=help_text, **kwargs)


def config_from(args: argparse.Namespace, config_cls: type, skip: Sequence[str] = ()) -> Any:
    """The config the parsed flags describe (fields without a flag keep their defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        if f.metadata.get("nested"):
            values[f.name] = config_from(args, f.default_factory, f.metadata.get("skip", ()))  # type: ignore[arg-type]
        else:
            values[f.name] = getattr(args, f.name)
    return config_cls(**values)


def _add_out(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    what = "created, or an earlier run's to resume" if resumable else "created; must not be a file"
    parser.add_argument("--out", required=True, help=f"output directory ({what}); locked while the run lasts")
    if resumable:
        parser.add_argument(
            "--restart",
            action="store_true",
            help="start a new run in --out even if it holds one made with other settings "
            "(deletes that run's progress; without it such a folder is refused)",
        )
    parser.set_defaults(resumable=resumable)


def _command(sub: Any, name: str, config_cls: type, func: Any, resumable: bool = False, **texts: str) -> Any:
    parser = sub.add_parser(name, **texts)
    parser.set_defaults(command_name=name)
    add_config_flags(parser, config_cls)
    _add_out(parser, resumable)
    parser.set_defaults(func=func, config_cls=config_cls)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from ewc.experiments import EXPERIMENTS, get_experiment
    from ewc.experiments import rl as rl_experiment
    from ewc.experiments import stream as stream_experiment
    from ewc.experiments.compare import CompareConfig
    from ewc.experiments.sequence import RunConfig

    parser = _Parser(
        prog="ewc", description="Elastic Weight Consolidation: continual learning experiments and tools."
    )
    parser.add_argument("--version", action="version", version=f"ewc {__import__('ewc').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _command(
        sub,
        "run",
        RunConfig,
        _cmd_run,
        resumable=True,
        help="learn a sequence of tasks with several methods; write results, figures and a report",
        description="Learn a task sequence with each method from the same initial weights and data "
        "order; evaluate every task during training and after each task; write results.json, "
        "metrics.csv, curves.png, matrix.png, summary.png and report.md into --out.",
    )
    _command(
        sub,
        "compare",
        CompareConfig,
        _cmd_compare,
        resumable=True,
        help="every method in every scenario, hyper-parameters chosen on validation: one table",
        description="Run `ewc run` once per scenario (task-, domain-, class-incremental) with the "
        "given methods (default: all), each method's hyper-parameters chosen on the validation "
        "parts (--search, on by default here), and write comparison.md, comparison.csv, "
        "summary.png and results.json into --out (one sub-directory per scenario).",
    )
    rep = sub.add_parser(
        "report",
        help="redraw the report of a saved run, or compare several runs",
        description="With one run directory: redraw its figures and report.md from results.json. "
        "With several: print a comparison table (and write comparison.md/.png into --out).",
    )
    rep.add_argument("runs", nargs="+", help="run directories (each with results.json)")
    rep.add_argument("--out", default=None, help="where to write the comparison (several runs)")
    rep.set_defaults(func=_cmd_report)

    exp = sub.add_parser(
        "experiment",
        help="the analysis experiments (patterns, many-tasks, overlap, perturb, kl, batchnorm, languages)",
        description="Run one of the paper's analysis experiments; each writes results.json, "
        "PNG figure(s) and report.md into --out. Defaults reproduce the qualitative result on "
        "2 CPU cores in minutes; flags scale them up.",
    )
    exp_sub = exp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in EXPERIMENTS:
        module = get_experiment(name)
        doc = (module.__doc__ or "").strip()
        p = _command(
            exp_sub, name, module.Config, _cmd_module, help=module.TITLE, description=doc.split("\n\n")[0]
        )
        p.set_defaults(module=module)

    st = _command(
        sub,
        "stream",
        stream_experiment.Config,
        _cmd_module,
        resumable=True,
        help="learn a task stream with unannounced switches (inferred task ids); write results and a report",
        description="Replay a task sequence as a stream of batches following --schedule (segments of "
        "random length, no task labels), learn it online with StreamLearner and TaskDetector, and write "
        "results.json, timeline.png and report.md into --out.",
    )
    st.set_defaults(module=stream_experiment)
    rl = _command(
        sub,
        "rl",
        rl_experiment.Config,
        _cmd_module,
        resumable=True,
        help="continual RL on MinAtar games: dqn vs ewc (inferred or true task labels); results and a report",
        description="Train one DQN agent per method and seed on a seeded schedule of MinAtar games with "
        "revisits (runs in --jobs worker processes, checkpointed under OUT/checkpoints: the same command "
        "again resumes), normalise scores by the random policy and a single-task DQN reference (cached), "
        "run the Fisher perturbation test, and write results.json, total_score.png, per_game.png, "
        "perturb.png and report.md into --out. Needs MinAtar (pip install --no-deps minatar).",
    )
    rl.set_defaults(module=rl_experiment)
    return parser


# Settings that do not change a run's results: a resume may change them.
VOLATILE = frozenset({"jobs", "quiet", "progress", "track", "executor", "ray_address"})
# What a --restart deletes in --out: the partial work of the run made with other settings.
PROGRESS = ("progress", "checkpoints", "*/progress", "*/checkpoints")


def _config(args: argparse.Namespace) -> Any:
    """The command's config (validated), then --out claimed (made, proven writable, locked) and,
    for a resumable command, tied to its settings."""
    from ewc.data.custom import file_sha256, is_npz_path
    from ewc.outdir import check_settings, claim

    config = config_from(args, args.config_cls)  # bad flags fail here, before --out is made
    claim(args.out)
    if getattr(args, "resumable", False):
        settings = {"command": args.command_name, **_settings(dataclasses.asdict(config))}
        data = getattr(config, "data", None)
        if is_npz_path(data):  # a data file is its contents: a changed file is another run
            settings["data_sha256"] = file_sha256(data)
        if check_settings(args.out, settings, restart=args.restart, progress=PROGRESS):
            print(f"resuming the run in {args.out}", file=sys.stderr)
    return config


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _settings(v) if isinstance(v, dict) else v for k, v in values.items() if k not in VOLATILE}


def _cmd_run(args: argparse.Namespace) -> int:
    from ewc.experiments.sequence import run

    results = run(_config(args), args.out)
    if "per_seed" in results:
        _print_seeds(results)
    else:
        print(f"{'method':<12} {'ACC':>6} {'BWT':>7} {'forget':>7} {'seconds':>8}")
        for name, r in results["methods"].items():
            acc, bwt, fgt, sec = r["average_accuracy"], r["bwt"], r["forgetting"], r["seconds"]
            print(f"{name:<12} {acc:6.3f} {bwt:7.3f} {fgt:7.3f} {sec:8.1f}")
    from ewc.report.search import auto_records, summary_line

    for name, record in auto_records(results).items():
        print(summary_line(name, record))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _print_seeds(results: dict[str, Any]) -> None:
    """The table of a ``--seeds`` run (mean ± 95 % CI) and the paired tests on ACC."""
    from ewc.report.seeds import paired_tests
    from ewc.report.values import fmt_stat

    seeds = results["config"]["seeds"]
    print(f"mean ± 95 % CI over {len(seeds)} seed(s) {','.join(map(str, seeds))} (Student's t)")
    print(f"{'method':<12} {'ACC':>15} {'BWT':>16} {'forget':>15} {'seconds':>13}")
    for name, r in results["methods"].items():
        cells = [fmt_stat(r, k) for k in ("average_accuracy", "bwt", "forgetting")] + [
            fmt_stat(r, "seconds", 1)
        ]
        print(f"{name:<12} {cells[0]:>15} {cells[1]:>16} {cells[2]:>15} {cells[3]:>13}")
    for test in paired_tests(results):
        print(f"paired t-test on ACC, {test['a']} vs {test['b']}: {test['verdict']}")


def _cmd_compare(args: argparse.Namespace) -> int:
    from ewc.experiments.compare import run

    summary = run(_config(args), args.out)
    print(summary["table"])
    print(f"report: {Path(args.out) / 'comparison.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ewc.report import compare_runs, load_results, write_report

    if len(args.runs) == 1:
        paths = write_report(load_results(args.runs[0]), args.runs[0])
        print(f"report: {paths.get('report.md', Path(args.runs[0]) / 'report.md')}")
        return 0
    print(compare_runs(args.runs, args.out))
    return 0


def _cmd_module(args: argparse.Namespace) -> int:
    """An experiment, ``ewc stream`` or ``ewc rl``: build its Config, run it into --out, print findings."""
    module: ModuleType = args.module
    record = module.run(_config(args), args.out)
    for line in record.get("findings", []):
        print(f"- {line}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _busy_out(argv: list[str]) -> str | None:
    """The error for an ``--out`` another run holds, found before the parser (and torch) loads."""
    if not argv or argv[0] not in ("run", "compare", "experiment", "stream", "rl"):
        return None
    from ewc.outdir import OutDirInUse, check_free

    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--out=") else None
        if arg == "--out" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            try:
                check_free(value)
            except OutDirInUse as err:
                return str(err)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ewc`` command; errors in the input become one clear line, exit 2."""
    early = _busy_out(sys.argv[1:] if argv is None else list(argv))
    if early:
        print(f"ewc: error: {early}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "out", None) is not None and not str(args.out).strip():
            raise ValueError(f"--out must name a directory, got {args.out!r}")
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ewc: error: {err}", file=sys.stderr)
        return 2
    except ExecutorError as err:  # a cluster unreachable, a job lost on it too often
        print(f"ewc: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full disk, a path under a file: one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        reason = err.strerror or str(err)
        code = f" [{errno.errorcode.get(err.errno, err.errno)}]" if err.errno else ""
        print(f"ewc: error: {where}{reason}{code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ewc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
