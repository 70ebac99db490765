"""``normlab lab list | run | report``: rerun the batch-norm papers' experiments and write the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path("lab-report")


def _experiments(names: list[str]):
    from normlab.lab.experiments import EXPERIMENTS

    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s): {', '.join(unknown)}; `normlab lab list` shows the names")
    return [EXPERIMENTS[n] for n in names] if names else list(EXPERIMENTS.values())


def cmd_list(args: argparse.Namespace) -> int:
    from normlab.lab.experiments import EXPERIMENTS

    width = max(len(n) for n in EXPERIMENTS)
    for exp in EXPERIMENTS.values():
        print(f"{exp.name:<{width}}  {exp.title}  [{exp.paper}]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.nproc is not None:  # the data-parallel training, launched with torchrun
        from normlab.lab.ddp import lab_run

        return lab_run(args)
    from normlab.lab.data import DataError
    from normlab.lab.engine import LabSettings, run_lab
    from normlab.lab.report import write_report

    experiments = _experiments(args.experiments)
    settings = LabSettings(out=args.out, suite=args.suite, data_dir=args.data_dir, device=args.device,
                           seed=args.seed, force=args.force, seeds=args.seeds)
    try:
        outcome = run_lab(experiments, settings)
    except (DataError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    html_path, md_path = write_report(args.out, _experiments([]))
    for name, summary in outcome.summaries.items():
        print(f"{name:<14} {summary['verdict']}")
    print(f"report: {html_path} and {md_path}")
    print(f"{outcome.ran} run(s) trained, {outcome.reused} reused; wall time {outcome.seconds:.1f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.lab.report import write_report

    try:
        html_path, md_path = write_report(args.out, _experiments([]), redecide=not args.saved_verdicts)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {html_path} and {md_path}; README table: {args.out / 'readme-table.md'}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``list``, ``run`` and ``report`` subcommands to ``parser``; each sets ``func``."""
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    sub = parser.add_subparsers(dest="lab_command", metavar="{list,run,report}")

    p_list = sub.add_parser("list", help="the experiments and the papers they reproduce")
    p_list.set_defaults(func=cmd_list)

    p_run = sub.add_parser("run", help="run experiments (all by default) and write the report")
    p_run.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="names from `normlab lab list`")
    p_run.add_argument("--suite", choices=("quick", "standard", "full", "smoke"), default="quick",
                       help="quick: one seed, minutes on 2 CPU cores, verdicts indicative; standard: the quick "
                            "budgets over 5 paired seeds, every verdict from a 95%% confidence interval; full: "
                            "longer runs, wider nets, all data, 5 seeds; smoke: seconds, tiny data, to check the "
                            "setup (default quick)")
    p_run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p_run.add_argument("--data-dir", type=Path, default=None,
                       help="folder with the Fashion-MNIST idx files and/or CIFAR-10 python batches "
                            "(default: /usr/share/datasets/fashion-mnist from the dataset-fashion-mnist package)")
    p_run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto picks CUDA when torch sees it (default auto)")
    p_run.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p_run.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="paired seeds seed..seed+N-1, every arm once per seed (default: 1 for smoke and quick, "
                            "5 for standard and full)")
    p_run.add_argument("--force", action="store_true", help="redo runs even when a finished result matches")
    p_run.set_defaults(func=cmd_run)
    p_run.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="instead of experiments: train the lab's CNN data-parallel (DDP + SyncBatchNorm) in N "
                            "local processes under torchrun, at the suite's size; writes OUT/ddp-N.json")

    p_report = sub.add_parser("report", help="render the report from the results already under --out")
    p_report.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p_report.add_argument("--saved-verdicts", action="store_true",
                          help="render the verdicts as saved by the run instead of deciding them afresh from the "
                               "saved runs with the current criteria (the default)")
    p_report.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab lab", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
