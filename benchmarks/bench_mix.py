"""Benchmark of the `mix` stage at the seed card's size and at 1/10 of it: rows/s and peak RSS for both.

    python benchmarks/bench_mix.py                      # both scales (full ≈ 7.2 GB of synthetic input, ≈ 16 GB free disk)
    python benchmarks/bench_mix.py --scales tenth       # only 1/10 (≈ 0.7 GB)
    python benchmarks/bench_mix.py --workdir /big/tmp   # where the synthetic data goes (default: $TMPDIR)

Synthetic sources at realistic lengths, generated streaming (never held in memory), in the hub layouts:
- orca-chat: 236,053 conversations (ceil-20 % held out → 188,842 train rows, the card's count), 1-6 turns,
  prompts ~300 and replies ~800 characters (lognormal), JSON lines in `orca-chat-gpt4.json`;
- fanfics: 25,900 stories of 40k-200k characters (10k-50k tokens), parquet shards with TEXT + TITLE, chunked at
  65,535 → ≈ 48k train rows (the card: 47,760);
- red_pajama: 930,514 documents (the 1T-Sample's size), lognormal lengths with mean ≈ 4.6k characters (≈ 1 B
  tokens in all), capped at 1.5 M, JSON lines in per-subset files, 0.01 % exact duplicates; fraction 0.25 →
  ≈ 190k train rows (the card: 188,262).
The recipe's params (`recipes/llama2-13b-orca-8k.yaml`) are used as they are, with `paths` pointed at the work dir.

Each scale's mix runs in a fresh process that reports its own wall time, CPU time and peak RSS (ru_maxrss), so the
two scales are comparable within one run. Targets (issue 3): full size ≤ 10 min on 2 cores; peak RSS flat —
≤ 1.2× from 1/10 to full, plus the per-document index (~36 bytes per document + ~40 per chunk while planning).
The machine may be shared: the load average before each run is printed beside the figures. Never run in CI.
The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama2-13b-orca-8k.yaml"
FULL = {"orca_chat": 236_053, "fanfics": 25_900, "red_pajama": 930_514}
PAJAMA_SUBSETS = ("arxiv", "book", "c4", "cc_2019-30", "cc_2020-05", "cc_2021-04", "cc_2022-05", "cc_2023-06",
                  "github", "stackexchange", "wikipedia")
SEED = 1234


def text_pool(rng: np.random.Generator, chars: int = 8 << 20) -> str:
    """A pool of pseudo-English text (random words of 2-9 letters, sentences, paragraphs) to slice documents from."""
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    weights = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                        1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    vocab = ["".join(chr(c) for c in rng.choice(letters, size=int(n), p=weights / weights.sum()))
             for n in rng.integers(2, 10, size=5000)]
    words = rng.integers(0, len(vocab), size=chars // 5)
    out = []
    for i, w in enumerate(words.tolist()):
        out.append(vocab[w])
        out.append(". " if i % 13 == 12 else ("\n\n" if i % 97 == 96 else " "))
    return "".join(out)[:chars]


def doc_text(pool: str, rng: np.random.Generator, tag: str, length: int) -> str:
    head = f"{tag}: "
    body_len = max(1, length - len(head))
    parts, left = [], body_len
    while left > 0:  # documents longer than the pool are several slices
        take = min(left, len(pool) - 1)
        off = int(rng.integers(0, len(pool) - take))
        parts.append(pool[off : off + take])
        left -= take
    return head + "".join(parts)


def generate(data: Path, scale: float, rng: np.random.Generator) -> dict[str, int]:
    """Write the three sources under `data`, streaming; returns row counts and bytes written."""
    pool = text_pool(rng)
    n_orca, n_fan, n_paj = (max(10, round(v * scale)) for v in FULL.values())
    stats = {"orca_chat_rows": n_orca, "fanfics_rows": n_fan, "red_pajama_rows": n_paj}
    (data / "orca-chat").mkdir(parents=True)
    system_prompts = ["You are an AI assistant. Provide a detailed answer so user don't need to search outside to understand the answer.",
                      "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
                      "", "You are an AI assistant that follows instruction extremely well. Help as much as you can."]
    with open(data / "orca-chat" / "orca-chat-gpt4.json", "w", encoding="utf-8") as f:
        for i in range(n_orca):
            turns = int(rng.integers(1, 7))
            conv = [{"input": doc_text(pool, rng, f"q{i}.{t}", int(min(20_000, rng.lognormal(5.7, 0.8)))),
                     "output": doc_text(pool, rng, f"a{i}.{t}", int(min(40_000, rng.lognormal(6.7, 0.8))))} for t in range(turns)]
            f.write(json.dumps({"instruction": system_prompts[i % 4], "conversation": conv}) + "\n")
    (data / "fanfics" / "data").mkdir(parents=True)
    shard_rows = max(1, n_fan // 8)
    for shard, start in enumerate(range(0, n_fan, shard_rows)):
        path = data / "fanfics" / "data" / f"train-{shard:05d}.parquet"
        with pq.ParquetWriter(path, pa.schema([("TEXT", pa.string()), ("TITLE", pa.string())]), compression="zstd") as w:
            for b in range(start, min(n_fan, start + shard_rows), 256):
                ids = range(b, min(n_fan, start + shard_rows, b + 256))
                texts = [doc_text(pool, rng, f"story {i}", int(rng.integers(40_000, 200_001))) for i in ids]
                w.write_table(pa.table({"TEXT": texts, "TITLE": [f"Story {i}" for i in ids]}))
    (data / "red_pajama").mkdir(parents=True)
    per_file = -(-n_paj // len(PAJAMA_SUBSETS))
    i = 0
    last = None
    for sub in PAJAMA_SUBSETS:
        with open(data / "red_pajama" / f"{sub}_sample.jsonl", "w", encoding="utf-8") as f:
            for _ in range(min(per_file, n_paj - i)):
                if last is not None and rng.random() < 1e-4:
                    f.write(last)  # an exact duplicate document
                else:
                    n = int(min(1_500_000, max(50, rng.lognormal(7.65, 1.3))))
                    last = json.dumps({"text": doc_text(pool, rng, f"{sub} {i}", n), "meta": json.dumps({"source": sub, "i": i})}) + "\n"
                    f.write(last)
                i += 1
    stats["input_bytes"] = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    return stats


_CHILD = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from orca8k.config import load_config
from orca8k.stages.mix import run
cfg = load_config(sys.argv[1], {"paths.root": sys.argv[2], "paths.data": "data"})
result = run(cfg)
print(json.dumps({"wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "summary": result.summary}))
"""


def run_mix(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(RECIPE), str(root)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mix failed at {root}")
    for line in proc.stdout.splitlines():
        if line.startswith("[mix]"):
            print("   ", line, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale(workdir: Path, name: str, scale: float, keep: bool) -> dict:
    root = workdir / f"mix-{name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    need = int(12e9 * scale * 1.3)
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed for scale {name}; use --workdir")
    print(f"[bench-mix] {name}: generating synthetic sources in {root / 'data'} ...", flush=True)
    t0 = time.perf_counter()
    stats = generate(root / "data", scale, np.random.default_rng(SEED))
    gen_seconds = time.perf_counter() - t0
    print(f"[bench-mix] {name}: {stats['input_bytes'] / 1e9:.2f} GB in {gen_seconds:.0f} s; running the mix ...", flush=True)
    load = os.getloadavg()[0]
    child = run_mix(root)
    manifest = json.loads((root / "artifacts" / "mix" / "manifest.json").read_text())
    rows_read = sum(s["read"]["rows"] for s in manifest["sources"].values())
    documents = sum(s["read"]["documents"] for s in manifest["sources"].values())
    chunks = sum(s["read"]["chunks"] for s in manifest["sources"].values())
    rows_out = manifest["totals"]["train"]["rows"] + manifest["totals"]["val"]["rows"]
    out = {
        "scale": scale,
        "input_rows": rows_read,
        "input_bytes": stats["input_bytes"],
        "documents": documents,
        "chunks": chunks,
        "train_rows": {n: s["train"]["rows"] for n, s in manifest["sources"].items()},
        "val_rows": {n: s["val"]["rows"] for n, s in manifest["sources"].items()},
        "duplicates": manifest["quarantine"]["duplicates"],
        "wall_seconds": round(child["wall_seconds"], 1),
        "cpu_seconds": round(child["cpu_seconds"], 1),
        "input_rows_per_second": round(rows_read / child["wall_seconds"]),
        "output_rows_per_second": round(rows_out / child["wall_seconds"]),
        "input_mb_per_second": round(stats["input_bytes"] / 1e6 / child["wall_seconds"], 1),
        "peak_rss_mib": round(child["peak_rss_bytes"] / 2**20, 1),
        "index_mib_estimate": round((36 * documents + 40 * chunks) / 2**20, 1),
        "output_bytes": sum(p.stat().st_size for p in (root / "artifacts" / "mix").iterdir()),
        "generate_seconds": round(gen_seconds, 1),
        "loadavg_1min_before": round(load, 2),
    }
    print(f"[bench-mix] {name}: " + json.dumps(out), flush=True)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="tenth,full", help="comma-separated: tenth, full, or a number (0.01)")
    parser.add_argument("--workdir", default=None, help="folder for the synthetic data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="orca8k-bench-mix-"))
    scales = {"tenth": 0.1, "full": 1.0}
    results = {}
    for name in args.scales.split(","):
        results[name] = bench_scale(workdir, name, scales[name] if name in scales else float(name), args.keep)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict = {"bench": "mix", "cpus": os.cpu_count(), "results": results, "target_full_wall_seconds": 600}
    if {"tenth", "full"} <= set(results):
        small, big = results["tenth"], results["full"]
        summary["peak_rss_ratio_full_over_tenth"] = round(big["peak_rss_mib"] / small["peak_rss_mib"], 3)
        summary["peak_rss_ratio_without_index"] = round(
            (big["peak_rss_mib"] - big["index_mib_estimate"]) / (small["peak_rss_mib"] - small["index_mib_estimate"]), 3
        )
        summary["wall_ratio_full_over_tenth"] = round(big["wall_seconds"] / small["wall_seconds"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
