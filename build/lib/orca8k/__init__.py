"""orca8k: the llama2-13b-orca-8k-3319 recipe as a reproducible MLOps pipeline (DVC, Prefect, MLflow, GX)."""

from __future__ import annotations

import os
import shutil

__version__ = "0.1.0"

# Quiet, offline-friendly defaults for the libraries we drive. Users may override each in their environment.
# ENV_DEFAULTS_APPLIED names the keys set here (not by the user), so a stage may relax one of its own defaults
# (tokenize lets the Rust tokenizer use threads while it encodes in-process).
ENV_DEFAULTS_APPLIED: set[str] = set()
for _key, _value in {
    "TOKENIZERS_PARALLELISM": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}.items():
    if _key not in os.environ:
        os.environ[_key] = _value
        ENV_DEFAULTS_APPLIED.add(_key)

# DeepSpeed probes for an accelerator at import (transformers imports it on save); on a machine without NVIDIA
# GPUs pin it to the CPU accelerator so the probe is quiet and fast.
if "DS_ACCELERATOR" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["DS_ACCELERATOR"] = "cpu"
