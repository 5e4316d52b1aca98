"""Validation time of the `validate` stage (target: the full demo mix in ≤ 30 s on 2 cores), imports separately.

    python benchmarks/bench_validate.py                  # the demo mix: `orca8k demo-data` + `orca8k mix` in a
                                                         # scratch folder, then `orca8k validate` (a subprocess)
    python benchmarks/bench_validate.py --scale 0.1      # a synthetic mix in the contract schema at 1/10 of the
                                                         # seed card's row counts (fanfics chunks ≈ 40k chars)

Prints its figures as ONE JSON object on the last line: wall and CPU seconds of `orca8k validate` (interpreter
start included; CPU seconds stay meaningful on a busy shared machine), the stage's own split (imports — Great Expectations alone is ≈ 4–9 s —, read + derive, checks, Data
Docs), rows, text characters, peak RSS of the validate process, and whether the demo target was met.
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

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 30.0
# the seed card's rows per source and split (train rows after the fraction draw) and the fraction drawn
CARD = {
    "orca-chat": {"train": 188_842, "val": 5_000, "fraction": 1.0},
    "fanfics": {"train": 47_760, "val": 1_000, "fraction": 1.0},
    "red_pajama": {"train": 188_262, "val": 1_000, "fraction": 0.25},
}
TEXT_CHARS = {"fanfics": 40_000, "red_pajama": 5_000}  # mean chars of a text row (fanfics chunks ≤ 65,535)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orca8k", *args], cwd=cwd, env=_env(), capture_output=True, text=True)


def _cli_measured(*args: str, cwd: Path) -> tuple[int, str, str, float, float, float]:
    """Run `orca8k ARGS`; returns (status, stdout, stderr, wall s, CPU s, peak RSS MB) of that process alone."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "orca8k", *args], cwd=cwd, env=_env(), stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (proc.returncode, out.read(), err.read(), wall, usage.ru_utime + usage.ru_stime,
                usage.ru_maxrss / 1024)


def _synthetic_mix(mix_dir: Path, scale: float, seed: int = 0) -> None:
    """Write `{train,val}.parquet` + `manifest.json` in the contract schema, `scale` × the card's rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array("the of and to in a is that for it as was with be by on not he this are or his from at".split()
                     + [f"w{i}" for i in range(2000)])
    corpus = " ".join(rng.choice(words, size=2_000_000).tolist())  # ≈ 8 M chars; rows are slices of it
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("doc_id", pa.string()), ("kind", pa.string()),
                        ("messages", msg_type), ("text", pa.string()), ("chunk_index", pa.int32())])

    def piece(n: int) -> str:
        start = int(rng.integers(0, len(corpus) - n - 1))
        return corpus[start : start + n]

    manifest: dict = {"sources": {}}
    mix_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: pq.ParquetWriter(mix_dir / f"{split}.parquet", schema, compression="zstd") for split in ("train", "val")}
    for name, card in CARD.items():
        manifest["sources"][name] = {}
        for split in ("train", "val"):
            n = max(1, int(card[split] * scale))
            available = n if split == "val" else int(round(n / card["fraction"]))
            manifest["sources"][name][split] = {"rows": n, "chunks": available}
            for lo in range(0, n, 2000):
                rows = []
                for i in range(lo, min(n, lo + 2000)):
                    doc = f"{split}-{i}"
                    if name == "orca-chat":
                        msgs = [{"role": "system", "content": piece(80)}]
                        for _ in range(int(rng.integers(1, 4))):
                            msgs += [{"role": "user", "content": piece(300)}, {"role": "assistant", "content": piece(900)}]
                        rows.append({"id": f"{name}:{doc}", "source": name, "doc_id": doc, "kind": "chat",
                                     "messages": msgs, "text": None, "chunk_index": 0})
                    else:
                        size = int(min(65_535, rng.exponential(TEXT_CHARS[name]) + 100))
                        rows.append({"id": f"{name}:{doc}:0", "source": name, "doc_id": doc, "kind": "text",
                                     "messages": None, "text": piece(size), "chunk_index": 0})
                writers[split].write_table(pa.Table.from_pylist(rows, schema=schema))
    for w in writers.values():
        w.close()
    (mix_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=None, help="synthetic mix at this share of the seed card's rows")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    sets = ["--set", f"paths.root={scratch}"]
    try:
        if args.scale is None:
            mode = "demo"
            for step in (["demo-data", *sets], ["mix", *sets]):
                proc = _cli(*step, cwd=REPO)
                if proc.returncode != 0:
                    sys.exit(f"orca8k {step[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        else:
            mode = f"synthetic x{args.scale}"
            start = time.perf_counter()
            _synthetic_mix(scratch / "artifacts" / "mix", args.scale)
            print(f"[bench] synthetic mix written in {time.perf_counter() - start:.1f} s", flush=True)
            sets += [f"--set=data.sources.{name}.max_val_set={card['val']}" for name, card in CARD.items()]  # the seed's
        code, stdout, stderr, wall, cpu, peak_rss_mb = _cli_measured("validate", *sets, "--json", cwd=REPO)
        if code not in (0, 1):
            sys.exit(f"orca8k validate crashed ({code}):\n{stderr[-3000:]}")
        print(stdout[-4000:] + stderr[-4000:], flush=True)
        summary = json.loads(stdout.strip().splitlines()[-1])["summary"] if code == 0 else {}
        result = json.loads((scratch / "reports" / "validation" / "result.json").read_text())
        import pyarrow.parquet as pq

        text_chars = 0
        for split in ("train", "val"):
            table = pq.read_table(scratch / "artifacts" / "mix" / f"{split}.parquet", columns=["text"])
            import pyarrow.compute as pc

            text_chars += int(pc.sum(pc.utf8_length(table.column("text"))).as_py() or 0)
        figures = {
            "bench": "validate",
            "mode": mode,
            "cpu_count": os.cpu_count(),
            "success": result["success"],
            "rows": sum(sum(s.values()) for s in result["rows"].values()),
            "text_chars": text_chars,
            "checks": result["statistics"]["evaluated_checks"],
            "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),  # user + sys of the validate process: robust to a shared machine
            **{k: v for k, v in summary.items() if k.endswith("_seconds")},
            "peak_rss_mb": round(peak_rss_mb, 1),
            "target_seconds": TARGET_SECONDS,
            "within_target": (wall <= TARGET_SECONDS) if mode == "demo" else None,  # the target is the demo's
        }
        print(json.dumps(figures))
    finally:
        if args.keep:
            print(f"[bench] kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
