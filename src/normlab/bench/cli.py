"""The ``normlab bench`` command: its options and the handler that runs the selected benchmark."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

from normlab.bench.cases import default_cases, quick_cases, select
from normlab.bench.models import default_model_cases, quick_model_cases, run_models, train_step
from normlab.bench.report import format_models, format_table, render, report
from normlab.bench.timing import (COMPILE, DEFAULT_REPEATS, DEFAULT_STEP_REPEATS, DEFAULT_WARMUP, IMPLEMENTATIONS,
                                  Implementation, run_cases)

__all__ = ["configure", "peers", "run"]


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` and make :func:`run` its handler."""
    parser.description = (
        "Time normlab's layers against torch.nn side by side (same run, interleaved, median of repeats) "
        "after checking that they give the same answers."
    )
    parser.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                        help="torch.set_num_threads(N) for the run (default: torch's current setting)")
    parser.add_argument("--repeats", type=_at_least(1), default=None, metavar="N",
                        help=f"timed repeats per case; the median is reported "
                             f"(default {DEFAULT_REPEATS}; 1 with --quick)")
    parser.add_argument("--warmup", type=_at_least(0), default=None, metavar="N",
                        help=f"untimed repeats before timing, after the checked call "
                             f"(default {DEFAULT_WARMUP}; 0 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and a single repeat: a smoke run of a second or two")
    parser.add_argument("--filter", action="append", metavar="SUBSTR",
                        help="only the cases whose 'module shape layout mode' contains SUBSTR "
                             "(case-insensitive; repeat to require several), e.g. --filter BatchNorm2d "
                             "--filter channels_last")
    parser.add_argument("--json", action="store_true",
                        help="print the raw records as a JSON list instead of the table")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--variants", action="store_true",
                        help="time BatchNorm's variants instead (ghost BN, batch renormalization, masked BN) against "
                             "their torch.nn compositions and against normlab's plain BatchNorm on the same input")
    parser.add_argument("--models", action="store_true",
                        help="time whole training steps and eval passes of real architectures (ResNet-18/50, "
                             "MobileNet, the lab CNN, a Transformer block) built from torch.nn, converted to normlab, "
                             "and converted with fusion, with torch.profiler's normalization share; --threads picks "
                             "one thread count (default: 1 and 2), --filter rows by 'model bBATCH layout Nt mode'")
    parser.add_argument("--render", metavar="FILE",
                        help="print the table of records saved earlier with --json (from any machine) and exit; "
                             "nothing is timed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the tensors live (default cpu); cuda needs a GPU build of torch and a GPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add the torch.compile peer, compiled once per case, compile time not timed "
                             "(default: on, off with --quick)")
    parser.add_argument("--cnn", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a training step of normlab.demo.small_cnn, normlab vs torch.nn layers "
                             "(default: on, off with --quick or --filter)")
    parser.set_defaults(func=run)


def peers(args: argparse.Namespace) -> tuple[tuple[Implementation, ...], bool]:
    """The implementations to time and whether to time the CNN training step, from the options:
    torch.compile and the CNN are on by default and off with ``--quick`` (the CNN also with ``--filter``)."""
    compiled = args.compile if args.compile is not None else not args.quick
    cnn = args.cnn if args.cnn is not None else not (args.quick or args.filter)
    return ((*IMPLEMENTATIONS, COMPILE) if compiled else IMPLEMENTATIONS), cnn


def run(args: argparse.Namespace) -> int:
    """Run ``normlab bench``; returns 1 if any case gave a MISMATCH (or none was selected), else 0."""
    if args.render:
        return render(args.render)
    if args.variants:
        return _run_variants(args)
    if args.models:
        return _run_models(args)
    cases = select(quick_cases() if args.quick else default_cases(), args.filter)
    done = _empty_or_listed(cases, args, "case")
    if done is not None:
        return done
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"normlab bench: --device cuda, but torch {torch.__version__} sees no CUDA device here "
              f"(torch.cuda.is_available() is False). Run it on a machine with a GPU and a CUDA build of "
              f"torch, or use --device cpu.", file=sys.stderr)
        return 2
    repeats, warmup = _repeats_warmup(args)
    implementations, cnn = peers(args)
    start = time.perf_counter()
    records = run_cases(cases, repeats=repeats, warmup=warmup, implementations=implementations,
                        threads=args.threads, device=args.device, progress=True)
    step = train_step(threads=args.threads, device=args.device,
                      repeats=max(repeats, 1 if args.quick else DEFAULT_STEP_REPEATS)) if cnn else None
    if args.json:
        print(json.dumps(records + ([step] if step else []), indent=1))
    else:
        print(report(records, implementations, [step] if step else []))
        print(f"\n{len(records)} cases in {time.perf_counter() - start:.1f} s")
    return _exit_status(records, "case(s)", f"their answers differ from {IMPLEMENTATIONS[1].name}")


def _empty_or_listed(cases, args: argparse.Namespace, what: str) -> int | None:
    """The exit status where the selected ``cases`` end the command (none matched ``--filter``: 1; ``--list``
    printed their keys: 0), else None."""
    if not cases:
        print(f"normlab bench: no {what} matches {args.filter}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(c.key for c in cases))
        return 0
    return None


def _run_variants(args: argparse.Namespace) -> int:
    """``normlab bench --variants`` (see :mod:`normlab.bench.variants`); 1 on a MISMATCH or no case selected."""
    from normlab.bench import variants

    cases = select(variants.quick_cases() if args.quick else variants.default_cases(), args.filter)
    done = _empty_or_listed(cases, args, "variant case")
    if done is not None:
        return done
    repeats, warmup = _repeats_warmup(args)
    records = run_cases(cases, repeats=repeats, warmup=warmup, implementations=variants.IMPLEMENTATIONS,
                        threads=args.threads, device=args.device, progress=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_table(records, variants.IMPLEMENTATIONS))
        print("\n" + variants.summary(records))
    return _exit_status(records, "variant case(s)", "their answers differ from the torch.nn composition")


def _run_models(args: argparse.Namespace) -> int:
    """``normlab bench --models`` (see :mod:`normlab.bench.models`); 1 on a MISMATCH or no row selected."""
    threads = (args.threads,) if args.threads else (1,) if args.quick else (1, 2)
    cases = quick_model_cases(threads) if args.quick else default_model_cases(threads)
    cases = select(cases, args.filter)
    done = _empty_or_listed(cases, args, "model row")
    if done is not None:
        return done
    repeats, warmup = _repeats_warmup(args)
    start = time.perf_counter()
    records = run_models(cases, repeats=repeats, warmup=warmup, quick=args.quick, progress=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_models(records))
        print(f"\n{len(records)} rows in {time.perf_counter() - start:.1f} s")
    return _exit_status(records, "model row(s)", "normlab's outputs differ from torch.nn's")


def _repeats_warmup(args: argparse.Namespace) -> tuple[int, int]:
    """The timed and untimed repeats per case: as given, else 1 and 0 with ``--quick``, else the defaults."""
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else DEFAULT_REPEATS
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else DEFAULT_WARMUP
    return repeats, warmup


def _exit_status(records: list[dict], what: str, why: str) -> int:
    """1 (after saying so on stderr) if any record's answers did not match its peer's, else 0."""
    mismatches = sum(r["status"] != "ok" for r in records)
    if mismatches:
        print(f"normlab bench: {mismatches} {what} MISMATCH: {why}", file=sys.stderr)
    return 1 if mismatches else 0
