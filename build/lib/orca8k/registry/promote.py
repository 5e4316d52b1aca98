"""Registering a version idempotently, and the gate's compare-and-set of alias `champion` under a lock.

MLflow calls go through `orca8k.tracking.registry`; this module holds the order of operations that keeps the
registry consistent:

- **Idempotent.** A run has at most one *complete* version per model (tag `orca8k.registration=complete`); a
  second `register` for the same run reuses it. Versions of the run left `pending` by a crash are deleted first.
- **No half-registered version.** A new version is created `pending` with its tags, gets alias `candidate`, and
  is marked `complete` last; if any step fails, the version (and its logged model) is deleted and the stage fails.
- **Compare-and-set.** Under `tracking.registry.gate_lock`, the champion is read, the gate decides, and alias
  `champion` moves only if it still points where it was read (a writer that bypassed the lock loses the race and
  the decision records it). Two registers promoting at once therefore decide one after the other: the second is
  compared with the first's result and cannot also win on stale information.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orca8k.errors import RegistryError
from orca8k.registry.gate import Decision, Evidence, decide
from orca8k.tracking import registry as reg
from orca8k.tracking.store import Store

EVIDENCE_TAG = "gate.evidence"
DECISION_TAG = "gate.decision"
REASONS_TAG = "gate.reasons"
COMPARED_TAG = "gate.compared_with"


@dataclass
class Registered:
    """The outcome of `ensure_version`: the version, and whether this call created it."""

    version: reg.VersionInfo
    created: bool


def ensure_version(store: Store, name: str, run_id: str, tags: dict[str, str],
                   log_model: Callable[[], tuple[str, str]]) -> Registered:
    """The run's complete version of `name`, creating it (via `log_model()` then registration) if there is none.

    Args:
        store: the connected store.
        name: registered model name.
        run_id: the training run (the idempotency key).
        tags: lineage and evidence tags set on a new version.
        log_model: logs the model and returns (model_uri, model_id); only called when a version is needed.

    Raises:
        RegistryError: a step failed; a version created by this call has been deleted again.
    """
    for v in reg.run_versions(store, name, run_id):
        if v.tags.get(reg.REGISTRATION_TAG) == "complete":
            return Registered(v, created=False)
        reg.delete_version(store, name, v.version, reg.model_id_of(v))  # left pending by an earlier crash
    model_uri, model_id = log_model()
    try:
        version = reg.create_version(store, name, model_uri, run_id, tags)
    except Exception:
        _drop_model(store, model_id)
        raise
    try:
        reg.set_alias(store, name, reg.CANDIDATE, version.version)
        reg.set_version_tags(store, name, version.version, {reg.REGISTRATION_TAG: "complete"})
    except Exception as err:
        reg.delete_version(store, name, version.version, model_id)
        raise RegistryError(f"{name} v{version.version}: registration failed ({err}); the version was removed") from err
    return Registered(reg.get_version(store, name, version.version), created=True)


def _drop_model(store: Store, model_id: str) -> None:
    try:
        store.client.delete_logged_model(model_id)
    except Exception:  # noqa: BLE001 - best effort: a logged model without a version is not a registered version
        pass


def champion_evidence(champion: reg.VersionInfo | None) -> Evidence | None:
    """The champion's evidence from its tag; a champion promoted by hand without one is not comparable."""
    if champion is None:
        return None
    text = champion.tags.get(EVIDENCE_TAG)
    if text:
        return Evidence.from_json(text)
    return Evidence("unknown", True, {}, None, None, 0, 0)


def promote(store: Store, name: str, version: reg.VersionInfo, evidence: Evidence, gate: Any) -> tuple[Decision, reg.VersionInfo | None]:
    """Run the gate for `version` and move alias `champion` to it when it passes (compare-and-set, under a lock).

    Returns:
        (the decision, the champion version as it was before this call, None if there was none).

    Raises:
        RegistryError: the store failed; the decision tags say `promotion_failed` when the alias could not be set.
    """
    with reg.gate_lock(store.uri, name):
        before = reg.alias_version(store, name, reg.CHAMPION)
        if before is not None and before.version == version.version:
            decision = Decision("already_champion", [f"PASS v{version.version} is already the champion"], before.version)
        else:
            decision = decide(evidence, champion_evidence(before), gate, before.version if before else None)
        if decision.promote:
            now = reg.alias_version(store, name, reg.CHAMPION)
            if (now.version if now else None) != (before.version if before else None):
                decision = Decision("rejected", [*decision.reasons, f"FAIL champion moved to v{now.version if now else None} "
                                                 "while deciding (a register outside the lock): re-run register"],
                                    decision.champion_version)
        tags = {
            EVIDENCE_TAG: evidence.to_json(),
            DECISION_TAG: decision.outcome,
            REASONS_TAG: json.dumps(decision.reasons),
            COMPARED_TAG: f"v{before.version}" if before else "none",
            "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        reg.set_version_tags(store, name, version.version, tags)
        if decision.promote:
            try:
                reg.set_alias(store, name, reg.CHAMPION, version.version)
            except RegistryError:
                reg.set_version_tags(store, name, version.version, {DECISION_TAG: "promotion_failed"})
                raise
    return decision, before
