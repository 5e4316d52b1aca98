"""The base model: where it is (`resolve_base`, the API every later stage uses) and how a hub / local base is resolved.

`paths.base` (`layout.base`) holds either

- the **demo base** itself (`base.model_name_or_path: null`): `config.json`, `model.safetensors`, the sentencepiece
  tokenizer (`tokenizer.model` + `tokenizer.json` + `tokenizer_config.json`) and `base_info.json`, built by
  `orca8k.model.pretrain`; or
- a **pointer** (`base_info.json` only) to a local folder or to a hub snapshot at a resolved commit.

Why a pointer and not a copy for a hub base: Llama-2-13B is 26 GB. Copying it into `paths.base` would make DVC hash
it and store a second copy in its cache, for no gain: a hub snapshot is already content-addressed (the commit sha
pins every file, and huggingface_hub keeps it read-only under `HF_HOME/hub/models--…/snapshots/<sha>`). The
pointer records the repo id, the requested and the resolved revision and the snapshot folder; DVC versions the
pointer, so a new commit (a changed pin) reruns everything downstream, and an unchanged pin does not.
A local folder base is recorded with a fingerprint (sha256 of its `config.json` and of its file names and sizes).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orca8k.config import ArchitectureConfig, Config
from orca8k.errors import ConfigError, OfflineError, StageInputMissing
from orca8k.layout import Layout

# Files a base needs (weights as safetensors only; `*.bin` pickles are never downloaded).
HUB_ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                      "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
CONNECT_TIMEOUT_SECONDS = 5.0


def read_base_info(layout: Layout) -> dict[str, Any]:
    """`layout.base_info` as a dict.

    Raises:
        StageInputMissing: the file does not exist (run `orca8k base`).
    """
    if not layout.base_info.is_file():
        raise StageInputMissing(f"{layout.base_info}: no base here (run `orca8k base` first)")
    return json.loads(layout.base_info.read_text(encoding="utf-8"))


def resolve_base(cfg: Config) -> Path:
    """A local folder with the base's `config.json`, safetensors weights and base tokenizer (no OA tokens).

    Demo: `paths.base` itself (holding at least `config.json` or `tokenizer.model`; the loaders check the rest).
    Hub / local base: the folder recorded by `orca8k base` in `base_info.json`, checked to match
    `base.model_name_or_path` / `base.revision` (a hub snapshot moved to another `HF_HOME` is found again in the
    local cache by its commit sha, without network).

    Args:
        cfg: the config (reads `paths.base`, `base.model_name_or_path`, `base.revision`).

    Returns:
        The folder's absolute path.

    Raises:
        StageInputMissing: `orca8k base` has not run, ran for another base, or the recorded folder is gone.
    """
    layout = Layout.from_config(cfg)
    name = cfg.base.model_name_or_path
    if name is None:
        # the demo base is the folder itself; base_info.json is its description (a hand-saved model may lack it)
        kind = read_base_info(layout).get("kind") if layout.base_info.is_file() else "demo"
        if kind != "demo":
            raise StageInputMissing(f"{layout.base_info}: records a {kind} base, params ask for the demo base "
                                    "(rerun `orca8k base`)")
        if not any((layout.base / f).is_file() for f in ("config.json", "tokenizer.model")):
            raise StageInputMissing(f"{layout.base}: no base here (run `orca8k base` first)")
        return layout.base
    info = read_base_info(layout)
    if info.get("model_name_or_path") != name or info.get("requested_revision") != cfg.base.revision:
        raise StageInputMissing(
            f"{layout.base_info}: records {info.get('model_name_or_path')}@{info.get('requested_revision')}, "
            f"params ask for {name}@{cfg.base.revision} (rerun `orca8k base`)"
        )
    path = Path(info["path"])
    if info["kind"] == "hub" and not (path / "config.json").is_file():
        path = _cached_snapshot(info["repo_id"], info["revision"])
    if not (path / "config.json").is_file():
        raise StageInputMissing(f"{path}: no config.json (rerun `orca8k base`)")
    return path


# --------------------------------------------------------------------------------------------------- hub / local
def offline_switch() -> str | None:
    """The name of the offline switch that is on for model downloads (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE`)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on"):
            return key
    return None


def check_architecture(config: dict[str, Any], expected: ArchitectureConfig, where: str) -> None:
    """Compare a base's `config.json` with `base.architecture`, field by field.

    `num_key_value_heads` defaults to `num_attention_heads` (older configs omit it); `rope_theta` is read from
    `rope_parameters` when present (transformers 5), else from `rope_theta`.

    Raises:
        ConfigError: naming the first field that differs (`base.architecture.<field>`) and both values.
    """
    actual = dict(config)
    actual.setdefault("num_key_value_heads", actual.get("num_attention_heads"))
    rope = actual.get("rope_parameters") or {}
    if isinstance(rope, dict) and "rope_theta" in rope:
        actual["rope_theta"] = rope["rope_theta"]
    actual.setdefault("rope_theta", 10000.0)
    actual.setdefault("tie_word_embeddings", False)
    for field, want in expected.model_dump().items():
        have = actual.get(field)
        same = have is not None and (float(have) == float(want) if isinstance(want, float) else have == want)
        if not same:
            raise ConfigError(f"base.architecture.{field}: params say {want!r} but {where} has {have!r}")


def _fingerprint(folder: Path) -> str:
    """sha256 over `config.json`'s bytes and the sorted (name, size) of every file in the folder."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def _check_reachable(endpoint: str, repo_id: str) -> None:
    """Fail at once (a 5 s TCP connect) when the hub cannot be reached, instead of retrying for minutes.

    Raises:
        OfflineError: the connection fails.
    """
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as err:
        raise OfflineError(f"{repo_id}: cannot reach {endpoint} ({err.__class__.__name__}); work offline with a local "
                           "folder in base.model_name_or_path, or a commit already in the HF cache") from None


def _cached_snapshot(repo_id: str, revision: str) -> Path:
    """The local-cache snapshot of `repo_id` at `revision`, without network.

    Raises:
        StageInputMissing: not in the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise StageInputMissing(f"{repo_id}@{revision}: not in the local HF cache (rerun `orca8k base`)") from None


def resolve_hub_or_local(cfg: Config) -> dict[str, Any]:
    """Resolve `base.model_name_or_path` (a local folder, or a hub id at `base.revision`) and check its config.

    A hub id is resolved to a commit sha, downloaded (safetensors only, `HF_TOKEN` from the environment, never
    logged) into the HF cache and recorded. Offline (`HF_HUB_OFFLINE=1`) a hub id works only when `base.revision`
    is a full commit sha already in the cache; otherwise it fails at once.

    Returns:
        The info dict for `base_info.json`: `kind` (`local` | `hub`), `model_name_or_path`, `requested_revision`,
        `revision` (resolved sha; null for a local folder), `path`, `fingerprint` (local) and `architecture`.

    Raises:
        OfflineError: offline switch on (or no network) and the commit is not cached.
        ConfigError: the base's config differs from `base.architecture` (naming the field).
        StageInputMissing: a local folder without `config.json`.
    """
    name = cfg.base.model_name_or_path
    assert name is not None
    local = Path(name).expanduser()
    info: dict[str, Any] = {"model_name_or_path": name, "requested_revision": cfg.base.revision}
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise StageInputMissing(f"{local}: base.model_name_or_path is a folder without config.json")
        path = local.resolve()
        info.update(kind="local", revision=None, path=str(path), fingerprint=_fingerprint(path))
    else:
        path, sha = _download(name, cfg.base.revision)
        info.update(kind="hub", repo_id=name, revision=sha, path=str(path))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    check_architecture(config, cfg.base.architecture, str(path / "config.json"))
    if not any(path.glob("*.safetensors")):
        raise StageInputMissing(f"{path}: no *.safetensors weights (only safetensors are loaded)")
    info["architecture"] = cfg.base.architecture.model_dump()
    return info


def _download(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """(snapshot folder, commit sha) of `repo_id` at `revision`, from the cache when the sha is there.

    Raises:
        OfflineError: offline or unreachable, and not cached.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    is_sha = revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    if is_sha:
        try:
            return _cached_snapshot(repo_id, revision), revision
        except StageInputMissing:
            pass
    switch = offline_switch()
    if switch is not None:
        raise OfflineError(f"{repo_id}@{revision}: {switch}=1 is set (offline mode) and this commit is not in the local "
                           "HF cache; unset it to download, or set base.model_name_or_path to a local folder")
    _check_reachable(constants.ENDPOINT, repo_id)
    token = os.environ.get("HF_TOKEN") or None  # gated models (Llama-2); never logged
    sha = HfApi().model_info(repo_id, revision=revision, token=token).sha
    if sha is None:
        raise ConfigError(f"base.revision: {repo_id}@{revision} did not resolve to a commit")
    folder = snapshot_download(repo_id, revision=sha, allow_patterns=HUB_ALLOW_PATTERNS, token=token)
    return Path(folder), sha
