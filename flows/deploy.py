"""Serve the `finetune` deployments on a Prefect server (local: SQLite), so runs are triggered from the UI.

    prefect server start --host 127.0.0.1                  # terminal 1: API + UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deploy.py   # terminal 2: serve (run from the repo root)
    prefect deployment run finetune/demo -p learning_rate=3e-4 -p run_name=lr-3e-4 --watch

`flow.serve` runs flow runs as subprocesses of this process, in the repository (the working directory). For a
work pool (process locally, Kubernetes with a GPU job template on a cluster) use `prefect deploy` with prefect.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import finetune  # noqa: E402
from prefect import serve  # noqa: E402

DEPLOYMENTS = {
    "demo": {"params_file": "params.yaml"},
    "recipe": {"params_file": "recipes/llama2-13b-orca-8k.yaml"},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["demo"], choices=sorted(DEPLOYMENTS), help="deployments to serve")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs of this server process")
    args = parser.parse_args(argv)
    deployments = [
        finetune.to_deployment(
            name=name,
            parameters=DEPLOYMENTS[name],
            tags=["orca8k", name],
            description=f"orca8k fine-tuning ({DEPLOYMENTS[name]['params_file']}); override any knob in the run form.",
        )
        for name in args.names
    ]
    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    main()
