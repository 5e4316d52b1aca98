"""Lineage of a registered model: which code, data, mix, validation, params and base produced it.

Every value is read from a file or the training run, never recomputed from params, so the tags describe what was
actually trained:

| tag | from |
|---|---|
| `lineage.git_commit`, `lineage.git_dirty` | `git rev-parse HEAD` / `git status --porcelain` at the repo root |
| `lineage.data_hash` | the `*.dvc` file whose out is `paths.data` (`outs[0].md5`): the raw sources' DVC hash |
| `lineage.mix_hash` | `dvc.lock`, stage `mix`, the out that is `paths.mix` (DVC's md5 of the mix folder) |
| `lineage.val_set_sha256` | sha256 of `layout.mix_val`'s bytes: the comparability key of the gate |
| `lineage.validation_run_id`, `lineage.validation_success` | `layout.validation_result` |
| `lineage.params_hash` | the training run's tag `orca8k.params_hash` (sha256 of the resolved config) |
| `lineage.base_model`, `lineage.base_revision` | the training run's params `base.model_name_or_path`/`revision` |
| `lineage.train_run_id`, `lineage.rope_parameters`, `lineage.dtype` | the run; the model's `config.json` |

A value that cannot be found is `unknown` (never a guess); `lineage.git_dirty` is `true` when tracked files differ
from the commit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orca8k.errors import DataError, StageInputMissing

UNKNOWN = "unknown"
DEMO_BASE = "orca8k-demo-base"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def git_state(repo: Path) -> tuple[str, str]:
    """(commit sha, "true"/"false" dirty) of the repo, or ("unknown", "unknown") outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True,
                                timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, UNKNOWN
    return commit or UNKNOWN, "true" if status.strip() else "false"


def data_hash(repo: Path, data_dir: Path) -> str:
    """DVC's hash of the raw sources `data_dir`: `outs[0].md5` of the repo-root `*.dvc` file whose out is that
    folder (`data.dvc` for the demo, a hub snapshot's own `.dvc` file for a real run), or `unknown` when no `.dvc`
    file tracks it (e.g. `--set paths.data=/elsewhere`: the committed `data.dvc` describes other bytes).

    Raises:
        DataError: the `.dvc` file tracking `data_dir` has no `outs[0].md5`.
    """
    target = Path(data_dir).resolve()
    for path in sorted(p for p in repo.glob("*.dvc") if p.is_file() and p.name != ".dvc"):
        try:
            out = (yaml.safe_load(path.read_text(encoding="utf-8")) or {})["outs"][0]
            tracked = (repo / str(out["path"])).resolve()
        except (KeyError, IndexError, TypeError, yaml.YAMLError) as err:
            raise DataError(f"{path}: field outs[0].path/md5 missing or unreadable ({err})") from None
        if tracked != target:
            continue
        if not (out.get("md5") or out.get("hash")):
            raise DataError(f"{path}: field outs[0].md5 missing")
        return str(out.get("md5") or out["hash"])
    return UNKNOWN


def mix_hash(repo: Path, mix_dir: Path) -> str:
    """DVC's md5 of the mix folder as recorded in `dvc.lock` (stage `mix`), or `unknown`.

    The lock's paths are relative to the repo root (where dvc.yaml lives); the out whose path resolves to `mix_dir`
    is the one read, so a run under `paths.root=runs/x` with its own mix reports `unknown` rather than the
    repository's mix.
    """
    path = repo / "dvc.lock"
    if not path.is_file():
        return UNKNOWN
    try:
        lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return UNKNOWN
    for out in (lock.get("stages", {}).get("mix", {}) or {}).get("outs", []) or []:
        if (repo / str(out.get("path", ""))).resolve() == mix_dir.resolve():
            return str(out.get("md5") or out.get("hash") or UNKNOWN)
    return UNKNOWN


def read_json(path: Path, stage: str) -> Any:
    """Read an upstream stage's JSON output.

    Raises:
        StageInputMissing: the file does not exist (names the stage to run).
        DataError: not valid JSON (names the file).
    """
    if not path.is_file():
        raise StageInputMissing(f"{path}: missing (run `orca8k {stage}` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


@dataclass(frozen=True)
class ValidationStatus:
    """`layout.validation_result`'s `run_id` and `success` (CONTRACTS §2)."""

    run_id: str
    success: bool

    @classmethod
    def read(cls, path: Path) -> ValidationStatus:
        """Raises: StageInputMissing (no file), DataError (a field missing or of the wrong type, named)."""
        data = read_json(path, "validate")
        if not isinstance(data, dict) or not isinstance(data.get("success"), bool):
            raise DataError(f"{path}: field success missing or not a boolean")
        run_id = data.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise DataError(f"{path}: field run_id missing or empty")
        return cls(run_id=run_id, success=data["success"])


def model_facts(model_dir: Path) -> dict[str, Any]:
    """RoPE settings, native context and dtype from the checkpoint's `config.json` (no weights are read).

    Raises:
        StageInputMissing: no `config.json` or no safetensors weights in `model_dir`.
    """
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise StageInputMissing(f"{model_dir}: no config.json (run `orca8k train` first)")
    if not any(model_dir.glob("*.safetensors")):
        raise StageInputMissing(f"{model_dir}: no *.safetensors weights (the registry logs safetensors only)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {
        "rope_parameters": rope,
        "max_position_embeddings": config.get("max_position_embeddings"),
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        "architectures": config.get("architectures") or [],
        "eos_token_id": config.get("eos_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
    }


def lineage_tags(
    repo: Path, layout: Any, run_id: str, run_params: dict[str, str], run_tags: dict[str, str],
    validation: ValidationStatus, facts: dict[str, Any],
) -> dict[str, str]:
    """The `lineage.*` tags of a model version (see the module's table)."""
    commit, dirty = git_state(repo)
    base = run_params.get("base.model_name_or_path", UNKNOWN)
    base_revision = run_params.get("base.revision", UNKNOWN)
    return {
        "lineage.git_commit": commit,
        "lineage.git_dirty": dirty,
        "lineage.data_hash": data_hash(repo, layout.data),
        "lineage.mix_hash": mix_hash(repo, layout.mix),
        "lineage.val_set_sha256": sha256_file(layout.mix_val) if layout.mix_val.is_file() else UNKNOWN,
        "lineage.validation_run_id": validation.run_id,
        "lineage.validation_success": str(validation.success).lower(),
        "lineage.params_hash": run_tags.get("orca8k.params_hash", UNKNOWN),
        "lineage.base_model": DEMO_BASE if base in ("None", "null", "") else base,
        "lineage.base_revision": "none" if base_revision in ("None", "null", "") else base_revision,
        "lineage.train_run_id": run_id,
        "lineage.rope_parameters": json.dumps(facts["rope_parameters"], sort_keys=True),
        "lineage.max_position_embeddings": str(facts["max_position_embeddings"]),
        "lineage.dtype": facts["dtype"],
    }


def mix_digest(lineage: dict[str, str]) -> tuple[str, str]:
    """(digest, kind) for `mlflow.log_input`: DVC's md5 of the mix when known, else the val set's sha256[:32]."""
    if lineage["lineage.mix_hash"] != UNKNOWN:
        return lineage["lineage.mix_hash"].removesuffix(".dir")[:36], "dvc-md5"
    if lineage["lineage.val_set_sha256"] != UNKNOWN:
        return lineage["lineage.val_set_sha256"][:32], "val-sha256"
    return UNKNOWN, "none"
