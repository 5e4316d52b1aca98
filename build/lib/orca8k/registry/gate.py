"""The promotion gate: may a candidate version replace the champion? Pure functions over small evidence records.

A candidate is promoted to `champion` when every check passes (thresholds from `register.gate` in params):

1. its mix passed validation (`layout.validation_result.success`);
2. context extension holds: `context.ppl_ratio_2x_over_1x` ≤ `max_ppl_ratio_2x_over_1x` (PPL at 2× the native
   context within that ratio of PPL at 1×);
3. the sampling report has outputs, and the share that are non-empty and end with `</s>` — both
   `proper_end_rate` and 1 − `empty_outputs`/`outputs` — is at least `min_proper_end_rate`;
4. against the current champion, only on the same validation set (same `val_set_sha256`): every source's
   `eval_loss` may exceed the champion's by at most `max_eval_loss_regression`. A champion evaluated on another val
   set is **not comparable**: the candidate keeps alias `candidate`, the decision says so, and a person decides (or
   re-evaluates the champion on this val set). No champion yet: the first version passing 1–3 becomes champion.

Each check yields one reason line (`PASS ...` / `FAIL ...` / `NOT COMPARABLE ...`), recorded as version tags and
printed by the register stage. A disabled gate (`enabled: false`) promotes nothing automatically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from orca8k.errors import DataError

Outcome = Literal["promoted", "rejected", "not_comparable", "disabled", "already_champion"]


@dataclass(frozen=True)
class Evidence:
    """What the gate knows about one version (stored as JSON in its tag `gate.evidence`)."""

    val_set_sha256: str
    validation_success: bool
    eval_loss: dict[str, float]
    ppl_ratio_2x_over_1x: float | None
    proper_end_rate: float | None
    outputs: int
    empty_outputs: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Evidence:
        data = json.loads(text)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    @classmethod
    def from_outputs(
        cls, eval_metrics: dict[str, Any], eval_path: Path, summary: dict[str, Any], summary_path: Path,
        validation_success: bool, val_set_sha256: str,
    ) -> Evidence:
        """Build evidence from `layout.eval_metrics` (CONTRACTS §7) and the sampling `summary.json` (§8).

        Raises:
            DataError: a required field is missing or not a number; the message names the file and field.
        """
        groups = eval_metrics.get("eval") if isinstance(eval_metrics, dict) else None
        if not isinstance(groups, dict) or not groups:
            raise DataError(f"{eval_path}: field eval missing or empty (expected eval.<source>.eval_loss)")
        losses = {src: _number(m.get("eval_loss") if isinstance(m, dict) else None, eval_path, f"eval.{src}.eval_loss")
                  for src, m in groups.items()}
        context = eval_metrics.get("context") or {}
        ratio = context.get("ppl_ratio_2x_over_1x") if isinstance(context, dict) else None
        ratio = None if ratio is None else _number(ratio, eval_path, "context.ppl_ratio_2x_over_1x")
        if not isinstance(summary, dict):
            raise DataError(f"{summary_path}: expected a JSON object")
        outputs = int(_number(summary.get("outputs"), summary_path, "outputs"))
        empty = int(_number(summary.get("empty_outputs"), summary_path, "empty_outputs"))
        rate = summary.get("proper_end_rate")
        rate = None if rate is None else _number(rate, summary_path, "proper_end_rate")
        return cls(val_set_sha256, validation_success, losses, ratio, rate, outputs, empty)


def _number(value: Any, path: Path, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{path}: field {name} missing or not a number (got {value!r})")
    return float(value)


@dataclass
class Decision:
    """The gate's outcome for a candidate, with one reason line per check."""

    outcome: Outcome
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None

    @property
    def promote(self) -> bool:
        return self.outcome == "promoted"


def decide(candidate: Evidence, champion: Evidence | None, gate: Any, champion_version: str | None = None) -> Decision:
    """Decide whether `candidate` becomes champion (see the module docstring for the checks).

    Args:
        candidate: the new version's evidence.
        champion: the current champion's evidence (None: there is no champion).
        gate: `cfg.register_.gate` (`enabled`, `max_eval_loss_regression`, `max_ppl_ratio_2x_over_1x`,
            `min_proper_end_rate`).
        champion_version: the champion's version number, for the reason lines.

    Returns:
        A `Decision`; `promote` is True only for outcome `promoted`.
    """
    reasons: list[str] = []
    failed = False

    def check(ok: bool, text: str, text_failed: str | None = None) -> None:
        nonlocal failed
        reasons.append("PASS " + text if ok else "FAIL " + (text_failed or text))
        failed |= not ok

    if not gate.enabled:
        return Decision("disabled", ["gate disabled (register.gate.enabled: false): promote by hand"], champion_version)
    check(candidate.validation_success, f"data validation success={str(candidate.validation_success).lower()}")
    if candidate.ppl_ratio_2x_over_1x is None:
        check(False, "context.ppl_ratio_2x_over_1x missing from the eval metrics")
    else:
        text = f"ppl_ratio_2x_over_1x {candidate.ppl_ratio_2x_over_1x:.4f} {{}} {gate.max_ppl_ratio_2x_over_1x}"
        check(candidate.ppl_ratio_2x_over_1x <= gate.max_ppl_ratio_2x_over_1x, text.format("<="), text.format(">"))
    check(candidate.outputs > 0, f"sampling report has {candidate.outputs} outputs ({candidate.empty_outputs} empty)")
    if candidate.outputs > 0:
        non_empty = 1.0 - candidate.empty_outputs / candidate.outputs
        rate = min(candidate.proper_end_rate if candidate.proper_end_rate is not None else 0.0, non_empty)
        text = f"proper_end_rate {candidate.proper_end_rate} and non-empty share {non_empty:.4f} {{}} {gate.min_proper_end_rate}"
        check(rate >= gate.min_proper_end_rate, text.format(">="), text.format("<"))
    if champion is None:
        reasons.append("PASS no champion yet: the first version passing the gate becomes champion")
        return Decision("rejected" if failed else "promoted", reasons, None)
    label = f"champion v{champion_version}" if champion_version else "champion"
    if champion.val_set_sha256 != candidate.val_set_sha256 or "unknown" in (champion.val_set_sha256, candidate.val_set_sha256):
        reasons.append(
            f"NOT COMPARABLE {label} was evaluated on another val set (val_set_sha256 {champion.val_set_sha256[:12]} "
            f"vs {candidate.val_set_sha256[:12]}): re-evaluate the champion on this val set or promote by hand"
        )
        return Decision("rejected" if failed else "not_comparable", reasons, champion_version)
    missing = sorted(set(champion.eval_loss) - set(candidate.eval_loss))
    if missing:
        reasons.append(f"NOT COMPARABLE candidate has no eval_loss for {', '.join(missing)} ({label} has)")
        return Decision("rejected" if failed else "not_comparable", reasons, champion_version)
    for source in sorted(champion.eval_loss):
        ours, theirs = candidate.eval_loss[source], champion.eval_loss[source]
        text = f"eval_loss[{source}] {ours:.4f} vs {label} {theirs:.4f} ({ours - theirs:+.4f} {{}} {gate.max_eval_loss_regression})"
        check(ours - theirs <= gate.max_eval_loss_regression, text.format("<="), text.format(">"))
    return Decision("rejected" if failed else "promoted", reasons, champion_version)
