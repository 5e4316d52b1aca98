"""`orca8k` command line: one subcommand per stage plus `demo-data`, `fetch-data`, `plan` and `generate`.

    orca8k <stage> [--params FILE] [--set dotted.key=value ...]     stage in: mix validate base tokenize train
                                                                     evaluate sampling-report register
    orca8k demo-data | fetch-data [--limit N] | plan                 (same --params / --set)
    orca8k generate --model DIR|models:/<name>@<alias> "prompt" ...

Exit status: 0 ok, 1 a stage or data error (message printed, no traceback), 2 a config or usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from orca8k.errors import ConfigError, Orca8kError
from orca8k.stages import STAGES, run_stage


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key, e.g. --set train.learning_rate=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orca8k", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        _add_config_args(p)
        p.add_argument("--json", action="store_true", help="print the stage result as JSON on the last line")
    p = sub.add_parser("demo-data", help="write the deterministic demo sources into paths.data")
    _add_config_args(p)
    p = sub.add_parser("fetch-data", help="download the hub sources (pinned revisions) into paths.data")
    _add_config_args(p)
    p.add_argument("--limit", type=_positive_int, default=None, help="rows per source (a smoke slice)")
    p = sub.add_parser("plan", help="validate a params file and print the derived facts (no data or GPU needed)")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p = sub.add_parser("generate", help="generate in the OA format from a model dir or models:/<name>@<alias>")
    _add_config_args(p)
    p.add_argument("--model", default=None, help="model dir or MLflow URI (default: paths.model)")
    p.add_argument("--system", default=None, help="system prompt (v3 format)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="tokens to generate at most (≥ 1; default: sampling.max_new_tokens, else the sampling config's)")
    p.add_argument("--config", dest="sampling_config", default="greedy", help="a sampling config name from sampling.config_file")
    p.add_argument("prompts", nargs="+", help="user prompts")
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (argparse prints the message and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not ≥ 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from orca8k.config import load_config

        cfg = load_config(args.params, args.overrides)
        if args.command in STAGES:
            result = run_stage(args.command, cfg)
            if os.environ.get("RANK", "0") == "0":  # under torchrun/deepspeed only rank 0 reports
                print(result.describe(), flush=True)
                if args.json:
                    print(json.dumps(result.to_dict()))
        elif args.command == "plan":
            from orca8k.plan import format_plan, make_plan

            facts = make_plan(cfg)
            print(json.dumps(facts, indent=2) if args.json else format_plan(facts))
        elif args.command == "demo-data":
            from orca8k.data.demo import write_demo_data

            start = time.perf_counter()
            written = write_demo_data(cfg)
            for name, path in written.items():
                print(f"[demo-data] wrote {name}: {path}")
            print(f"[demo-data] done in {time.perf_counter() - start:.1f} s")
        elif args.command == "fetch-data":
            from orca8k.data.fetch import fetch_data

            fetch_data(cfg, limit=args.limit)
        elif args.command == "generate":
            from orca8k.generate import generate_cli

            generate_cli(cfg, args)
    except ConfigError as err:
        print(f"orca8k: config error: {err}", file=sys.stderr)
        return 2
    except Orca8kError as err:
        print(f"orca8k {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
