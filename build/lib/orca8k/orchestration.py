"""What the Prefect flow needs beyond the stage functions: run directories, the DVC-versioned mix, content keys.

Kept out of `flows/` so the flow stays thin (tasks call stage functions and pass paths) and so this logic is
testable without Prefect:

- `prepare_run`: resolve a params file + overrides into `runs/<run-name>/params.yaml` whose `paths.root` is the run
  directory, so two runs never share outputs; the raw data (and, by default, the DVC mix) stay the repository's.
- `reproduce_mix`: bring the DVC `mix` stage up to date through DVC's Python API (under a file lock: two flow runs
  may ask at once) and return its content hash from `dvc.lock`.
- `stage_fingerprint`: a content key for a stage — the hash of the exact params keys and the *content* of the deps
  that `dvc.yaml` declares for it (never a path alone), so a cache hit means the same inputs, code and params.
- `stage_cache_policy`: Prefect's cache policy for stage tasks keyed on that fingerprint, SERIALIZABLE with a file
  lock manager: two flow runs that need the same key compute it once, the other waits and reads the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

from orca8k.config import Config, apply_overrides, config_from_dict, read_params
from orca8k.errors import ConfigError, Orca8kError, RegistryError

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# flow knobs (typed parameters in the Prefect form) → the params keys they set
KNOB_KEYS = {
    "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "max_seconds": "train.max_seconds",
    "max_length": "tokenize.max_length",
    "rope_factor": "model.rope_scaling.factor",
    "pretrain_max_steps": "base.pretrain.max_steps",
}


def knob_overrides(knobs: dict[str, Any], fractions: dict[str, float] | None = None) -> dict[str, Any]:
    """Typed flow parameters → dotted overrides (None means "keep the params file's value").

    Raises:
        ConfigError: an unknown knob name.
    """
    out: dict[str, Any] = {}
    for name, value in knobs.items():
        if name not in KNOB_KEYS:
            raise ConfigError(f"unknown flow parameter {name!r}; known: {sorted(KNOB_KEYS)}")
        if value is not None:
            out[KNOB_KEYS[name]] = value
    for source, fraction in (fractions or {}).items():
        out[f"data.sources.{source}.fraction"] = fraction
    return out


@dataclass(frozen=True)
class RunSpec:
    """A prepared run: its directory, its resolved params file and config, and whether it shares the DVC mix."""

    name: str
    root: Path
    params_file: Path
    config: Config
    uses_dvc_mix: bool


def _touches(overrides: dict[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(k == p or k.startswith(p + ".") for k in overrides for p in prefixes)


def prepare_run(
    params_file: str | Path,
    overrides: dict[str, Any],
    run_name: str,
    repo_root: Path,
    shared_paths: dict[str, Path] | None = None,
) -> RunSpec:
    """Write `runs/<run_name>/params.yaml`: the params file + overrides, with `paths.root` = the run directory.

    `paths.data` points at the repository's data. `paths.mix` points at the repository's DVC-versioned mix unless
    the overrides change the mix's inputs (`seed`, `data.*`), in which case the run makes its own mix.
    `shared_paths` (e.g. `{"base": <dir>}`) points a path key at an existing output (a base reused by content).

    Raises:
        ConfigError: a bad run name, an unknown override key, or an invalid resulting config.
    """
    if not RUN_NAME_RE.match(run_name):
        raise ConfigError(f"run name {run_name!r}: use letters, digits, '-', '_', '.' (max 128)")
    repo_root = repo_root.resolve()
    source = Path(params_file)
    source = source if source.is_absolute() else repo_root / source
    data = read_params(source)
    data = apply_overrides(data, overrides)
    base_cfg = config_from_dict(data, str(source))  # validate before touching the disk
    root = repo_root / "runs" / run_name
    uses_dvc_mix = not _touches(overrides, ("seed", "data", "paths.data", "paths.mix"))
    data["paths"] = dict(data["paths"])
    data["paths"]["root"] = str(root)
    data["paths"]["data"] = str(_under(repo_root, base_cfg.paths.data))
    if uses_dvc_mix:
        data["paths"]["mix"] = str(_under(repo_root, base_cfg.paths.mix))
    for key, path in (shared_paths or {}).items():
        data["paths"][key] = str(Path(path).resolve())
    for key in ("config_file", "prompts_file"):  # repo-relative inputs stay the repo's
        data["sampling"][key] = str(_under(repo_root, data["sampling"][key]))
    for key in ("deepspeed", "hostfile"):  # launcher configs stay the repository's
        if data["train"].get(key):
            data["train"][key] = str(_under(repo_root, data["train"][key]))
    cfg = config_from_dict(data, f"run {run_name}")
    root.mkdir(parents=True, exist_ok=True)
    params_out = root / "params.yaml"
    text = f"# resolved params of run {run_name} (from {source}, overrides {json.dumps(overrides, sort_keys=True)})\n"
    params_out.write_text(text + yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return RunSpec(run_name, root, params_out, cfg, uses_dvc_mix)


def _under(root: Path, value: str | Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (root / p)


# ----------------------------------------------------------------------------------------------------- DVC mix
@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block; processes on one host queue behind it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reproduce_mix(repo_root: Path) -> dict[str, Any]:
    """`dvc repro mix` through DVC's API (skips when up to date) and the mix's hash from `dvc.lock`.

    Returns:
        `{"path": <abs mix dir>, "md5": <DVC dir hash>, "reproduced": [stage names that ran]}`.

    Raises:
        Orca8kError: DVC failed (the message carries DVC's), or dvc.lock has no mix output.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    repo_root = repo_root.resolve()
    with file_lock(repo_root / ".dvc" / "tmp" / "orca8k-flow.lock"):
        try:
            with Repo(str(repo_root)) as repo:
                stages = repo.reproduce("mix")
        except DvcException as err:
            raise Orca8kError(f"dvc repro mix failed: {err}") from err
    return {**mix_lock_entry(repo_root), "reproduced": [s.addressing for s in stages]}


def mix_lock_entry(repo_root: Path) -> dict[str, Any]:
    """Path and md5 of the `mix` stage's directory output as recorded in `dvc.lock`.

    Raises:
        Orca8kError: no dvc.lock or no mix entry (run `dvc repro mix`).
    """
    lock_file = repo_root / "dvc.lock"
    if not lock_file.is_file():
        raise Orca8kError(f"{lock_file}: missing; run `dvc repro mix` first")
    lock = yaml.safe_load(lock_file.read_text())
    try:
        outs = lock["stages"]["mix"]["outs"]
    except (KeyError, TypeError):
        raise Orca8kError(f"{lock_file}: no `mix` stage entry") from None
    params = read_params(repo_root / "params.yaml")
    mix_path = str(params["paths"]["mix"]).rstrip("/")
    for out in outs:
        if str(out["path"]).rstrip("/") == mix_path:
            return {"path": str(repo_root / mix_path), "md5": out["md5"]}
    raise Orca8kError(f"{lock_file}: the mix stage has no output {mix_path}")


# ------------------------------------------------------------------------------------------------ content keys
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def content_hash(path: Path) -> str:
    """sha256 over a file's bytes, or a directory's sorted (relative path, file hash) pairs; "missing" if absent."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_declaration(stage: str, repo_root: Path) -> dict[str, Any]:
    """The stage's entry in `dvc.yaml` (deps, params, outs), templates unrendered.

    Raises:
        Orca8kError: no such stage.
    """
    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    try:
        return spec["stages"][stage]
    except KeyError:
        raise Orca8kError(f"dvc.yaml: no stage {stage!r}") from None


def resolve_dep(dep: str, cfg: Config, repo_root: Path) -> Path:
    """A dvc.yaml dep path for this config: `${paths.X}...` resolves through `cfg.paths` (the run's folders),
    other templates through the config's values, plain paths against the repository root."""
    m = re.fullmatch(r"\$\{paths\.(\w+)\}(.*)", dep)
    if m:
        return Path(str(cfg.paths.resolve(m.group(1))) + m.group(2))
    data = cfg.to_dict()
    rendered = _TEMPLATE.sub(lambda mm: str(_lookup(data, mm.group(1))), dep)
    p = Path(rendered)
    return p if p.is_absolute() else repo_root / p


def stage_fingerprint(stage: str, cfg: Config, repo_root: Path) -> str:
    """Content key of a stage: sha256 of its params values and the content of its deps, as dvc.yaml declares them."""
    decl = stage_declaration(stage, repo_root)
    data = cfg.to_dict()
    h = hashlib.sha256(stage.encode())
    for key in decl.get("params", []):
        key = key if isinstance(key, str) else next(iter(key))
        h.update(f"\nparam {key}=".encode() + json.dumps(_lookup(data, key), sort_keys=True).encode())
    for dep in decl.get("deps", []):
        path = resolve_dep(dep, cfg, repo_root)
        h.update(f"\ndep {dep}=".encode() + content_hash(path).encode())
    return h.hexdigest()


def outputs_exist(outputs: dict[str, str]) -> bool:
    """True when every path a (cached) task result names still exists on disk."""
    return all(Path(p).exists() for p in outputs.values())


def host_concurrency_name() -> str:
    """Name of the global concurrency limit that keeps two trainings off one host (`train-<hostname>`)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", os.uname().nodename)
    return f"train-{host}"


# ------------------------------------------------------------------------------------------- cache + locks
def cache_dir(repo_root: Path) -> Path:
    """Where the flow keeps task results and cache locks: `runs/.prefect/` in the repository, beside the outputs the
    results point at (deleting `runs/` drops both; a shared volume shares both)."""
    return repo_root.resolve() / "runs" / ".prefect"


class ProcessFileLockManager(FileSystemLockManager):
    """Prefect's `FileSystemLockManager`, whose lock files also name the holding process (host, pid).

    Prefect releases a cache lock when the task ends, fails or is cancelled (SIGTERM). A process killed outright
    (SIGKILL, the OOM killer) leaves its lock file behind, and every later run would wait on it forever: a lock
    held by a process of this host that no longer exists is stale and is removed (logged). Locks of other hosts
    (a shared volume) are left alone.
    """

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._stamp(key)
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        acquired = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._stamp(key)
        return acquired

    def _stamp(self, key: str) -> None:
        path = self._lock_path_for_key(key)
        info = json.loads(path.read_bytes())
        info.update(host=socket.gethostname(), pid=os.getpid())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, path)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not use_cache:
            self._remove_if_stale(key)
        return super().is_locked(key, use_cache=use_cache)

    def _remove_if_stale(self, key: str) -> None:
        path = self._lock_path_for_key(key)
        if not path.is_file():
            return
        with file_lock(self.lock_files_directory / ".stale-check"):  # one process decides at a time
            try:
                info = json.loads(path.read_bytes())
            except (OSError, ValueError):
                return  # gone, or being written (a live holder): not stale
            if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
                return
            if _pid_alive(info["pid"]):
                return
            logging.getLogger("orca8k.orchestration").warning(
                "cache lock %s: holder pid %s on this host is gone; removing the stale lock", path, info["pid"])
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)


def _pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def stage_cache_policy(key_fn: Callable[[Any, dict[str, Any]], str | None], repo_root: Path) -> CachePolicy:
    """Prefect cache policy of the stage tasks: the key is `key_fn`'s (content-based), isolation SERIALIZABLE with
    file locks in `runs/.prefect/locks/`, so concurrent flow runs needing the same key compute it once: the first
    holds the lock while it runs, the others wait and then read its committed result (state `Cached`)."""
    return CacheKeyFnPolicy(cache_key_fn=key_fn).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=ProcessFileLockManager(cache_dir(repo_root) / "locks"),
    )


def is_transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task only when the failure is transient — a network error
    (hub download) or an MLflow server that did not answer; a bug, bad config or failed gate fails at once."""
    try:
        state.result()
    except RegistryError as err:
        return "could not connect" in str(err)
    except (ConnectionError, TimeoutError):
        return True
    except Exception as err:
        # requests' ConnectionError/Timeout and httpx's TransportError (hub downloads), matched by class name so
        # that neither library is imported here
        return bool({cls.__name__ for cls in type(err).__mro__} & {"ConnectionError", "Timeout", "TransportError"})
    return False
