"""What a validation run returns: one `CheckResult` per (batch, check), the result JSON and the human summary.

No Great Expectations import here: the report is plain data, readable by stages that only consume results
(`register` reads `success` and `run_id` from the JSON).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orca8k.errors import StageInputMissing, ValidationFailed

RESULT_SCHEMA_VERSION = 1


def jsonable(value: Any) -> Any:
    """Plain JSON data from GX/numpy/pandas values: numpy scalars → Python, NaN/±inf/NA → None, tuples → lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover
        pass
    return str(value)


@dataclass
class CheckResult:
    """The outcome of one check on one batch.

    `examples` holds up to `max_examples` failing rows as `{id_column: id, column: value}` (or `{"value": v}`);
    `error` is set when the expectation raised (a missing column, say), which counts as a failure.
    """

    batch: str
    suite: str
    check: str
    description: str
    expectation_type: str
    kwargs: dict[str, Any]
    success: bool
    observed_value: Any = None
    element_count: int | None = None
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def describe(self) -> str:
        """One line: where, which check, how many rows failed or what was observed, examples."""
        parts = [f"{self.batch}: {self.check} — {self.description}"]
        if self.error:
            parts.append(f"error: {self.error}")
        elif self.unexpected_count is not None and self.element_count is not None:
            pct = f" ({self.unexpected_percent:.2f} %)" if self.unexpected_percent is not None else ""
            parts.append(f"{self.unexpected_count:,} of {self.element_count:,} rows fail{pct}")
        elif self.observed_value is not None:
            parts.append(f"observed {json.dumps(self.observed_value, default=str)}")
        if self.examples:
            shown = ", ".join(json.dumps(e, ensure_ascii=False, default=str) for e in self.examples)
            parts.append(f"e.g. {shown}")
        return "; ".join(parts)


@dataclass
class ValidationReport:
    """A validation run: overall success, the content-addressed run id, per-batch facts and every check's result.

    Attributes:
        run_id: `<run_name>-<16 hex>`, a hash of the validated frames, the suites and the GX version.
        success: every check of every batch passed.
        batches: `{batch: {"suite", "rows", "success"}}`.
        checks: one `CheckResult` per (batch, check), in batch then suite order.
        data_docs_index: the site's `index.html` (None when Data Docs were not built).
        data_docs_pages: `{batch: page path relative to the site root}` (not in the JSON: it holds the run time).
        gx_version: Great Expectations version that ran the checks.
        timings: seconds spent running the checks (`checks_seconds`) and building Data Docs (`data_docs_seconds`);
            not in the JSON (it must not change between identical runs).
    """

    run_id: str
    success: bool
    batches: dict[str, dict[str, Any]]
    checks: list[CheckResult]
    data_docs_index: Path | None = None
    data_docs_pages: dict[str, str] = field(default_factory=dict)
    gx_version: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[CheckResult]:
        """The checks that failed, in run order."""
        return [c for c in self.checks if not c.success]

    def check(self, batch: str, check: str) -> CheckResult:
        """The result of one check on one batch.

        Raises:
            KeyError: no such (batch, check).
        """
        for c in self.checks:
            if c.batch == batch and c.check == check:
                return c
        raise KeyError(f"no check {check!r} on batch {batch!r}")

    def to_json_dict(self, extra: dict[str, Any] | None = None, relative_to: Path | None = None) -> dict[str, Any]:
        """The result JSON: `success`, `run_id`, counts, `failures` (with examples), every check, then `extra`.

        Args:
            extra: stage-specific sections (special-token counts, input hashes, params); must not reuse a key.
            relative_to: write `data_docs` relative to this folder (the JSON's own), so the file does not depend on
                where the checkout lives.

        Raises:
            ValueError: `extra` reuses a key of the report.
        """
        failures = self.failures()
        docs = None
        if self.data_docs_index is not None:
            docs = str(self.data_docs_index)
            if relative_to is not None:
                docs = os.path.relpath(self.data_docs_index, relative_to)
        out: dict[str, Any] = {
            "schema_version": RESULT_SCHEMA_VERSION,
            "success": self.success,
            "run_id": self.run_id,
            "gx_version": self.gx_version,
            "statistics": {
                "batches": len(self.batches),
                "evaluated_checks": len(self.checks),
                "successful_checks": len(self.checks) - len(failures),
                "unsuccessful_checks": len(failures),
            },
            "failures": [asdict(c) for c in failures],
            "batches": self.batches,
            "checks": [asdict(c) for c in self.checks],
            "data_docs": docs,
        }
        for key, value in (extra or {}).items():
            if key in out:
                raise ValueError(f"extra key {key!r} collides with the report's own")
            out[key] = jsonable(value)
        return out

    def write_json(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the result JSON atomically (temp file + rename): a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        data = self.to_json_dict(extra, relative_to=path.parent)
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def summary(self, max_failures: int = 20) -> str:
        """A short human summary: status line, then one line per failing check (where, what, examples)."""
        failures = self.failures()
        status = "PASSED" if self.success else "FAILED"
        lines = [
            f"validation {self.run_id}: {status} — {len(self.checks) - len(failures)}/{len(self.checks)} checks "
            f"passed on {len(self.batches)} batches"
        ]
        for c in failures[:max_failures]:
            lines.append(f"  FAILED {c.describe()}")
        if len(failures) > max_failures:
            lines.append(f"  … and {len(failures) - max_failures} more failing checks (see the result JSON)")
        if self.data_docs_index is not None:
            lines.append(f"  Data Docs: {self.data_docs_index}")
            for batch in dict.fromkeys(c.batch for c in failures):
                if batch in self.data_docs_pages:
                    lines.append(f"    {batch}: {self.data_docs_index.parent / self.data_docs_pages[batch]}")
        return "\n".join(lines)

    def raise_for_failure(self, where: str) -> None:
        """Raise `ValidationFailed` if any check failed.

        Args:
            where: what was validated, for the message (`the mix (artifacts/mix)`).

        Raises:
            ValidationFailed: with the summary (failing checks, batches, example ids) as the message.
        """
        if not self.success:
            raise ValidationFailed(f"{where} failed validation\n{self.summary()}")


def require_passed(result: Path, missing: str, failed: str) -> None:
    """Stop a stage unless the result JSON at `result` (`ValidationReport.write_json`) records a success.

    Args:
        result: the result file.
        missing: what to say when there is none (which stage writes it), after the path.
        failed: what to say when it is not a success, after the path.

    Raises:
        StageInputMissing: no result file.
        ValidationFailed: the result is not a success.
    """
    if not result.is_file():
        raise StageInputMissing(f"{result}: {missing}")
    if json.loads(result.read_text()).get("success") is not True:
        raise ValidationFailed(f"{result}: {failed}")
