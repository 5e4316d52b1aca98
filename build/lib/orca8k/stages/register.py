"""Stage `register`: record the run's evidence in MLflow, register the checkpoint, and gate it to `champion`.

Reads (all written upstream; nothing is recomputed): `layout.model` (the checkpoint folder), `layout.train_run`
(the MLflow run to re-attach), `layout.eval_metrics`, `layout.sampling_reports` (+ `summary.json`),
`layout.validation_result` (+ Data Docs), `layout.mix_manifest`, `layout.mix_val` (its hash is the gate's
comparability key), `layout.tokenize_metrics`, `layout.train_metrics`, the DeepSpeed config named by the run's
param `train.deepspeed`, the sampling configuration file (OA decoding defaults), and `data.dvc` / `dvc.lock` for
the data and mix hashes. Params read: `tracking.*`, `register.*`, `sampling.config_file`; the recipe in the model
card comes from the training run's logged params.

Steps:
1. Re-attach to the training run; log the artifacts (mix manifest, validation result + Data Docs, token stats,
   train/eval JSON + plots, sampling reports, DeepSpeed config), every eval metric at the final step, lineage tags,
   and `mlflow.log_input` of the mix with its DVC hash as digest.
2. Log the model from the checkpoint folder (transformers flavor, `text-generation`, safetensors, dtype as
   trained, the OA tokenizer, the RoPE settings in its config) with a model card and `generation_config.json`,
   register it under `register.model_name` with lineage + evidence tags and alias `candidate` — once per run.
3. The gate (`orca8k.registry.gate`) decides, under a lock, whether alias `champion` moves (compare-and-set).
4. Write `layout.register_metrics` (version, aliases, decision, reasons) and the side-by-side HTML of this
   version's sampling outputs vs the champion's (`layout.register_side_by_side`), also logged to the run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from orca8k import tracking
from orca8k.config import Config
from orca8k.errors import RegistryError
from orca8k.layout import Layout, repo_file
from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PROMPTER
from orca8k.redaction import flatten, redact_text, redact_tree, redact_uri
from orca8k.registry import card, compare, lineage
from orca8k.registry.gate import Evidence
from orca8k.registry.promote import ensure_version, promote
from orca8k.stages import StageResult
from orca8k.tracking import registry as reg

# Serving template (pyfunc / `mlflow models serve`): the OA v3 prompt without a system block.
PROMPT_TEMPLATE = f"{BOS}{PROMPTER}{{prompt}}{EOS}{ASSISTANT}"
MIX_DATASET = "orca8k-mix"


def run_artifacts(layout: Layout, params: dict[str, str], repo: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(existing (path, artifact folder) pairs to log, missing paths) for the run's evidence files."""
    wanted: list[tuple[Path, str]] = [
        (layout.mix_manifest, "mix"),
        (layout.validation_result, "validation"),
        (layout.data_docs, "validation/data_docs"),
        (layout.tokenize_metrics, "tokenize"),
        (layout.train_metrics, "train"),
        (layout.eval_metrics, "eval"),
        (layout.ppl_vs_context, "eval"),
        (layout.passkey, "eval"),
        (layout.eval_reports, "eval/plots"),
        (layout.sampling_reports, "sampling"),
    ]
    deepspeed = params.get("train.deepspeed")
    if deepspeed not in (None, "", "None", "null"):
        path = Path(deepspeed)
        wanted.append((path if path.is_absolute() else repo / path, "deepspeed"))
    present = [(p, a) for p, a in wanted if p.exists()]
    missing = [str(p) for p, _ in wanted if not p.exists()]
    return present, missing


def _final_step(layout: Layout) -> int:
    """The training's last optimizer step (`global_step` of `layout.train_metrics`), 0 when unknown."""
    try:
        data = json.loads(layout.train_metrics.read_text(encoding="utf-8"))
        return int(data.get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _champion_report(run_handle_uri: str, champion: reg.VersionInfo | None, this_run: str, tmp: Path):
    """(report folder contents, label) of the champion's sampling report, or (None, why-not)."""
    if champion is None:
        return None, "no champion yet"
    if champion.run_id == this_run:
        return None, f"v{champion.version} (this run)"
    try:
        folder = tracking.RunHandle(champion.run_id, "", run_handle_uri).download("sampling", tmp)
        return compare.read_report_folder(folder), f"v{champion.version} (champion)"
    except Exception as err:  # noqa: BLE001 - a champion without a report still gets a page saying so
        return None, f"v{champion.version} (champion; no sampling report: {type(err).__name__})"


def run(cfg: Config) -> StageResult:
    """Register the trained model and run the promotion gate (see the module docstring).

    Raises:
        StageInputMissing: an upstream output is missing (the message names it and the stage to run).
        DataError: an upstream JSON lacks a contract field (file and field named).
        RegistryError: MLflow is unreachable after retries (nothing half-registered is left), or inconsistent.
    """
    layout = Layout.from_config(cfg)
    name = cfg.register_.model_name
    repo = tracking.repo_root()
    # inputs first: fail before touching the store
    facts = lineage.model_facts(layout.model)
    validation = lineage.ValidationStatus.read(layout.validation_result)
    eval_metrics = lineage.read_json(layout.eval_metrics, "evaluate")
    summary = lineage.read_json(layout.sampling_summary, "sampling-report")
    manifest = lineage.read_json(layout.mix_manifest, "mix") if layout.mix_manifest.is_file() else None
    gen_config = card.generation_config(layout.model, repo_file(cfg.sampling.config_file))

    with tracking.attach_run(cfg, layout, stage="register") as run:
        if not run.active:
            return StageResult(stage="register", summary={"skipped": f"rank {tracking.process_rank()}"})
        store = tracking.connect(run.tracking_uri)
        params = run.params()
        if "train.learning_rate" not in params:
            raise RegistryError(f"run {run.run_id} has no orca8k params: was it created by `orca8k train`?")
        tags = lineage.lineage_tags(repo, layout, run.run_id, params, run.tags(), validation, facts)
        evidence = Evidence.from_outputs(eval_metrics, layout.eval_metrics, summary, layout.sampling_summary,
                                         validation.success, tags["lineage.val_set_sha256"])
        # 1. the run's records
        present, missing = run_artifacts(layout, params, repo)
        for path, folder in present:
            run.log_artifact(path, folder)
        step = _final_step(layout)
        logged = run.metric_keys()
        eval_flat = flatten({k: v for k, v in eval_metrics.items() if k in ("eval", "context", "passkey")}, sep="/")
        run.log_metrics({k: v for k, v in eval_flat.items() if k not in logged}, step=step)
        digest, kind = lineage.mix_digest(tags)
        if (MIX_DATASET, digest[:36]) not in run.dataset_digests():
            run.log_dataset(MIX_DATASET, digest, layout.mix, "training", {"orca8k.digest_kind": kind,
                                                                          "orca8k.val_set_sha256": tags["lineage.val_set_sha256"]})
        run.set_tags(tags)
        # 2. the version (once per run)
        card_text = redact_text(card.model_card(model_name=name, run_id=run.run_id, params=params, lineage=tags, manifest=manifest,
                                    eval_metrics=eval_metrics, sampling_summary=summary,
                                    base_license=cfg.register_.base_license, facts=facts))  # never a secret
        extra = {"README.md": card_text, "generation_config.json": json.dumps(gen_config, indent=2) + "\n"}
        defaults = {k: gen_config[k] for k in card.GENERATION_KEYS if k in gen_config}

        def log_model() -> tuple[str, str]:
            return reg.log_model_from_dir(run, layout.model, extra_files=extra, card_text=card_text,
                                          dtype=facts["dtype"], prompt_template=PROMPT_TEMPLATE,
                                          generate_defaults=defaults)

        registered = ensure_version(store, name, run.run_id, tags, log_model)
        version = registered.version
        # 3. the gate
        decision, before = promote(store, name, version, evidence, cfg.register_.gate)
        # 4. reports
        layout.register_reports.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="orca8k-champion-") as tmp:
            champ_report, champ_label = _champion_report(run.tracking_uri, before, run.run_id, Path(tmp))
            page, counts = compare.side_by_side_html(
                compare.read_report_folder(layout.sampling_reports), f"{name} v{version.version} (candidate)",
                champ_report, champ_label, decision.outcome, decision.reasons,
            )
        layout.register_side_by_side.write_text(page, encoding="utf-8")
        layout.register_model_card.write_text(card_text, encoding="utf-8")
        report_artifact = f"register/v{version.version}"
        run.log_artifact(layout.register_side_by_side, report_artifact)
        reg.set_version_tags(store, name, version.version, {
            "orca8k.side_by_side": f"runs:/{run.run_id}/{report_artifact}/{layout.register_side_by_side.name}"})
        final = reg.get_version(store, name, version.version)
        champion = reg.alias_version(store, name, reg.CHAMPION)
        result = {
            "model_name": name,
            "version": int(version.version),
            "model_uri": f"models:/{name}/{version.version}",
            "run_id": run.run_id,
            "created": registered.created,
            "aliases": sorted(final.aliases),
            "decision": decision.outcome,
            "promoted": decision.outcome in ("promoted", "already_champion"),
            "reasons": decision.reasons,
            "champion_before": int(before.version) if before else None,
            "champion": int(champion.version) if champion else None,
            "side_by_side": counts,
            **({"version_url": f"{redact_uri(run.tracking_uri).rstrip('/')}/#/models/{name}/versions/{version.version}"}
               if run.tracking_uri.startswith(("http://", "https://")) else {}),
            # the tags without their `lineage.` prefix: DVC flattens this file to `lineage.<key>`
            "lineage": {k.removeprefix("lineage."): v for k, v in tags.items()},
            "evidence": json.loads(evidence.to_json()),
            "missing_artifacts": missing,
        }
    layout.register_metrics.parent.mkdir(parents=True, exist_ok=True)
    layout.register_metrics.write_text(json.dumps(redact_tree(result), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"[register] {name} v{version.version} ({'new' if registered.created else 'existing'} version), "
          f"gate: {decision.outcome}; aliases: {', '.join(result['aliases']) or 'none'}", flush=True)
    for reason in decision.reasons:
        print(f"[register]   {reason}", flush=True)
    return StageResult(
        stage="register",
        outputs={"register_metrics": layout.register_metrics, "side_by_side": layout.register_side_by_side,
                 "model_card": layout.register_model_card},
        summary={"version": result["version"], "decision": decision.outcome, "aliases": result["aliases"],
                 "champion": result["champion"]},
    )

