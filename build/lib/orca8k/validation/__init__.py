"""Data validation with Great Expectations 1.x: the shared harness and the suites built on it.

- `harness`: `Check`, `Suite`, `Batch`, `run_validation` (an ephemeral GX context, one Data Docs site).
- `report`: `CheckResult`, `ValidationReport` (result JSON, human summary, `raise_for_failure`).
- `mix_suite`: the checks of the `validate` stage on the sampled mix.

The token-level suite of `tokenize` reuses `harness` + `report`; see the `harness` module docstring for an example.
"""

from __future__ import annotations

from orca8k.validation.harness import Batch, Check, Suite, run_validation
from orca8k.validation.report import CheckResult, ValidationReport

__all__ = ["Batch", "Check", "CheckResult", "Suite", "ValidationReport", "run_validation"]
