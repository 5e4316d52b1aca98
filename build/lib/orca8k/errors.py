"""The project's exceptions: one module, so callers and the CLI can tell user errors from bugs.

Every error raised for bad input names where the problem is (the params key, the file, the row, the field).
The CLI prints these without a traceback and exits with status 2 (config) or 1 (everything else).
"""

from __future__ import annotations


class Orca8kError(Exception):
    """Base class: an error the user can act on (bad config, bad data, failed gate)."""


class ConfigError(Orca8kError):
    """A params file or an override is invalid; the message names the dotted key."""


class DataError(Orca8kError):
    """Input data is unusable; the message names the file, the row and the field."""


class ValidationFailed(Orca8kError):
    """A Great Expectations suite failed; the message summarises the failing expectations."""


class StageInputMissing(Orca8kError):
    """A stage's input does not exist yet (run the upstream stage first); the message names the path and stage."""


class TrainingError(Orca8kError):
    """Training cannot start or went wrong (dtype mismatch, non-finite loss, repeated skipped steps)."""


class RegistryError(Orca8kError):
    """MLflow tracking or registry failed (server down after retries, inconsistent lineage)."""


class OfflineError(Orca8kError):
    """A hub download was asked for while offline (HF_HUB_OFFLINE=1) or without network."""
