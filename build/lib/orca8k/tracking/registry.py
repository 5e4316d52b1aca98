"""Model registry operations: log a checkpoint folder, versions, aliases, the gate lock, resolving `models:/`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import RegistryError
from orca8k.redaction import redact_params, redact_uri
from orca8k.tracking.runs import RunHandle
from orca8k.tracking.store import Store, connect, resolve_tracking_uri, with_retries

if TYPE_CHECKING:
    from orca8k.config import Config

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
REGISTRATION_TAG = "orca8k.registration"  # "pending" while a version is being set up, "complete" once it is
MODEL_ARTIFACT = "model"  # the logged model's name; the HF checkpoint sits in its `model/` folder
PIP_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "sentencepiece", "accelerate")


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, as plain data."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


def _version_info(mv) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), mv.run_id or "", mv.source or "", dict(mv.tags or {}),
                       tuple(getattr(mv, "aliases", None) or ()))


def run_versions(store: Store, name: str, run_id: str) -> list[VersionInfo]:
    """Versions of `name` registered from `run_id` (the idempotency key of `orca8k register`)."""
    found = store.call(lambda: store.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
                       "search model versions")
    return sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version))


def alias_version(store: Store, name: str, alias: str) -> VersionInfo | None:
    """The version holding `alias`, or None (no such alias, or no such registered model)."""
    from mlflow.exceptions import MlflowException

    def get():
        try:
            return _version_info(store.client.get_model_version_by_alias(name, alias))
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
                return None
            raise

    return store.call(get, f"read alias {alias}")


def get_version(store: Store, name: str, version: str) -> VersionInfo:
    return store.call(lambda: _version_info(store.client.get_model_version(name, version)), f"read v{version}")


def pip_requirements() -> list[str]:
    """Exact pins of the packages a loaded model needs (passed to MLflow: its inference would import torchvision)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in PIP_PACKAGES:
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def _pipeline_task_classes() -> Iterator[None]:
    """MLflow 3.17 logs a local checkpoint with `pipelines.check_task(task)[1]["impl"].__name__`; transformers 5
    returns `impl` as a dotted string there. Resolve it to the class while MLflow reads it (restored afterwards)."""
    import importlib

    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task, *args, **kwargs):
        name, meta, options = original(task, *args, **kwargs)
        if isinstance(meta, dict) and isinstance(meta.get("impl"), str):
            module, cls = meta["impl"].rsplit(".", 1)
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def log_model_from_dir(
    run: RunHandle, model_dir: Path, *, extra_files: Mapping[str, str], card_text: str, dtype: str,
    prompt_template: str, generate_defaults: Mapping[str, Any], staging_root: Path | None = None,
) -> tuple[str, str]:
    """Log a saved HF checkpoint folder with the transformers flavor, without loading the model.

    The folder is staged as symlinks (no copy, no load) plus `extra_files` (name → text, e.g. `README.md`,
    `generation_config.json`, which replace the checkpoint's own), and MLflow copies that into the logged model's
    `model/` folder: safetensors, config (RoPE settings included) and the tokenizer files as trained.

    Args:
        run: the training run (the model is linked to it).
        model_dir: the checkpoint folder (`layout.model`).
        extra_files: files to add or replace in the logged checkpoint.
        card_text: the model card (also written as MLflow's `model_card.md`).
        dtype: `float32` | `float16` | `bfloat16`: the dtype the model loads in (as trained).
        prompt_template: pyfunc/serving prompt template with `{prompt}`.
        generate_defaults: serving params schema defaults (request `params` may override them).
        staging_root: where to build the staging folder (default: a temp dir).

    Returns:
        (model_uri, model_id).

    Raises:
        RegistryError: MLflow failed (after retries for transient errors).
    """
    import tempfile

    import mlflow
    import torch
    from huggingface_hub import ModelCard
    from mlflow.models import infer_signature

    params = {k: v for k, v in generate_defaults.items() if isinstance(v, bool | int | float | str)}
    signature = infer_signature("prompt", "reply", params=params)
    with tempfile.TemporaryDirectory(prefix="orca8k-stage-", dir=staging_root) as tmp:
        staged = Path(tmp) / "checkpoint"
        staged.mkdir()
        for item in model_dir.iterdir():
            if item.name not in extra_files:
                (staged / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
        for name, text in extra_files.items():
            (staged / name).write_text(text, encoding="utf-8")

        def log():
            with _pipeline_task_classes():
                return mlflow.transformers.log_model(
                    transformers_model=str(staged), task="text-generation", name=MODEL_ARTIFACT,
                    torch_dtype=getattr(torch, dtype), model_card=ModelCard(card_text), signature=signature,
                    prompt_template=prompt_template, pip_requirements=pip_requirements(),
                    metadata={"orca8k.run_id": run.run_id},
                )

        info = with_retries(log, "log the model", run.tracking_uri)
    return info.model_uri, info.model_id


def create_version(store: Store, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> VersionInfo:
    """Register `model_uri` as a new version of `name` (the registered model is created if needed), with `tags`
    set in the same call and `orca8k.registration=pending` until the caller marks it `complete`.

    Raises:
        RegistryError: MLflow failed after retries, or the version is not linked to `run_id`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    c = store.client

    def ensure_model():
        try:
            c.get_registered_model(name)
        except MlflowException:
            try:
                c.create_registered_model(name, tags={"orca8k.task": "text-generation"},
                                          description="orca8k chat models (OA format): load models:/<name>@champion")
            except MlflowException:  # created meanwhile by another register
                c.get_registered_model(name)

    store.call(ensure_model, f"create registered model {name}")
    clean = {k: str(v) for k, v in redact_params(dict(tags)).items()}
    clean[REGISTRATION_TAG] = "pending"
    mv = store.call(lambda: mlflow.register_model(model_uri, name, tags=clean), "create the model version")
    if mv.run_id != run_id:  # register_model links the version to the logged model's source run
        raise RegistryError(f"model version {name} v{mv.version}: run_id {mv.run_id} != training run {run_id}")
    return _version_info(mv)


def set_version_tags(store: Store, name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a version (values redacted), one call each (the registry has no batch call)."""
    for key, value in redact_params({k: str(v) for k, v in tags.items()}).items():
        store.call(lambda k=key, v=value: store.client.set_model_version_tag(name, version, k, v), f"tag v{version}")


def set_alias(store: Store, name: str, alias: str, version: str) -> None:
    store.call(lambda: store.client.set_registered_model_alias(name, alias, version), f"set alias {alias}")


def delete_version(store: Store, name: str, version: str, model_id: str | None = None) -> None:
    """Remove a half-registered version (and its logged model), best effort: never raises."""
    try:
        store.client.delete_model_version(name, version)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not delete half-registered %s v%s: %s", name, version, err)
    if model_id:
        try:
            store.client.delete_logged_model(model_id)
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not delete logged model %s: %s", model_id, err)


def model_id_of(version: VersionInfo) -> str | None:
    """The logged model id behind a version whose source is `models:/m-...` (MLflow 3), else None."""
    src = version.source
    return src.split("/", 1)[1].split("/")[0] if src.startswith("models:/m-") else None


@contextlib.contextmanager
def gate_lock(uri: str, name: str, timeout_seconds: float = 600.0) -> Iterator[Path]:
    """An exclusive lock around the gate's compare-and-set of alias `champion` for model `name`.

    The lock file sits beside a SQLite store (`<db>.<name>.gate.lock`), so every process using that store on this
    machine serialises; for other stores (a team server) it is per machine, in the temp dir, and the
    compare-and-set's re-read of the alias before setting it catches a writer elsewhere.

    Raises:
        RegistryError: the lock was not obtained within `timeout_seconds`.
    """
    import hashlib
    import tempfile

    from filelock import FileLock, Timeout

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri[len("sqlite:///"):] + f".{safe}.gate.lock")
    else:
        digest = hashlib.sha256(f"{uri}|{name}".encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / "orca8k-gate-locks" / f"{safe}-{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout_seconds)
    try:
        with lock:
            yield path
    except Timeout:
        raise RegistryError(f"{path}: another register holds the gate lock for {timeout_seconds:.0f} s") from None


def resolve_model_dir(cfg: Config, model_uri: str, cache_dir: Path | None = None) -> Path:
    """A local HF checkpoint folder for `models:/<name>@<alias>` or `models:/<name>/<version>`.

    Resolves the alias in the registry (tracking URI as in `resolve_tracking_uri`), then returns the logged
    model's `model/` folder: in place for a local artifact store, else downloaded once into `cache_dir`
    (default `~/.cache/orca8k/models/<name>/<version>`). The folder holds safetensors, the config with its RoPE
    settings, the OA tokenizer and `generation_config.json`.

    Raises:
        RegistryError: not a `models:/` URI, unknown model/alias/version, or the store is unreachable.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri}: not a models:/<name>@<alias> URI")
    ref = model_uri[len("models:/"):]
    uri = resolve_tracking_uri(cfg)
    store = connect(uri)
    c = store.client
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = c.get_model_version(name, version)
    except (MlflowException, ValueError) as err:
        raise RegistryError(f"{model_uri}: not found in the registry at {redact_uri(uri)} ({err})") from None
    location = store.call(lambda: c.get_model_version_download_uri(mv.name, mv.version), "locate the model")
    if location.startswith("file://") or location.startswith("/"):
        local = Path(location[len("file://"):] if location.startswith("file://") else location)
        if (local / MODEL_ARTIFACT / "config.json").is_file():
            return local / MODEL_ARTIFACT
    target = (cache_dir or Path.home() / ".cache" / "orca8k" / "models") / mv.name / str(mv.version)
    done = target / ".complete"
    if not done.is_file():
        store.call(lambda: mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                               dst_path=str(target)), "download the model")
        done.write_text(model_uri + "\n")
    return target / MODEL_ARTIFACT
