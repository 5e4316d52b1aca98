"""The pipeline's stages: one module each, one public function `run(cfg) -> StageResult`.

Stages take the typed config (paths included) and write only under their own outputs (see `orca8k.layout`).
The CLI (`orca8k <stage>`), `dvc.yaml` and the Prefect flow all call these same functions.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orca8k.config import Config

# CLI/DVC/Prefect name -> module under orca8k.stages (in pipeline order)
STAGES: dict[str, str] = {
    "mix": "mix",
    "validate": "validate",
    "base": "base",
    "tokenize": "tokenize",
    "train": "train",
    "evaluate": "evaluate",
    "sampling-report": "sampling_report",
    "register": "register",
}


@dataclass
class StageResult:
    """What a stage returns: where it wrote, and a few numbers worth printing (no models, no DataFrames)."""

    stage: str
    outputs: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "summary": self.summary,
            "seconds": round(self.seconds, 2),
        }

    def describe(self) -> str:
        lines = [f"[{self.stage}] done in {self.seconds:.1f} s"]
        for name, path in self.outputs.items():
            lines.append(f"[{self.stage}] wrote {name}: {path}")
        if self.summary:
            lines.append(f"[{self.stage}] summary: {json.dumps(self.summary, default=str, sort_keys=True)}")
        return "\n".join(lines)


def stage_function(name: str) -> Callable[[Config], StageResult]:
    """The `run` function of a stage by its CLI name (imported lazily: `orca8k plan` must not import torch).

    Raises:
        KeyError: unknown stage name.
    """
    module = importlib.import_module(f"orca8k.stages.{STAGES[name]}")
    return module.run


def run_stage(name: str, cfg: Config) -> StageResult:
    """Run one stage, timing it."""
    start = time.perf_counter()
    result = stage_function(name)(cfg)
    result.seconds = time.perf_counter() - start
    return result
