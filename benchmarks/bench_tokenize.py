"""Throughput of the `tokenize` stage against the raw batched tokenizer and a per-example Python loop, on the same text.

    python benchmarks/bench_tokenize.py                       # ≥ 10 M tokens of ../shared/realdata, 5 rounds
    python benchmarks/bench_tokenize.py --tokens 2000000 --rounds 2           # a quicker look
    python benchmarks/bench_tokenize.py --packing-strategy bfd_text_fill     # the stage with text fill
    python benchmarks/bench_tokenize.py --num-proc 2 1        # the stage with 2 and with 1 process in every round

What it does, in one process (ratios are measured within one run, so machine load hits all sides alike):
1. start-up: the stage's imports in a fresh interpreter (datasets, transformers, pyarrow, sentencepiece's protobuf
   model, and Great Expectations for the token suite, which the stage imports on first use); they are imported before
   the stage is timed, and the JSON lists any package the stage still imported on its first run
   (`packages_first_imported_inside_the_stage`);
2. a sentencepiece BPE tokenizer trained as the demo's is (4,096 pieces, Llama-2 trainer settings, on the text's
   lines: no piece holds a newline, as in Llama-2's vocabulary);
3. the mix: `../shared/realdata` in the mix schema (orca-chat conversations, fanfics and RedPajama text chunked at
   65,535 chars), repeated with a per-copy marker in every segment (so no cache can help) until ≥ `--tokens`;
then `--rounds` rounds (default 5), each of:
4. raw batched tokenizer: `tokenizer(rendered_strings, add_special_tokens=False)` in batches of 256 over the same
   rows (the rendered training string of each chat, the text of each chunk) — tokenization only, no masks;
5. per-example loops on a `--loop-fraction` sample of the rows: `tokenizer(rendered)` one row at a time (the naive
   loop), and `ChatEncoder` one row at a time (the stage's own code without batching);
6. the stage, once per `--num-proc` value (the order turns each round): `orca8k.stages.tokenize.run(cfg)` (demo
   params, `max_length` 512, packing on) — encoding, masks, length rules, packing, Arrow writes, statistics and the
   token-level validation — timed after imports. Its `phase_seconds` are per phase; packing (`pack`,
   `save_packed`) runs in a thread beside `encode_val` and `validate`, so the phases add up to more than the wall
   time. `stage_cpu_seconds` include the `datasets.map` workers' (`RUSAGE_CHILDREN`); the phases' CPU seconds count
   the main process only.

Each round's ratios compare the stage with the raw batched tokenizer and the loops of that same round; the headline
figures (`stage_vs_raw_batched`, `stage_vs_loop_tokenizer`) are the **median over rounds** of those ratios, for the
first `--num-proc` value (params.yaml's without the flag); `variants` has every value's medians and rounds. Each
round is also printed to stderr as it ends.

Targets (issue 5, on 2 quiet cores): stage throughput ≥ 0.8 × the raw batched tokenizer and ≥ 2 × the naive loop.
Wall-clock ratios are the targets; CPU seconds per million characters are reported beside them because they hold
still on a shared machine (they sum the threads, so they show the work, not the parallel speed-up).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
CHUNK_CHARS = 65535
# what the stage imports, on import or lazily on first use: timed as start-up, in a fresh interpreter, and imported
# before the stage is timed (a fixed cost per run, not per token: GX alone takes ~2.5 s to import)
STAGE_MODULES = ("orca8k.stages.tokenize", "orca8k.validation.token_suite", "transformers.models.llama", "datasets",
                 "pyarrow.parquet", "multiprocess", "sentencepiece.sentencepiece_model_pb2", "tokenizers.implementations",
                 "transformers.convert_slow_tokenizer")


def realdata_dir() -> Path:
    for c in (os.environ.get("ORCA8K_REALDATA"), REPO.parent / "shared" / "realdata", Path("/work/shared/realdata")):
        if c and Path(c).is_dir():
            return Path(c)
    sys.exit("bench_tokenize: ../shared/realdata not found (set ORCA8K_REALDATA)")


def load_realdata(root: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(orca-chat records, [(source, document text)])."""
    import pyarrow.parquet as pq

    chats = [json.loads(line) for line in (root / "orca-chat" / "orca-chat-gpt4.jsonl").read_text().splitlines()]
    docs = [("red_pajama", json.loads(line)["text"])
            for line in (root / "red_pajama" / "sample.jsonl").read_text().splitlines()]
    docs += [("fanfics", t) for t in pq.read_table(root / "fanfics" / "train.parquet").column("TEXT").to_pylist()]
    return chats, docs


def mix_rows(chats: list[dict], docs: list[tuple[str, str]], copy: int) -> list[dict]:
    """One copy of the data in the mix schema; every segment carries the marker ` #copy`."""
    mark = f" #{copy}"
    rows = []
    for i, c in enumerate(chats):
        messages = [{"role": "system", "content": c["instruction"] + mark}] if c["instruction"] else []
        for turn in c["conversation"]:
            messages += [{"role": "user", "content": turn["input"] + mark},
                         {"role": "assistant", "content": turn["output"] + mark}]
        rows.append({"id": f"orca-chat-{copy}-{i}", "source": "orca-chat", "doc_id": f"{copy}-{i}", "kind": "chat",
                     "messages": messages, "text": None, "chunk_index": 0})
    for d, (source, text) in enumerate(docs):
        for k in range(0, len(text), CHUNK_CHARS):
            rows.append({"id": f"{source}-{copy}-{d}-{k}", "source": source, "doc_id": f"{copy}-{d}", "kind": "text",
                         "messages": None, "text": text[k:k + CHUNK_CHARS] + mark, "chunk_index": k // CHUNK_CHARS})
    return rows


def rendered(rows: list[dict]) -> list[str]:
    from orca8k.data.chat_format import render_chat

    return [render_chat(r["messages"]) if r["kind"] == "chat" else r["text"] for r in rows]


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (the `datasets.map` workers, reaped when the
    pool closes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def label(num_proc: int | None, cfg) -> str:
    return f"num_proc={cfg.tokenize.num_proc}" + ("" if num_proc is not None else " (params)")


def startup_seconds() -> float:
    code = f"import time; t = time.perf_counter(); import {', '.join(STAGE_MODULES)}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="at least this many tokens of text (default 10 M)")
    ap.add_argument("--loop-fraction", type=float, default=0.1, help="share of rows timed in the per-example loops")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--packing-strategy", default=None, choices=("bfd", "bfd_text_fill"),
                    help="tokenize.packing_strategy for the stage (default: params.yaml's)")
    ap.add_argument("--num-proc", type=int, nargs="+", default=None,
                    help="tokenize.num_proc for the stage (default: params.yaml's); several values run the stage once "
                         "per value in every round, the first one is the headline")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of raw batched, loops and stage(s) (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.num_proc:
        args.num_proc = list(dict.fromkeys(args.num_proc))  # each value once
    # the tokenizers library's own default (threads on), set before orca8k's quiet default (off) can apply: the raw
    # batched tokenizer and the stage then both use the cores; the loops are one call per row either way
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                       "GX_ANALYTICS_ENABLED": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    parallelism = os.environ["TOKENIZERS_PARALLELISM"]
    load_before = os.getloadavg()[0]
    startup = startup_seconds()

    from orca8k.config import load_config
    from orca8k.data.chat_format import ChatEncoder
    from orca8k.layout import Layout
    from orca8k.model.tokenizer import load_base_tokenizer, prepare_tokenizer, train_sentencepiece
    from orca8k.stages import run_stage

    for module in STAGE_MODULES:  # the stage's imports, timed above as start-up
        importlib.import_module(module)

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        chats, docs = load_realdata(realdata_dir())
        strategy = [f"tokenize.packing_strategy={args.packing_strategy}"] if args.packing_strategy else []
        base_overrides = [f"paths.root={work}", f"tokenize.max_length={args.max_length}", "tokenize.packing=true",
                          *strategy]
        layout_cfg = load_config(REPO / "params.yaml", base_overrides)

        def stage_cfg(num_proc: int | None):
            extra = [] if num_proc is None else [f"tokenize.num_proc={num_proc}"]
            return load_config(REPO / "params.yaml", base_overrides + extra)

        layout = Layout.from_config(layout_cfg)
        # the demo's tokenizer training (`orca8k.model.pretrain.build_demo_base`): every text cut into its lines, so
        # no piece holds a newline — as in Llama-2's vocabulary, where "\n" is always the byte piece <0x0A>
        texts = [t for _, t in docs] + [t["output"] for c in chats for t in c["conversation"]]
        lines = [ln for t in texts for ln in t.split("\n")]
        t0 = time.perf_counter()
        train_sentencepiece(lines, layout.base, vocab_size=args.vocab_size, input_sentence_size=200_000)
        spm_seconds = time.perf_counter() - t0
        tokenizer = prepare_tokenizer(load_base_tokenizer(layout.base))

        one = mix_rows(chats, docs, 0)
        sample = rendered(one)
        per_copy = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
        copies = max(1, -(-args.tokens // per_copy))
        rows = [r for c in range(copies) for r in mix_rows(chats, docs, c)]
        val = [r for r in rows[: len(one)] if r["kind"] == "chat"][:200]
        import pyarrow as pa
        import pyarrow.parquet as pq

        from orca8k.data.mix_output import MIX_SCHEMA

        layout.mix.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=MIX_SCHEMA), layout.mix_train)
        pq.write_table(pa.Table.from_pylist(val, schema=MIX_SCHEMA), layout.mix_val)
        layout.validation_result.parent.mkdir(parents=True)
        layout.validation_result.write_text(json.dumps({"success": True, "run_id": "bench"}))
        everything = rows + val
        texts = rendered(everything)
        chars = sum(map(len, texts))

        step = max(1, round(1 / args.loop_fraction))
        picked = everything[::step]
        n_rows = len(everything)
        del rows, everything  # the stage's workers fork this process: drop the row dicts (the texts stay)
        picked_texts = texts[::step]
        picked_chars = sum(map(len, picked_texts))
        encoder = ChatEncoder(tokenizer)
        variants = args.num_proc or [None]
        configs = {v: stage_cfg(v) for v in variants}
        labels = {v: label(v, configs[v]) for v in variants}
        rounds: list[dict] = []
        modules_before = set(sys.modules)
        first_imported: list[str] | None = None
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            # raw batched tokenizer on the same text
            t0, c0 = time.perf_counter(), time.process_time()
            raw_tokens = 0
            for i in range(0, len(texts), 256):
                raw_tokens += sum(map(len, tokenizer(texts[i:i + 256], add_special_tokens=False)["input_ids"]))
            raw_seconds, raw_cpu = time.perf_counter() - t0, time.process_time() - c0
            # per-example loops on a sample
            t0, c0 = time.perf_counter(), time.process_time()
            loop_tokens = sum(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in picked_texts)
            loop_seconds, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
            t0 = time.perf_counter()
            enc_tokens = 0
            for row in picked:
                out = (encoder.encode_chat_examples(row["messages"], args.max_length) if row["kind"] == "chat"
                       else encoder.encode_text_examples(row["text"], args.max_length))
                enc_tokens += sum(len(e) for e in out.examples)
            loop_encoder_seconds = time.perf_counter() - t0
            this = {"round": r, "load_average": round(load, 2), "raw_batched_seconds": round(raw_seconds, 3),
                   "raw_batched_cpu_seconds": round(raw_cpu, 2), "loop_tokenizer_seconds": round(loop_seconds, 3),
                   "loop_tokenizer_cpu_seconds": round(loop_cpu, 3),
                   "loop_encoder_seconds": round(loop_encoder_seconds, 3), "stages": {}}
            # the stage, once per variant; the variants' order turns each round
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                shutil.rmtree(layout.tokenized, ignore_errors=True)  # the previous run's output, outside the timing
                t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
                with contextlib.redirect_stdout(sys.stderr):  # the suite's lines: stdout ends with the JSON alone
                    result = run_stage("tokenize", configs[v])
                stage_seconds = time.perf_counter() - t0
                stage_cpu = time.process_time() - c0 + children_cpu() - k0  # the datasets.map workers' too
                if first_imported is None:  # packages the stage's first run imported that start-up did not time
                    first_imported = sorted({m.split(".")[0] for m in set(sys.modules) - modules_before
                                             if m.split(".")[0] not in modules_before and not m.startswith("_")})
                metrics = json.loads(layout.tokenize_metrics.read_text())
                stage_tokens = metrics["train"]["tokens"] + metrics["val"]["tokens"]
                # throughput on the same text: chars per second, so all sides count the same input
                this["stages"][labels[v]] = {
                    "seconds": round(stage_seconds, 3), "cpu_seconds": round(stage_cpu, 2), "tokens": stage_tokens,
                    "processes": result.summary.get("processes"),
                    "phase_seconds": result.summary.get("phase_seconds", {}),
                    "phase_cpu_seconds": result.summary.get("phase_cpu_seconds", {}),
                    "vs_raw_batched": round(raw_seconds / stage_seconds, 3),
                    "vs_loop_tokenizer": round((chars / stage_seconds) / (picked_chars / loop_seconds), 3),
                    "vs_loop_encoder": round((chars / stage_seconds) / (picked_chars / loop_encoder_seconds), 3)}
            rounds.append(this)
            print(json.dumps(this), file=sys.stderr)

        headline = labels[variants[0]]
        per_variant = {}
        for name in rounds[0]["stages"]:
            runs = [rd["stages"][name] for rd in rounds]
            per_variant[name] = {
                "stage_vs_raw_batched_median": median([x["vs_raw_batched"] for x in runs]),
                "stage_vs_loop_tokenizer_median": median([x["vs_loop_tokenizer"] for x in runs]),
                "stage_vs_loop_encoder_median": median([x["vs_loop_encoder"] for x in runs]),
                "stage_vs_raw_batched_per_round": [x["vs_raw_batched"] for x in runs],
                "stage_vs_loop_tokenizer_per_round": [x["vs_loop_tokenizer"] for x in runs],
                "stage_wall_seconds_per_round": [x["seconds"] for x in runs],
                "stage_wall_seconds_median": median([x["seconds"] for x in runs]),
                "stage_cpu_seconds_median": median([x["cpu_seconds"] for x in runs]),
                "processes": runs[0]["processes"],
                "phase_seconds_of_median_run": sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]["phase_seconds"],
            }
        head = per_variant[headline]
        stage_tokens = rounds[0]["stages"][headline]["tokens"]
        med = {k: median([rd[k] for rd in rounds]) for k in ("raw_batched_seconds", "loop_tokenizer_seconds",
                                                             "loop_encoder_seconds", "raw_batched_cpu_seconds",
                                                             "loop_tokenizer_cpu_seconds")}
        report = {
            "benchmark": "tokenize",
            "text_chars": chars,
            "mix_rows": n_rows,
            "copies_of_realdata": copies,
            "rounds": args.rounds,
            "raw_tokens": raw_tokens,
            "stage_tokens": stage_tokens,
            "headline": headline,
            "raw_batched_tok_per_s": round(raw_tokens / med["raw_batched_seconds"]),
            "stage_tok_per_s": round(stage_tokens / head["stage_wall_seconds_median"]),
            "loop_tokenizer_tok_per_s": round(loop_tokens / med["loop_tokenizer_seconds"]),
            "loop_encoder_tok_per_s": round(enc_tokens / med["loop_encoder_seconds"]),
            "raw_batched_seconds_median": med["raw_batched_seconds"],
            "stage_wall_seconds_median": head["stage_wall_seconds_median"],
            "stage_phase_seconds": head["phase_seconds_of_median_run"],
            # the targets' ratios: the median over rounds of each round's own ratio
            "stage_vs_raw_batched": head["stage_vs_raw_batched_median"],
            "stage_vs_loop_tokenizer": head["stage_vs_loop_tokenizer_median"],
            "stage_vs_loop_encoder": head["stage_vs_loop_encoder_median"],
            "variants": per_variant,
            "loop_tokenizer_cpu_seconds_per_mchar": round(med["loop_tokenizer_cpu_seconds"] / picked_chars * 1e6, 3),
            "raw_batched_cpu_seconds_per_mchar": round(med["raw_batched_cpu_seconds"] / chars * 1e6, 3),
            "stage_cpu_seconds_per_mchar": round(head["stage_cpu_seconds_median"] / chars * 1e6, 3),
            "import_seconds": round(startup, 2),
            "packages_first_imported_inside_the_stage": first_imported,
            "sentencepiece_train_seconds": round(spm_seconds, 2),
            "supervised_share_train": metrics["train"]["supervised_share"],
            "packed_fill_train": metrics["train"].get("fill"),
            "packing_strategy": metrics.get("packing_strategy"),
            "tokenizers_parallelism": parallelism,
            "cpu_count": os.cpu_count(),
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "targets": {"stage_vs_raw_batched": 0.8, "stage_vs_loop_tokenizer": 2.0},
        }
        report["met"] = {k: report[k] >= v for k, v in report["targets"].items()}
        print(json.dumps(report))
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
