"""Test session setup: offline, quiet, temp stores; fixtures live in tests/fixtures/*.py (loaded as plugins)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="orca8k-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_HOME": str(_TMP / "prefect"),
    "HF_HOME": str(_TMP / "hf"),
    "HF_DATASETS_CACHE": str(_TMP / "hf" / "datasets"),
}.items():
    os.environ[key] = value
os.environ.pop("MLFLOW_TRACKING_URI", None)

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)
