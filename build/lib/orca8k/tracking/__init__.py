"""MLflow tracking: the only module that imports mlflow (lazily, so importing it is cheap).

One MLflow run belongs to one training output. `train` creates it inside `train_run(cfg, layout)` and writes its
id to `layout.train_run` (and `layout.checkpoint_run`, beside the persisted checkpoints); a resumed `train`
re-attaches to the same run by that id, and every later stage re-attaches with `attach_run(cfg, layout)` — across
processes, ranks (only rank 0 talks to MLflow; other ranks get a `NullRun` that does nothing) and resumes.
Never one run per rank, never a new run on resume.

    with tracking.train_run(cfg, layout) as run:             # train
        trainer.add_callback(tracking.MlflowCurvesCallback(run))
        ...
    with tracking.attach_run(cfg, layout, stage="evaluate") as run:
        run.log_metrics({"eval/orca-chat/eval_loss": 1.9}, step=3319)

Where: `MLFLOW_TRACKING_URI` wins; otherwise `tracking.tracking_uri` from params, where a relative
`sqlite:///mlflow.db` (or a relative file store) resolves against the repository root (the nearest ancestor of the
working directory holding `dvc.yaml` or `.git`), and a new experiment stores artifacts under
`tracking.artifact_location` (repo-relative). Everything logged goes through `orca8k.redaction` first.

This package is the only code that imports mlflow: `store` (URIs, ranks, retries, the client), `runs` (run
handles, `train_run`, `attach_run`, params), `callback` (`MlflowCurvesCallback`, built on first use so importing
`orca8k.tracking` does not import transformers) and `registry` (logging a checkpoint folder, versions, aliases,
the gate lock, resolving `models:/` URIs). `orca8k.registry` holds the registry's logic (lineage, gate, card) and
never imports mlflow.
"""

from __future__ import annotations

from typing import Any

from orca8k.tracking.runs import (
    PARAMS_HASH_TAG,
    RESOLVED_PARAMS_ARTIFACT,
    STAGE_TAG,
    NullRun,
    RunHandle,
    attach_run,
    config_params,
    current_run,
    log_artifact,
    log_artifacts,
    log_metrics,
    read_run_file,
    train_run,
    write_run_file,
)
from orca8k.tracking.store import (
    Store,
    client,
    connect,
    process_rank,
    repo_root,
    resolve_artifact_location,
    resolve_tracking_uri,
    with_retries,
)

__all__ = [
    "PARAMS_HASH_TAG", "RESOLVED_PARAMS_ARTIFACT", "STAGE_TAG", "MlflowCurvesCallback", "NullRun", "RunHandle",
    "Store", "attach_run", "client", "config_params", "connect", "current_run", "log_artifact", "log_artifacts",
    "log_metrics", "process_rank", "read_run_file", "repo_root", "resolve_artifact_location", "resolve_model_dir",
    "resolve_tracking_uri", "train_run", "with_retries", "write_run_file",
]


def resolve_model_dir(cfg: Any, model_uri: str, cache_dir: Any = None):
    """See `orca8k.tracking.registry.resolve_model_dir` (a local HF folder for `models:/<name>@<alias>`)."""
    from orca8k.tracking.registry import resolve_model_dir as _resolve

    return _resolve(cfg, model_uri, cache_dir)


def __getattr__(name: str) -> Any:
    # built on first use: importing orca8k.tracking must not import transformers
    if name == "MlflowCurvesCallback":
        from orca8k.tracking.callback import MlflowCurvesCallback

        return MlflowCurvesCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

