"""Benchmark of `orca8k register`: registering never loads the model, so its memory does not grow with the model.

    python benchmarks/bench_register.py                        # a ≈ 170 MB checkpoint vs a ≈ 0.3 MB one
    python benchmarks/bench_register.py --hidden 1024 --layers 8   # a bigger one (≈ 0.4 GB in fp32)

Each measurement is a fresh process (a temp SQLite store, a training run created by `tracking.train_run`, the
upstream files in their contract shapes) running the `register` stage, with in-memory loading of weights made to
fail; its peak RSS (`ru_maxrss`) and wall time are reported for a large and a tiny checkpoint. The figure that
matters is `extra_peak_rss_over_model_bytes` = (peak RSS large − peak RSS tiny) / bytes of the large checkpoint:
≈ 0 when the weights are only copied, ≥ 1 if they were loaded. Target (issue 9): < 0.1. The machine may be shared:
the load average is printed; the ratio is taken within one run. Never run in CI. The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_BUILD = r"""
import sys, torch
sys.path[:0] = [sys.argv[1] + "/src", sys.argv[1]]
from transformers import LlamaConfig, LlamaForCausalLM
from orca8k.model.loading import save_model
from orca8k.model.tokenizer import load_base_tokenizer, prepare_tokenizer, train_sentencepiece
from tests.fixtures.tokenizer import corpus_lines
out, hidden, layers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
train_sentencepiece(corpus_lines(), out + "/tok", vocab_size=600, input_sentence_size=100000, seed=0)
tok = prepare_tokenizer(load_base_tokenizer(out + "/tok"))
config = LlamaConfig(vocab_size=-(-len(tok) // 16) * 16, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                     num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=256,
                     rope_scaling={"rope_type": "linear", "factor": 2.0}, bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
save_model(LlamaForCausalLM(config), tok, out + "/model")
"""

_REGISTER = r"""
import json, resource, sys, time
sys.path[:0] = [sys.argv[1] + "/src", sys.argv[1]]
from pathlib import Path
root, model_dir, db = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
import safetensors.torch, transformers
from transformers import PreTrainedModel
def refuse(*a, **k):
    raise AssertionError("register loaded the model")
PreTrainedModel.from_pretrained = classmethod(refuse)
safetensors.torch.load_file = refuse
from tests.fixtures.registry import trained_candidate
from orca8k.stages import register
store = {"uri": f"sqlite:///{db}", "artifacts": root / "mlartifacts"}
cfg, layout, _ = trained_candidate(root / "run", store, model_dir, model_name="bench")
start = time.perf_counter()
register.run(cfg)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"benchmark step failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        tmp = Path(tmp)
        results = {}
        for label, hidden, layers in (("tiny", 32, 2), ("large", args.hidden, args.layers)):
            folder = tmp / label
            _run(_BUILD, str(folder), str(hidden), str(layers))
            model_bytes = sum(p.stat().st_size for p in (folder / "model").glob("*.safetensors"))
            measured = json.loads(_run(_REGISTER, str(folder), str(folder / "model"), str(folder / "mlflow.db")))
            results[label] = {"model_bytes": model_bytes, **measured}
            print(f"{label}: {model_bytes / 1e6:.1f} MB checkpoint, register {measured['seconds']:.1f} s, "
                  f"peak RSS {measured['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    large, tiny = results["large"], results["tiny"]
    extra = (large["peak_rss_bytes"] - tiny["peak_rss_bytes"]) / large["model_bytes"]
    print(json.dumps({
        "bench": "register",
        "large_model_bytes": large["model_bytes"], "tiny_model_bytes": tiny["model_bytes"],
        "large_register_seconds": round(large["seconds"], 2), "tiny_register_seconds": round(tiny["seconds"], 2),
        "large_peak_rss_bytes": large["peak_rss_bytes"], "tiny_peak_rss_bytes": tiny["peak_rss_bytes"],
        "extra_peak_rss_over_model_bytes": round(extra, 4),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
