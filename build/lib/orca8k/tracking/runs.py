"""Runs: one MLflow run per training output, created by `train`, re-attached by every later stage."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import RegistryError, StageInputMissing
from orca8k.redaction import flatten, redact_params, redact_text, redact_tree, redact_uri
from orca8k.tracking.store import client, process_rank, resolve_artifact_location, resolve_tracking_uri, with_retries

if TYPE_CHECKING:
    from orca8k.config import Config
    from orca8k.layout import Layout

log = logging.getLogger(__name__)
PARAMS_HASH_TAG = "orca8k.params_hash"
STAGE_TAG = "orca8k.stage.{stage}"
RESOLVED_PARAMS_ARTIFACT = "params/resolved_params.json"
MAX_PARAM_VALUE_CHARS = 6000  # MLflow's limit on a param value


# --------------------------------------------------------------------------------------------------- run handles
@dataclass
class RunHandle:
    """A re-attached MLflow run. Methods log to this run by id (safe across threads and stages).

    Attributes:
        run_id, experiment_id, tracking_uri: where the run lives (`tracking_uri` unredacted, for this process).
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    _client: Any = field(default=None, repr=False)

    active = True

    @property
    def mlflow_client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values (nested dicts flattened with `/`; non-numbers and NaN skipped) at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, int(step or 0))
            for key, value in flatten(dict(metrics), sep="/").items()
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value
        ]
        for i in range(0, len(items), 1000):
            self.mlflow_client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log flat params after redaction; keys already logged with another value are skipped (MLflow params
        are immutable) and returned as `{key: "old -> new"}`."""
        from mlflow.entities import Param

        existing = self.mlflow_client.get_run(self.run_id).data.params
        clean = {k: _param_value(v) for k, v in redact_params(params).items()}
        changed = {k: f"{existing[k]} -> {v}" for k, v in clean.items() if k in existing and existing[k] != v}
        new = [Param(k, v) for k, v in clean.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.mlflow_client.log_batch(self.run_id, params=new[i : i + 100])
        return changed

    def params(self) -> dict[str, str]:
        """The run's params as logged (flat, redacted)."""
        return dict(self.mlflow_client.get_run(self.run_id).data.params)

    def tags(self) -> dict[str, str]:
        return dict(self.mlflow_client.get_run(self.run_id).data.tags)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        clean = redact_params({k: str(v) for k, v in tags.items()})
        self.mlflow_client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in clean.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (or, for a folder, its contents) under `artifact_path`, text files redacted."""
        path = Path(path)
        with redacted_copy(path) as upload:
            if path.is_dir():
                self.mlflow_client.log_artifacts(self.run_id, str(upload), artifact_path)
            else:
                self.mlflow_client.log_artifact(self.run_id, str(upload), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder's contents under `artifact_path`, text files redacted."""
        with redacted_copy(Path(folder)) as upload:
            self.mlflow_client.log_artifacts(self.run_id, str(upload), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Write redacted plain data as JSON (or YAML for `.yaml`) into the run's artifacts."""
        self.mlflow_client.log_dict(self.run_id, redact_tree(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.mlflow_client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_dataset(self, name: str, digest: str, source: str | Path, context: str, tags: Mapping[str, str] | None = None) -> None:
        """`mlflow.log_input` of a dataset by reference (nothing is loaded): its name, digest and local source.

        Args:
            name: dataset name (`orca8k-mix`).
            digest: its content hash (DVC's md5 of the mix; at most 36 characters).
            source: where it lives (a local folder).
            context: `training` | `evaluation` (tag `mlflow.data.context`).
            tags: more input tags (e.g. the kind of digest).
        """
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # MLflow builds its artifact source classes at import time; take the local one by name
        local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
        dataset = MetaDataset(source=local(str(source)), name=name, digest=digest[:36])
        input_tags = [InputTag("mlflow.data.context", context)] + [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        self.mlflow_client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)])

    def dataset_digests(self) -> list[tuple[str, str]]:
        """(name, digest) of the datasets logged as inputs of this run."""
        run = self.mlflow_client.get_run(self.run_id)
        return [(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])]

    def metric_keys(self) -> set[str]:
        return set(self.mlflow_client.get_run(self.run_id).data.metrics)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Download a run artifact (file or folder) into `dst`; returns the local path."""
        import mlflow

        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path,
                                                         dst_path=str(dst), tracking_uri=self.tracking_uri))


class NullRun(RunHandle):
    """What ranks other than 0 get: every method does nothing, so training code needs no `if rank == 0`."""

    active = False

    def __init__(self) -> None:
        super().__init__(run_id="", experiment_id="", tracking_uri="")

    def log_metrics(self, metrics, step=None):  # noqa: D102
        return None

    def log_params(self, params):  # noqa: D102
        return {}

    def params(self):  # noqa: D102
        return {}

    def tags(self):  # noqa: D102
        return {}

    def set_tags(self, tags):  # noqa: D102
        return None

    def log_artifact(self, path, artifact_path=None):  # noqa: D102
        return None

    def log_artifacts(self, folder, artifact_path=None):  # noqa: D102
        return None

    def log_dict(self, data, artifact_file):  # noqa: D102
        return None

    def log_text(self, text, artifact_file):  # noqa: D102
        return None

    def log_dataset(self, name, digest, source, context, tags=None):  # noqa: D102
        return None

    def dataset_digests(self):  # noqa: D102
        return []

    def metric_keys(self):  # noqa: D102
        return set()

    def download(self, artifact_path, dst):  # noqa: D102
        raise RuntimeError("a NullRun (rank other than 0) has no artifacts to download")


TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".md", ".html", ".htm", ".txt", ".yaml", ".yml", ".csv", ".log", ".cfg"})
MAX_REDACTED_FILE_BYTES = 64 << 20  # larger text files are uploaded as they are (evidence files are far smaller)


def _redacted_text(path: Path) -> str | None:
    """The redacted content of a text file when redaction changes it, else None (binary, large, or clean)."""
    if path.suffix.lower() not in TEXT_SUFFIXES or path.stat().st_size > MAX_REDACTED_FILE_BYTES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    clean = redact_text(text)
    return clean if clean != text else None


@contextlib.contextmanager
def redacted_copy(path: Path) -> Iterator[Path]:
    """`path` itself when none of its text files holds a secret; else a temporary copy with those files redacted
    (`orca8k.redaction.redact_text`: env secrets, credential shapes, URL passwords). Same names, same layout."""
    import shutil
    import tempfile

    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    changed = {p: text for p in files if (text := _redacted_text(p)) is not None}
    if not changed:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="orca8k-redacted-") as tmp:
        target = Path(tmp) / path.name
        if path.is_dir():
            shutil.copytree(path, target)
        for src, text in changed.items():
            dst = target / src.relative_to(path) if path.is_dir() else target
            dst.write_text(text, encoding="utf-8")
        log.info("MLflow: %d file(s) of %s redacted before upload", len(changed), path)
        yield target


_CURRENT: list[RunHandle] = []  # the run opened by train_run/attach_run in this process (module-level helpers)


def current_run() -> RunHandle:
    """The run opened in this process by `train_run`/`attach_run`, or a `NullRun` when none is open."""
    return _CURRENT[-1] if _CURRENT else NullRun()


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log metrics to the current run (no-op outside `train_run`/`attach_run` and on ranks other than 0)."""
    current_run().log_metrics(metrics, step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or folder to the current run (no-op when no run is open)."""
    current_run().log_artifact(path, artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    """Log a folder's contents to the current run (no-op when no run is open)."""
    current_run().log_artifacts(folder, artifact_path)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VALUE_CHARS else text[: MAX_PARAM_VALUE_CHARS - 15] + "...[truncated]"


def config_params(cfg: Config) -> dict[str, Any]:
    """The full resolved config, flattened with `.` (`train.learning_rate`), before redaction."""
    return flatten(cfg.to_dict())


# --------------------------------------------------------------------------------------------------- run files
def read_run_file(path: Path) -> dict[str, str]:
    """Read `{"run_id", "experiment_id", "tracking_uri"}` from a run file.

    Raises:
        StageInputMissing: the file does not exist (run `orca8k train` first).
        RegistryError: the file is not that JSON.
    """
    if not path.is_file():
        raise StageInputMissing(f"{path}: no MLflow run file (run `orca8k train` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or not data["run_id"]:
            raise ValueError("field run_id missing or empty")
    except ValueError as err:
        raise RegistryError(f"{path}: not a run file ({err})") from None
    return data


def write_run_file(path: Path, run: RunHandle) -> None:
    """Write the run file atomically (the URI redacted: it may carry a password); with a tracking server, also
    `run_url`, the run's page in the MLflow UI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    uri = redact_uri(run.tracking_uri)
    data = {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": uri}
    if uri.startswith(("http://", "https://")):
        data["run_url"] = f"{uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _experiment_id(c, name: str, artifact_location: str | None, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = with_retries(lambda: c.get_experiment_by_name(name), "read the experiment", uri)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            with_retries(lambda: c.restore_experiment(exp.experiment_id), "restore the experiment", uri)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _find_run(c, run_id: str, uri: str, recorded_uri: str | None, source: Path):
    from mlflow.exceptions import MlflowException

    try:
        return with_retries(lambda: c.get_run(run_id), f"read run {run_id}", uri)
    except RegistryError as err:
        cause = err.__cause__
        if isinstance(cause, MlflowException) and "RESOURCE_DOES_NOT_EXIST" in str(getattr(cause, "error_code", "")):
            raise RegistryError(
                f"{source}: run {run_id} is not in the tracking store {redact_uri(uri)}"
                + (f" (it was created in {recorded_uri})" if recorded_uri and recorded_uri != redact_uri(uri) else "")
                + "; set MLFLOW_TRACKING_URI to that store, or remove the run file to start a new run"
            ) from None
        raise


@contextlib.contextmanager
def _opened(handle: RunHandle, end_status: Callable[[BaseException | None], str]) -> Iterator[RunHandle]:
    import mlflow

    active = mlflow.active_run()
    owns = active is None or active.info.run_id != handle.run_id  # nested re-attach in one process: reuse it
    if owns:
        mlflow.start_run(run_id=handle.run_id)
    _CURRENT.append(handle)
    error: BaseException | None = None
    try:
        yield handle
    except BaseException as err:
        error = err
        raise
    finally:
        _CURRENT.pop()
        status = end_status(error)
        if owns:
            try:
                mlflow.end_run(status=status)
            except Exception as err:  # noqa: BLE001 - never mask the stage's own error
                log.warning("MLflow: could not end run %s: %s", handle.run_id, err)


@contextlib.contextmanager
def train_run(cfg: Config, layout: Layout, *, resume: bool | None = None) -> Iterator[RunHandle]:
    """Create the training run, or re-attach to it on resume; rank 0 only (other ranks get a `NullRun`).

    On a new run: the experiment `tracking.experiment_name` is created if needed (artifacts under
    `tracking.artifact_location`), the full resolved config is logged as params (flattened, redacted) and as
    `params/resolved_params.json`, tag `orca8k.params_hash` is set, and the run id is written to
    `layout.checkpoint_run` and `layout.train_run`. On resume the same run is re-opened; params not logged yet
    are added, and changed values (immutable in MLflow) are recorded in tag `orca8k.resume.changed_params`.
    The run ends FINISHED, or FAILED when the block raises (a later resume re-opens it).

    Args:
        cfg: the resolved config.
        layout: where the run files go.
        resume: None: re-attach when `layout.checkpoint_run` exists, else create. True: must re-attach.
            False: always create a new run (a fresh training).

    Yields:
        The run (`RunHandle`), or a `NullRun` on ranks other than 0.

    Raises:
        RegistryError: the tracking store is unreachable after retries, or the recorded run is missing from it.
        StageInputMissing: `resume=True` but no `layout.checkpoint_run`.
    """
    if process_rank() != 0:
        yield NullRun()
        return
    uri = resolve_tracking_uri(cfg)
    c = client(uri)
    existing = None
    if resume is not False and layout.checkpoint_run.is_file():
        existing = read_run_file(layout.checkpoint_run)
    elif resume:
        raise StageInputMissing(f"{layout.checkpoint_run}: resume asked for but no run file beside the checkpoints")
    params = config_params(cfg)
    if existing is not None:
        run = _find_run(c, existing["run_id"], uri, existing.get("tracking_uri"), layout.checkpoint_run)
        handle = RunHandle(run.info.run_id, run.info.experiment_id, uri, c)
        changed = handle.log_params(params)
        tags = {"orca8k.resumed": "true", PARAMS_HASH_TAG + ".latest": cfg.section_hash()}
        if changed:
            tags["orca8k.resume.changed_params"] = json.dumps(changed, sort_keys=True)[:7900]
            log.warning("MLflow run %s resumed with changed params: %s", handle.run_id, sorted(changed))
        handle.set_tags(tags)
    else:
        exp_id = _experiment_id(c, redact_text(cfg.tracking.experiment_name), resolve_artifact_location(cfg), uri)
        tags = {PARAMS_HASH_TAG: cfg.section_hash(), "orca8k.paths.root": str(layout.root), STAGE_TAG.format(stage="train"): "running"}
        run = with_retries(lambda: c.create_run(exp_id, tags=redact_params(tags)), "create the run", uri)
        handle = RunHandle(run.info.run_id, exp_id, uri, c)
        handle.log_params(params)
        handle.log_dict(cfg.to_dict(), RESOLVED_PARAMS_ARTIFACT)
    write_run_file(layout.checkpoint_run, handle)
    write_run_file(layout.train_run, handle)

    def status(error: BaseException | None) -> str:
        handle.set_tags({STAGE_TAG.format(stage="train"): "failed" if error else "done"})
        return "FAILED" if error else "FINISHED"

    with _opened(handle, status):
        yield handle


@contextlib.contextmanager
def attach_run(cfg: Config, layout: Layout, stage: str = "stage") -> Iterator[RunHandle]:
    """Re-attach to the training run recorded in `layout.train_run` (any process; rank 0 only).

    The run's status is left as training left it (a stage that fails after training does not mark the training
    failed); the stage's outcome is recorded in tag `orca8k.stage.<stage>` (`done` | `failed`).

    Yields:
        The run (`RunHandle`), or a `NullRun` on ranks other than 0.

    Raises:
        StageInputMissing: no `layout.train_run` (run `orca8k train` first).
        RegistryError: the store is unreachable after retries, or the run is not in it.
    """
    if process_rank() != 0:
        yield NullRun()
        return
    recorded = read_run_file(layout.train_run)
    uri = resolve_tracking_uri(cfg)
    c = client(uri)
    run = _find_run(c, recorded["run_id"], uri, recorded.get("tracking_uri"), layout.train_run)
    previous = run.info.status
    handle = RunHandle(run.info.run_id, run.info.experiment_id, uri, c)

    def status(error: BaseException | None) -> str:
        try:
            handle.set_tags({STAGE_TAG.format(stage=stage): "failed" if error else "done"})
        except Exception as err:  # noqa: BLE001 - the store may be the thing that failed
            log.warning("MLflow: could not tag stage %s: %s", stage, err)
        return previous if previous in ("FINISHED", "FAILED", "KILLED") else "FINISHED"

    with _opened(handle, status):
        yield handle
