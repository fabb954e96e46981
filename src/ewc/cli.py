"""Command line: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from ewc.fisher import FISHER_MODES


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _setting(text: str) -> tuple[str, str, object]:
    """METHOD.PARAM=VALUE → (method, param, value); numbers become int/float, 'none' None."""
    head, sep, raw = text.partition("=")
    method, dot, param = head.partition(".")
    if not (sep and dot and method and param):
        raise argparse.ArgumentTypeError(f"expected METHOD.PARAM=VALUE, got {text!r}")
    value: object = raw
    for kind in (int, float):
        try:
            value = kind(raw)
            break
        except ValueError:
            continue
    if raw.lower() == "none":
        value = None
    return method, param, value


def _names(choices: tuple[str, ...]) -> object:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return names

    return parse


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="ewc",
        description="Elastic Weight Consolidation: continual learning experiments and tools.",
    )
    parser.add_argument("--version", action="version", version=f"ewc {__import__('ewc').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="learn a sequence of tasks with several methods; write results, figures and a report",
        description="Learn a task sequence with each method from the same initial weights and data "
        "order; evaluate every task during training and after each task; write results.json, "
        "metrics.csv, curves.png, matrix.png, summary.png and report.md into --out.",
    )
    _add_run_flags(run)
    run.set_defaults(func=_cmd_run)

    cmp = sub.add_parser(
        "compare",
        help="every method in every scenario, hyper-parameters chosen on validation: one table",
        description="Run `ewc run` once per scenario (task-, domain-, class-incremental) with the "
        "given methods (default: all), each method's hyper-parameters chosen on the validation "
        "parts (--search, on by default here), and write comparison.md, comparison.csv, "
        "summary.png and results.json into --out (one sub-directory per scenario).",
    )
    _add_run_flags(cmp, compare=True)
    cmp.add_argument("--no-search", dest="search", action="store_false", help="use the defaults")
    cmp.set_defaults(func=_cmd_compare, search=True)

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
        help="the paper's analysis experiments (patterns, many-tasks, overlap, perturb, kl, batchnorm)",
        description="Run one of the paper's analysis experiments; each writes results.json, "
        "PNG figure(s) and report.md into --out. Defaults reproduce the qualitative result on "
        "2 CPU cores in minutes; flags scale them up.",
    )
    exp_sub = exp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    from ewc.experiments import EXPERIMENTS, get_experiment

    for name in EXPERIMENTS:
        module = get_experiment(name)
        doc = (module.__doc__ or "").strip()
        p = exp_sub.add_parser(name, help=module.TITLE, description=doc.split("\n\n")[0])
        _add_config_flags(p, module.Config)
        p.add_argument("--out", required=True, help="output directory (created; must not be a file)")
        p.set_defaults(func=_cmd_experiment)

    _add_stream_parser(sub)
    _add_rl_parser(sub)
    return parser


def _add_rl_parser(sub: argparse._SubParsersAction) -> None:
    """``ewc rl``: continual DQN / DQN + EWC on a schedule of MinAtar games (flags from its Config)."""
    from ewc.experiments.rl import Config

    rl = sub.add_parser(
        "rl",
        help="continual RL on MinAtar games: dqn vs ewc (inferred or true task labels); results and a report",
        description="Train one DQN agent per method and seed on a seeded schedule of MinAtar games with "
        "revisits (runs in --jobs worker processes, checkpointed under OUT/checkpoints: the same command "
        "again resumes), normalise scores by the random policy and a single-task DQN reference (cached), "
        "run the Fisher perturbation test, and write results.json, total_score.png, per_game.png, "
        "perturb.png and report.md into --out. Needs MinAtar (pip install --no-deps minatar).",
    )
    _add_config_flags(rl, Config)
    rl.add_argument("--out", required=True, help="output directory (created, or an earlier run's to resume)")
    rl.set_defaults(func=_cmd_rl)


def _add_stream_parser(sub: argparse._SubParsersAction) -> None:
    """``ewc stream``: a task stream with unannounced switches, learned with inferred task ids."""
    from ewc.data import DATASETS
    from ewc.data.tabular import NAN_POLICIES
    from ewc.experiments.stream import BASELINES, SEQUENCE_KINDS, Config
    from ewc.methods import METHODS

    d = Config()
    st = sub.add_parser(
        "stream",
        help="learn a task stream with unannounced switches (inferred task ids); write results and a report",
        description="Replay a task sequence as a stream of batches following --schedule (segments of "
        "random length, no task labels), learn it online with StreamLearner and TaskDetector, and write "
        "results.json, timeline.png and report.md into --out.",
    )
    st.add_argument("--data", default=d.data, choices=DATASETS, help=f"dataset (default: {d.data})")
    st.add_argument("--sequence", default=d.sequence, choices=SEQUENCE_KINDS, help="permuted or split")
    st.add_argument("--tasks", type=int, default=d.tasks, help=f"tasks in the sequence (default: {d.tasks})")
    st.add_argument(
        "--schedule",
        default=" ".join(map(str, d.schedule)),
        help="task index of each segment, space or comma separated (default: '0 1 2 0 3 1 4')",
    )
    st.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size ({d.batch_size})")
    st.add_argument("--min-len", type=int, default=d.min_len, help=f"min segment, batches ({d.min_len})")
    st.add_argument("--max-len", type=int, default=d.max_len, help=f"max segment, batches ({d.max_len})")
    st.add_argument("--method", default=d.method, choices=METHODS, help=f"method (default: {d.method})")
    st.add_argument("--baseline", default=d.baseline, choices=BASELINES, help="also run sgd (default)")
    st.add_argument(
        "--true-ids",
        action=argparse.BooleanOptionalAction,
        default=d.true_ids,
        help="also learn the stream with the true task ids given, the control (default: on)",
    )
    st.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    st.add_argument("--hidden", type=_ints, default=d.hidden, help="hidden sizes, e.g. 100,100 (100)")
    st.add_argument("--memory", type=int, default=d.memory, help=f"samples kept per segment ({d.memory})")
    st.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    st.add_argument("--threads", type=int, default=d.threads, help=f"torch threads (default: {d.threads})")
    st.add_argument("--max-train-per-task", type=int, default=None, help="subsample train parts")
    tab = st.add_argument_group(
        "your own data", "stream the rows of a CSV or .npz file instead of --data/--sequence/--schedule"
    )
    tab.add_argument("--csv", "--npz", dest="csv", default=None, metavar="FILE", help="CSV or .npz file")
    tab.add_argument("--label-column", default=None, metavar="NAME", help="column (npz: array) of labels")
    tab.add_argument("--timestamp-column", default=None, metavar="NAME", help="optional; rows sorted by it")
    tab.add_argument(
        "--task-column", default=None, metavar="NAME", help="optional true task per row (evaluation only)"
    )
    tab.add_argument(
        "--test-fraction", type=float, default=d.test_fraction, help=f"rows held out ({d.test_fraction})"
    )
    tab.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=d.standardize,
        help="scale features by the first 1000 stream rows (default: off)",
    )
    tab.add_argument(
        "--nan-policy",
        default=d.nan_policy,
        choices=NAN_POLICIES,
        help="rows with missing features: drop and count (default) or raise",
    )
    st.add_argument("--out", required=True, help="output directory (created; must not be a file)")
    st.set_defaults(func=_cmd_stream)


def _add_run_flags(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """The flags of ``ewc run`` (and of ``ewc compare``, which runs it once per scenario)."""
    from ewc.data import DATASETS, SEQUENCES
    from ewc.methods import METHODS

    p.add_argument("sequence", choices=SEQUENCES, help="how tasks are made from the dataset")
    p.add_argument(
        "--data",
        default="mnist-10k",
        choices=DATASETS,
        help="dataset (default: mnist-10k, embedded in the package)",
    )
    p.add_argument(
        "--data-root", default=None, help="directory with the dataset files (else $EWC_DATA, cache, system)"
    )
    p.add_argument("--tasks", type=int, default=10, help="number of tasks (default: 10)")
    p.add_argument(
        "--methods",
        default="all" if compare else "sgd,l2,ewc,online-ewc,joint",
        help=f"comma-separated, from: {', '.join(METHODS)}, or 'all' "
        f"(default: {'all' if compare else 'sgd,l2,ewc,online-ewc,joint'})",
    )
    p.add_argument("--out", required=True, help="output directory (created; must not be a file)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default: 5)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 0.001)")
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="adam",
        help="optimiser, fresh state per task (default: adam)",
    )
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0)")
    p.add_argument("--hidden", type=_ints, default=(400, 400), help="hidden sizes, e.g. 400,400 (default)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer (default: 0)")
    p.add_argument("--lam", type=float, default=100.0, help="EWC strength λ (penalty λ/2·ΣF(θ−θ*)²)")
    p.add_argument("--l2-lam", type=float, default=None, help="L2 strength (default: --lam)")
    p.add_argument(
        "--select-lam",
        type=_floats,
        default=None,
        metavar="GRID",
        help="choose λ of ewc/online-ewc/l2 from this comma-separated grid on the validation "
        "parts before the test run (e.g. 1,10,100,1000)",
    )
    p.add_argument(
        "--select-l2-lam",
        type=_floats,
        default=None,
        metavar="GRID",
        help="grid for l2's λ (default: the --select-lam grid)",
    )
    if compare:
        p.add_argument(
            "--scenarios",
            type=_names(("task", "domain", "class")),
            default=("task", "domain", "class"),
            help="comma-separated scenarios to compare (default: task,domain,class)",
        )
    else:
        p.add_argument(
            "--scenario",
            choices=("task", "domain", "class"),
            default=None,
            help="task-, domain- or class-incremental: which outputs a task is trained and tested on "
            "(default: domain when the tasks share their classes, as in permuted; class otherwise)",
        )
    p.add_argument(
        "--search",
        action="store_true",
        help="choose every method's hyper-parameters from its registered grid on the validation "
        "parts before the test run (see docs/methods.md)",
    )
    p.add_argument(
        "--save-state",
        action="store_true",
        help="save each trained learner (weights, method state, scenario) as OUT/checkpoints/METHOD.pt",
    )
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="METHOD.PARAM=VALUE",
        help="a method parameter, e.g. lwf.temperature=2 or replay.capacity=500 (repeatable)",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="online EWC decay γ in (0, 1] (default: 1)")
    p.add_argument("--fisher", choices=FISHER_MODES, default="exact", help="Fisher mode (default: exact)")
    p.add_argument(
        "--fisher-samples", type=int, default=1000, help="samples per task for the Fisher (default: 1000)"
    )
    p.add_argument("--max-train-per-task", type=int, default=None, help="subsample train parts")
    p.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="mini-batches between evaluations of every task (default: 50)",
    )
    p.add_argument(
        "--curve-samples",
        type=int,
        default=500,
        help="test samples per task used for the curves (default: 500)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, permutations and initial weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="methods trained in parallel worker processes, one torch thread each (default: 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_tuple(item: type) -> object:
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


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of an experiment's Config dataclass (``a_b`` → ``--a-b``)."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if isinstance(default, tuple):
            kind = _parse_tuple(type(default[0]) if default else int)
            shown = ",".join(str(v) for v in default)
        else:
            kind = f.metadata.get("type") or type(default)
            shown = str(default)
        parser.add_argument(
            flag, type=kind, default=default, choices=choices, help=f"{help_text} (default: {shown})"
        )


def _params(settings: list[tuple[str, str, object]]) -> dict[str, dict[str, object]]:
    params: dict[str, dict[str, object]] = {}
    for method, param, value in settings:
        params.setdefault(method, {})[param] = value
    return params


def _training_config(args: argparse.Namespace, scenario: str | None = None) -> object:
    from ewc.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        hidden=args.hidden,
        dropout=args.dropout,
        scenario=scenario,
        params=_params(args.set),
        lam=args.lam,
        l2_lam=args.l2_lam,
        gamma=args.gamma,
        fisher=args.fisher,
        fisher_samples=args.fisher_samples,
        eval_every=args.eval_every,
        curve_samples=args.curve_samples,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        progress=False if args.quiet else None,
    )


def _method_names(text: str) -> list[str]:
    from ewc.methods import METHODS

    if text.strip() == "all":
        return list(METHODS)
    return [m.strip() for m in text.split(",") if m.strip()]


def _sequence_options(args: argparse.Namespace) -> dict[str, object]:
    """The keyword options ``ewc run`` and ``ewc compare`` both hand to the sequence runner."""
    return {
        "lam_grid": args.select_lam,
        "l2_lam_grid": args.select_l2_lam,
        "search": args.search,
        "save_state": args.save_state,
        "max_train_per_task": args.max_train_per_task,
        "data_root": args.data_root,
        "jobs": args.jobs,
    }


def _cmd_compare(args: argparse.Namespace) -> int:
    from ewc.experiments.compare import run_compare

    summary = run_compare(
        args.sequence,
        args.data,
        args.tasks,
        _method_names(args.methods),
        list(args.scenarios),
        _training_config(args),
        args.out,
        **_sequence_options(args),
    )
    print(summary["table"])
    print(f"report: {Path(args.out) / 'comparison.md'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ewc.experiments.sequence import run_sequence

    config = _training_config(args, args.scenario)
    methods = _method_names(args.methods)
    results = run_sequence(
        args.sequence,
        args.data,
        args.tasks,
        methods,
        config,
        args.out,
        **_sequence_options(args),
    )
    print(f"{'method':<12} {'ACC':>6} {'BWT':>7} {'forget':>7} {'seconds':>8}")
    for name, r in results["methods"].items():
        acc, bwt, fgt, sec = r["average_accuracy"], r["bwt"], r["forgetting"], r["seconds"]
        print(f"{name:<12} {acc:6.3f} {bwt:7.3f} {fgt:7.3f} {sec:8.1f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ewc.report import compare_runs, load_results, write_report

    if len(args.runs) == 1:
        paths = write_report(load_results(args.runs[0]), args.runs[0])
        print(f"report: {paths.get('report.md', Path(args.runs[0]) / 'report.md')}")
        return 0
    print(compare_runs(args.runs, args.out))
    return 0


def _run_module(module: ModuleType, args: argparse.Namespace) -> int:
    """Build ``module.Config`` from the parsed flags, run it into ``--out``, print the findings."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(module.Config)}
    record = module.run(module.Config(**values), args.out)
    for line in record.get("findings", []):
        print(f"- {line}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ewc.experiments import get_experiment

    return _run_module(get_experiment(args.experiment), args)


def _cmd_stream(args: argparse.Namespace) -> int:
    from ewc.experiments import stream

    return _run_module(stream, args)


def _cmd_rl(args: argparse.Namespace) -> int:
    from ewc.experiments import rl

    return _run_module(rl, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ewc`` command; errors in the input become one clear line, exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ewc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ewc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
