"""Where the tracking store is, and talking to it: URI resolution, ranks, retries, the client."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orca8k.errors import RegistryError
from orca8k.layout import repo_root
from orca8k.redaction import redact_text, redact_uri

if TYPE_CHECKING:
    from orca8k.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = int(os.environ.get("ORCA8K_MLFLOW_RETRIES", "3"))  # attempts on a tracking server that does not answer
RETRY_BACKOFF_SECONDS = float(os.environ.get("ORCA8K_MLFLOW_RETRY_BACKOFF_SECONDS", "1.0"))  # doubles each attempt


# --------------------------------------------------------------------------------------------------- where
def _resolve_local(uri: str, root: Path) -> str:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path in ("", ":memory:") or path.startswith("/"):
            return uri
        return f"sqlite:///{(root / path).resolve()}"
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        if path.startswith("//"):
            return uri
        return (root / path).resolve().as_uri() if not path.startswith("/") else Path(path).as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return (Path(uri) if Path(uri).is_absolute() else root / uri).resolve().as_uri()
    return uri


def resolve_tracking_uri(cfg: Config) -> str:
    """The tracking URI for this process: `MLFLOW_TRACKING_URI` if set, else `tracking.tracking_uri`.

    Relative local stores (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) resolve against `repo_root()`, so every
    stage and every run folder (`paths.root`) shares one store. Remote URIs (`http(s)://`, `postgresql://`,
    `databricks`) are returned unchanged.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return _resolve_local(env if env else cfg.tracking.tracking_uri, repo_root())


def resolve_artifact_location(cfg: Config) -> str | None:
    """Artifact root for a new experiment: `tracking.artifact_location`, repo-relative unless it is a URI.

    None (the server's own artifact root) when the tracking URI is an HTTP server and the location is a local
    path: a path on this machine means nothing to the server's other clients.
    """
    loc = cfg.tracking.artifact_location
    if "://" in loc or loc.startswith("file:"):
        return loc
    if resolve_tracking_uri(cfg).startswith(("http://", "https://")):
        return None
    path = Path(loc)
    return (path if path.is_absolute() else repo_root() / path).resolve().as_uri()


def process_rank() -> int:
    """Global rank of this process (`RANK` set by torchrun/deepspeed, else torch.distributed, else 0)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 0


# --------------------------------------------------------------------------------------------------- retries
def _is_transient(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    markers = ("connection", "timed out", "timeout", "max retries", "temporarily", "unavailable", "refused",
               "503", "502", "504", "database is locked")
    return isinstance(err, ConnectionError | TimeoutError) or any(m in text for m in markers)


def with_retries(fn: Callable[[], T], what: str, uri: str, attempts: int | None = None) -> T:
    """Call `fn`, retrying transient failures (connection refused, timeouts, 5xx, sqlite busy) with backoff.

    Args:
        fn: the call to make.
        what: words for the error message ("connect", "create the model version").
        uri: the tracking URI (shown redacted in the message).
        attempts: total tries (default `ORCA8K_MLFLOW_RETRIES`, 3); waits 1 s, 2 s, 4 s... in between.

    Raises:
        RegistryError: the call still failed after the last attempt (or failed with a non-transient error).
    """
    attempts = RETRIES if attempts is None else attempts
    delay = RETRY_BACKOFF_SECONDS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except RegistryError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; transient ones are retried
            if not _is_transient(err) or attempt == attempts:
                detail = redact_text(str(err).splitlines()[0] if str(err) else type(err).__name__)
                raise RegistryError(
                    f"MLflow at {redact_uri(uri)}: could not {what} after {attempt} attempt(s): "
                    f"{type(err).__name__}: {detail[:500]}"
                ) from err
            log.warning("MLflow at %s: %s failed (%s), retry %d/%d in %.1f s", redact_uri(uri), what,
                        type(err).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _configure_client(uri: str) -> None:
    """Point mlflow at `uri`; keep MLflow's own HTTP retries short (ours wrap them) unless the user set them."""
    import mlflow

    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI to the environment; keep the user's
    # environment as it was, or the next resolve_tracking_uri in this process would take the last store used.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass(frozen=True)
class Store:
    """A tracking/registry store that answered: its URI and an `MlflowClient` for it."""

    uri: str
    client: Any

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` with this store's retries (see `with_retries`)."""
        return with_retries(fn, what, self.uri)


def connect(uri: str) -> Store:
    """Connect to `uri` (tracking and registry), checking that the store answers (with retries).

    Raises:
        RegistryError: the store is unreachable after the retries.
    """
    import mlflow

    _configure_client(uri)
    c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    with_retries(lambda: c.search_experiments(max_results=1), "connect", uri)
    return Store(uri, c)


def client(uri: str):
    """An `MlflowClient` for `uri` after `connect`'s check."""
    return connect(uri).client

