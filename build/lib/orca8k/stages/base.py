"""Stage `base`: build the demo base, or resolve a hub / local base, into `paths.base`.

- Demo (`base.model_name_or_path: null`): train the sentencepiece tokenizer on the mix's train split and pre-train a
  tiny Llama at the native context (`orca8k.model.pretrain`).
- Real recipes: resolve the hub id at the pinned revision (or a local folder), check its config against
  `base.architecture`, and write a pointer (`orca8k.model.base`; why a pointer: see there).

Either way `paths.base/base_info.json` says what was built or resolved; later stages find the base through
`orca8k.model.base.resolve_base(cfg)`. The folder is written beside the old one and swapped in at the end, so a
failed run never leaves a half-written base.
"""

from __future__ import annotations

import hashlib
import shutil
import time

from orca8k.config import Config
from orca8k.errors import Orca8kError
from orca8k.layout import Layout
from orca8k.model.base import resolve_base, resolve_hub_or_local
from orca8k.model.pretrain import build_demo_base, write_info
from orca8k.stages import StageResult

# Files a base folder may hold; anything else in an existing `paths.base` means it is not ours to replace.
_BASE_FILES = ("base_info.json", "config.json")


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cfg: Config) -> StageResult:
    """Build or resolve the base into `paths.base` (see the module docstring).

    Returns:
        Outputs `base` (the folder) and `base_info`; summary: kind, revision, and for the demo steps, final loss,
        tokens seen and training seconds.

    Raises:
        StageInputMissing: no mix train file (demo), or a local base folder without `config.json`.
        OfflineError: a hub base asked for while offline / unreachable and not cached.
        ConfigError: the base's config differs from `base.architecture`.
        TrainingError: too little data or a non-finite loss (demo).
        Orca8kError: `paths.base` exists and holds something that is not a base.
    """
    layout = Layout.from_config(cfg)
    start = time.monotonic()
    target = layout.base
    if target.exists() and any(target.iterdir()) and not any((target / f).is_file() for f in _BASE_FILES):
        raise Orca8kError(f"{target}: paths.base exists and does not hold a base; refusing to replace it")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    name = cfg.base.model_name_or_path
    try:
        if name is None:
            built = build_demo_base(cfg, layout, partial)
            info = {"kind": "demo", "model_name_or_path": None, "requested_revision": None,
                    "revision": "sha256:" + _file_sha256(partial / "model.safetensors"), **built}
        else:
            info = resolve_hub_or_local(cfg)
        info["seconds"] = round(time.monotonic() - start, 1)
        write_info(partial / layout.base_info.name, info)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed or interrupted build leaves nothing half-written
        raise

    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    resolved = resolve_base(cfg)

    summary = {"kind": info["kind"], "revision": info["revision"], "path": str(resolved)}
    if info["kind"] == "demo":
        p = info["pretrain"]
        summary.update(parameters=info["parameters"], steps=p["steps"], final_loss=p["final_loss"],
                       tokens_seen=p["tokens_seen"], train_seconds=p["train_seconds"],
                       stopped_by_max_seconds=p["stopped_by_max_seconds"])
    return StageResult("base", outputs={"base": target, "base_info": layout.base_info}, summary=summary)
