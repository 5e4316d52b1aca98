"""Prefect flow `finetune`: the DVC-versioned mix → validate → base → tokenize → train → evaluate →
sampling-report → register, in a run directory of its own (`runs/<flow-run-name>/`).

Thin by design: each task calls the same stage function as `orca8k <stage>` and `dvc repro`, and passes paths and
small results. Run-directory set-up, the DVC mix and the content keys live in `orca8k.orchestration`.

    python flows/pipeline.py                       # one local run with the demo defaults
    python flows/deploy.py                         # serve the deployment; trigger it from the UI
    prefect deployment run finetune/demo -p learning_rate=3e-4 -p run_name=lr3e-4
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from orca8k.config import load_config
from orca8k.layout import repo_root
from orca8k.orchestration import (
    cache_dir,
    host_concurrency_name,
    is_transient_failure,
    knob_overrides,
    outputs_exist,
    prepare_run,
    reproduce_mix,
    stage_cache_policy,
    stage_fingerprint,
)
from orca8k.stages import run_stage


def _repo() -> Path:
    """The repository the flow works in: the nearest ancestor of the working directory with dvc.yaml/.git
    (deployments set the working directory to the repository)."""
    return repo_root(Path.cwd())


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Content key of a stage task: stage + scope + hash of its params keys and deps content (dvc.yaml's).

    `scope` is the run name for per-run stages (a flow retry of the same run reuses finished tasks) and "shared"
    for outputs reusable across runs by content (the demo base)."""
    cfg = load_config(parameters["params_file"])
    return f"{parameters['stage']}-{parameters['scope']}-{stage_fingerprint(parameters['stage'], cfg, _repo())}"


@task(persist_result=True, result_serializer="json")
def stage_task(stage: str, params_file: str, scope: str) -> dict[str, Any]:
    """Run one pipeline stage on a run's params file; returns the stage's outputs and summary (paths, numbers)."""
    result = run_stage(stage, load_config(params_file))  # train with several processes: its launcher, supervised
    get_run_logger().info(result.describe())
    return result.to_dict()


@task(retries=1, retry_delay_seconds=5)
def mix_task() -> dict[str, Any]:
    """Bring the DVC-versioned mix up to date (`dvc repro mix` via DVC's API) and return its path and hash."""
    return reproduce_mix(_repo())


def _ensure_host_limit() -> str:
    """The global concurrency limit `train-<host>` (1 slot) exists; returns its name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = host_concurrency_name()
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    return name


def _run(stage: str, params_file: Path, scope: str, retries: int = 0) -> dict[str, Any]:
    """One stage task: cached by content (SERIALIZABLE: concurrent runs needing the same key compute it once),
    results beside the outputs in `runs/.prefect/`, retried only on transient failures (network, MLflow server)."""
    repo = _repo()
    opts = stage_task.with_options(
        name=stage,
        cache_policy=stage_cache_policy(stage_cache_key, repo),
        result_storage=cache_dir(repo) / "results",
        retries=retries,
        retry_delay_seconds=5,
        retry_condition_fn=is_transient_failure,
    )
    result = opts(stage, str(params_file), scope)
    if not outputs_exist(result["outputs"]):  # a cached result whose files were deleted: recompute
        result = opts.with_options(refresh_cache=True)(stage, str(params_file), scope)
    return result


@flow(name="finetune", log_prints=True, persist_result=True)
def finetune(
    params_file: str = "params.yaml",
    learning_rate: float | None = None,
    num_train_epochs: float | None = None,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    max_length: int | None = None,
    rope_factor: float | None = None,
    pretrain_max_steps: int | None = None,
    fractions: dict[str, float] | None = None,
    overrides: dict[str, Any] | None = None,
    run_name: str | None = None,
) -> dict[str, Any]:
    """Fine-tune with linear RoPE scaling and register the model, in `runs/<run_name>/`.

    Args:
        params_file: params YAML, relative to the repository (the demo's `params.yaml` or a recipe).
        learning_rate: peak learning rate (`train.learning_rate`); empty keeps the file's.
        num_train_epochs: epochs (`train.num_train_epochs`).
        max_steps: optimiser steps, overrides epochs when > 0 (`train.max_steps`).
        max_seconds: wall-clock budget of the fine-tuning in seconds (`train.max_seconds`).
        max_length: tokens per training row (`tokenize.max_length`), at most native context × RoPE factor.
        rope_factor: linear RoPE scaling factor (`model.rope_scaling.factor`).
        pretrain_max_steps: steps of the demo base's pre-training (`base.pretrain.max_steps`).
        fractions: share of train rows drawn per source, e.g. {"red_pajama": 0.25} (`data.sources.<s>.fraction`);
            changing the mix makes the run build its own mix instead of the DVC-versioned one.
        overrides: any other params keys, dotted, as with `orca8k --set`: {"train.warmup_steps": 50}.
        run_name: the run directory's name (default: the flow run's name).

    Returns:
        Paths, the mix hash, eval summary and the registry decision.
    """
    logger = get_run_logger()
    name = run_name or flow_run.get_name() or time.strftime("run-%Y%m%d-%H%M%S")
    knobs = dict(learning_rate=learning_rate, num_train_epochs=num_train_epochs, max_steps=max_steps,
                 max_seconds=max_seconds, max_length=max_length, rope_factor=rope_factor,
                 pretrain_max_steps=pretrain_max_steps)
    all_overrides = {**knob_overrides(knobs, fractions), **(overrides or {})}
    repo = _repo()
    spec = prepare_run(params_file, all_overrides, name, repo)
    logger.info(f"run {name}: {spec.root} (overrides {all_overrides})")

    if spec.uses_dvc_mix:
        mix = mix_task()
        mix_hash = mix["md5"]
    else:
        out = _run("mix", spec.params_file, name)
        mix_hash = "run-local"
        mix = {"path": out["outputs"].get("mix", str(spec.config.paths.resolve("mix"))), "md5": mix_hash}
    _run("validate", spec.params_file, name)
    base = _run("base", spec.params_file, "shared", retries=2 if spec.config.base.model_name_or_path else 0)
    base_dir = Path(base["outputs"].get("base", spec.config.paths.resolve("base")))
    if base_dir.resolve() != spec.config.paths.resolve("base"):  # reused by content from another run
        spec = prepare_run(params_file, all_overrides, name, repo, shared_paths={"base": base_dir})
    _run("tokenize", spec.params_file, name)
    with concurrency(_ensure_host_limit(), occupy=1, strict=True):
        train = _run("train", spec.params_file, name)
    evaluate = _run("evaluate", spec.params_file, name)
    sampling = _run("sampling-report", spec.params_file, name)
    register = _run("register", spec.params_file, name, retries=2)
    summary = _publish(name, spec.root, evaluate, register, train)
    return {"run_name": name, "run_dir": str(spec.root), "mix": mix, "sampling": sampling["outputs"], **summary}


def _publish(name: str, root: Path, evaluate: dict[str, Any], register: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """Prefect artifacts: the eval table, the gate decision and links to the MLflow run and model version."""
    cfg = load_config(root / "params.yaml")
    from orca8k.layout import Layout

    layout = Layout.from_config(cfg)
    eval_metrics = json.loads(layout.eval_metrics.read_text()) if layout.eval_metrics.is_file() else {}
    rows = [{"source": s, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}}
            for s, m in eval_metrics.get("eval", {}).items()]
    context = eval_metrics.get("context", {})
    if context:
        rows.append({"source": "context (fine-tuned)", "ppl_1x": context.get("ppl_1x"), "ppl_2x": context.get("ppl_2x"),
                     "ppl_ratio_2x_over_1x": context.get("ppl_ratio_2x_over_1x")})
    key = "".join(c if c.isalnum() else "-" for c in name.lower())[:60]
    if rows:
        create_table_artifact(key=f"eval-{key}", table=rows, description=f"Evaluation of run {name}")
    reg = json.loads(layout.register_metrics.read_text()) if layout.register_metrics.is_file() else {}
    run_info = json.loads(layout.train_run.read_text()) if layout.train_run.is_file() else {}
    lines = [f"# Run `{name}`", "", f"- run directory: `{root}`"]
    if run_info:
        lines.append(f"- MLflow run: `{run_info.get('run_id')}` at `{run_info.get('tracking_uri')}`"
                     + (f" — {run_info['run_url']}" if run_info.get("run_url") else ""))
    for k in ("model_name", "version", "model_uri", "decision", "promoted", "aliases", "reasons", "version_url"):
        if k in reg:
            lines.append(f"- {k}: {reg[k]}")
    create_markdown_artifact(key=f"registry-{key}", markdown="\n".join(lines), description=f"Registry decision of run {name}")
    return {"eval": eval_metrics.get("context", {}), "register": reg, "train_outputs": train.get("outputs", {})}


if __name__ == "__main__":  # pragma: no cover
    print(finetune())
