"""Training throughput on CPU: packing against the seed's pad-to-longest collator, and model-FLOPs utilisation.

    python benchmarks/bench_train.py                 # ≈ 7 min on 2 quiet cores (much longer under load)
    python benchmarks/bench_train.py --quick         # a smoke run (tiny model, few steps)

What it does, in one process (ratios are measured within one run, so machine load hits every side alike):
1. the CPU's fp32 matmul peak: the best of repeated 1024³ `torch.mm` calls (GFLOP/s, all torch threads);
2. a sentencepiece tokenizer with the demo's settings on `../shared/realdata`, and the three sources encoded with the
   project's own code (`ChatEncoder.encode_rows`: length rules at `max_length`) — one example per row, as `tokenize`
   writes them before packing;
3. the demo's model (Llama, hidden 256, 4 layers, vocab 4,096 + 5 → 4,112), fp32, sdpa, torch's fused AdamW
   (`train.optim: adamw_torch_fused`) — a plain training step (forward, `causal_lm_loss`, backward, clip, AdamW), the
   same work as one HF Trainer step;
4. at the demo's `max_length` (512) and at 8,192, two collations of the same examples in the same seeded order,
   trained side by side (one batch of each in turn, each on its own copy of the model, so machine load hits both):
   - `packing`: `pack_examples` rows (best-fit decreasing, `position_ids` restarts), batches of 2 rows;
   - `padded`: the seed's collator, batches of 2 examples padded to the longer one (`CausalLMCollator` on examples);
   reporting useful (non-pad) tokens/s, the padding fraction, and MFU = useful tokens/s × FLOPs per token / peak;
5. beside the 512 runs, the same loop on full random batches (2 × 512 random tokens, no padding): the ceiling the
   issue quotes (≈ 50 % of peak by 6·N on 2 quiet cores);
6. beside them too, `packing` with the model and the loss under `torch.compile` (inductor), as
   `train.torch_compile: true` runs them through the Trainer (`orca8k.data.collate.training_loss`); compiling
   (20–35 s) happens in its warm-up steps, outside the timing: they run until two row lengths were seen, since
   dynamo compiles once more, with a dynamic length, at the second length. Packed rows are all near max_length, so
   that one dynamic graph serves every step; padded batches are not compiled here;
7. at 512 also `packing_text_fill`, uncompiled and compiled: the rows of `tokenize.packing_strategy: bfd_text_fill`
   (`orca8k.data.packing.text_fill_table`: chat examples whole, the texts cut again to fill the rows' free space),
   made from the examples in mix order as the stage reads them, then shuffled like the others.

FLOPs per token = 6·N + 12·n_layers·d_model·s (Kaplan et al. 2020; PaLM's attention term, Chowdhery et al. 2022,
appendix B), N = parameters without the input embedding, s = the row's length (packed rows: max_length; padded
batches: the batch's padded length). The attention term is **not** halved for causality (PaLM's convention); the
JSON also gives MFU by 6·N alone. Packed rows attend block-diagonally, but CPU sdpa has no variable-length kernel:
it computes the full s × s scores under a mask, so at 8,192 packing pays attention over whole rows that padding of
short examples never pays, and a 2-row padded batch pads at most half (the shorter row).

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_tokenize import load_realdata, mix_rows, realdata_dir  # noqa: E402  (one loader for the benchmarks)

BATCH_ROWS = 2  # the seed's per-device batch


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 GFLOP/s of `torch.mm(n × n, n × n)` (2·n³ FLOPs) over `repeats` calls after a warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def build_tokenizer(texts: list[str], folder: Path, vocab_size: int):
    from orca8k.model.tokenizer import load_base_tokenizer, prepare_tokenizer, train_sentencepiece

    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    train_sentencepiece(lines, folder, vocab_size=vocab_size, input_sentence_size=min(len(lines), 60000), seed=0)
    return prepare_tokenizer(load_base_tokenizer(folder))


def encode_examples(encoder, rows: list[dict], max_length: int) -> list[dict]:
    """One dict per example (`input_ids`, `labels`), as the tokenize stage keeps them before packing."""
    out = []
    for i in range(0, len(rows), 256):
        batch = rows[i:i + 256]
        encoded = encoder.encode_rows([r["kind"] for r in batch], [r["messages"] for r in batch],
                                      [r["text"] for r in batch], max_length)
        out += [{"input_ids": e.input_ids, "labels": e.labels, "kind": r["kind"], "row_id": r["id"]}
                for r, row in zip(batch, encoded, strict=True) for e in row.examples]
    return out


def text_fill_rows(examples: list[dict], max_length: int, bos_id: int) -> list[dict]:
    """Packed rows as `tokenize.packing_strategy: bfd_text_fill` makes them (`text_fill_table`, then `pack_table`
    with its plan), from the examples in mix order (as the stage reads them)."""
    import pyarrow as pa

    from orca8k.data.packing import pack_table, text_fill_table

    ints = pa.list_(pa.int32())
    table = pa.table({"row_id": [e["row_id"] for e in examples], "kind": [e["kind"] for e in examples],
                      "input_ids": pa.array([e["input_ids"] for e in examples], ints),
                      "labels": pa.array([e["labels"] for e in examples], ints)})
    fill = text_fill_table(table, max_length, bos_id)
    whole = table.take(pa.array(fill.whole, pa.int64())).select(["input_ids", "labels"])
    pieces = pa.table({"input_ids": fill.input_ids, "labels": fill.labels})
    return pack_table(pa.concat_tables([whole, pieces]), max_length, fill.bins).to_pylist()


def make_model(vocab: int, hidden: int, layers: int, heads: int, intermediate: int, native: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=native,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                         tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def non_embedding_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


class Runner:
    """One collation's training loop: its own copy of the model and optimiser; `step()` times one batch."""

    def __init__(self, model, batches: list[dict], compile: bool = False):
        import copy

        import torch

        self.model = copy.deepcopy(model)
        self.compiled = compile
        if compile:
            self.model.compile()
        self.batches = batches
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                     fused=True)  # train.optim's default, adamw_torch_fused
        self.i = 0
        self.useful = self.positions = self.done = 0
        self.seconds = self.attn_weighted = 0.0  # Σ useful tokens × padded length, for the attention FLOPs term

    def _train(self, batch) -> None:
        import torch

        from orca8k.data.collate import training_loss

        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = training_loss(self.compiled)(self.model(**inputs, use_cache=False), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def warm_up(self) -> None:
        """One step; compiled, steps until two row lengths were seen (dynamo's second compile: a dynamic length)."""
        lengths = set()
        while self.i < len(self.batches) and (not lengths or (self.compiled and len(lengths) < 2)):
            lengths.add(self.batches[self.i]["input_ids"].shape[1])
            self._train(self.batches[self.i])
            self.i += 1

    def step(self) -> None:
        from orca8k.training.trainer import real_token_count

        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        t = time.perf_counter()
        self._train(batch)
        self.seconds += time.perf_counter() - t
        real = int(real_token_count(batch, PAD_ID))
        self.useful += real
        self.positions += batch["input_ids"].numel()
        self.attn_weighted += real * batch["input_ids"].shape[1]
        self.done += 1

    def result(self) -> dict:
        return {"batches": self.done, "seconds": self.seconds, "useful_tokens": self.useful,
                "positions": self.positions, "mean_seq_len": self.attn_weighted / self.useful}


def run_interleaved(runners: list[Runner], seconds: float, max_batches: int | None = None) -> list[dict]:
    """Alternate one batch of each runner until each has spent `seconds` (at least 2 batches each, at most
    `max_batches`): load on the machine then hits every collation alike, so their ratio stays meaningful."""
    for r in runners:
        r.warm_up()
    while True:
        for r in runners:
            r.step()
        done = all(r.seconds >= seconds and r.done >= 2 for r in runners)
        if done or (max_batches is not None and all(r.done >= max_batches for r in runners)):
            return [r.result() for r in runners]


PAD_ID = 2


def summarise(r: dict, n6: float, layers: int, hidden: int, peak_gflops: float) -> dict:
    tps = r["useful_tokens"] / r["seconds"]
    flops_per_token = n6 + 12 * layers * hidden * r["mean_seq_len"]
    return {
        "useful_tokens_per_second": round(tps, 1),
        "padding_fraction": round(1 - r["useful_tokens"] / r["positions"], 4),
        "mfu": round(tps * flops_per_token / (peak_gflops * 1e9), 4),
        "mfu_6n": round(tps * n6 / (peak_gflops * 1e9), 4),
        "mfu_attention_halved": round(tps * (n6 + 6 * layers * hidden * r["mean_seq_len"]) / (peak_gflops * 1e9), 4),
        "mean_seq_len": round(r["mean_seq_len"], 1),
        "batches": r["batches"],
        "seconds": round(r["seconds"], 2),
    }


def compare(model, examples: list[dict], max_length: int, seconds: float, max_batches: int | None, n6, layers, hidden,
            peak, ceiling: list[dict] | None = None, compiled: bool = False, text_fill_bos: int | None = None) -> dict:
    """Packing vs padded on the same examples (and, if given, full random batches: the ceiling; with
    `text_fill_bos`, `bfd_text_fill` packing too), interleaved."""
    from orca8k.data.collate import CausalLMCollator
    from orca8k.data.packing import pack_examples

    collate = CausalLMCollator(pad_token_id=PAD_ID)
    order = examples[:]
    random.Random(0).shuffle(order)  # the Trainer's shuffled order, for both collations
    fields = ("input_ids", "labels")
    packed_rows = pack_examples([{k: e[k] for k in fields} for e in order], max_length)
    random.Random(1).shuffle(packed_rows)

    def batches(rows: list[dict]) -> list[dict]:
        return [collate(rows[i:i + BATCH_ROWS]) for i in range(0, len(rows) - BATCH_ROWS + 1, BATCH_ROWS)]

    packed = batches(packed_rows)
    padded = batches([{k: e[k] for k in fields} for e in order])
    filled_rows = text_fill_rows(examples, max_length, text_fill_bos) if text_fill_bos is not None else []
    random.Random(1).shuffle(filled_rows)
    filled = batches(filled_rows)
    runs = {"packing": packed, "padded": padded, **({"random_full_batches": ceiling} if ceiling else {}),
            **({"packing_torch_compile": packed} if compiled else {}),
            **({"packing_text_fill": filled} if filled else {}),
            **({"packing_text_fill_torch_compile": filled} if filled and compiled else {})}
    runners = [Runner(model, b, compile=name.endswith("torch_compile")) for name, b in runs.items()]
    results = run_interleaved(runners, seconds, max_batches)
    out = {name: summarise(r, n6, layers, hidden, peak) for name, r in zip(runs, results, strict=True)}
    out["examples"] = len(order)
    out["packed_rows"] = len(packed_rows)
    if filled:
        out["packed_rows_text_fill"] = len(filled_rows)
    for name in runs:
        if name.startswith("packing"):
            out[f"speedup_{name}_over_padded"] = round(
                out[name]["useful_tokens_per_second"] / out["padded"]["useful_tokens_per_second"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke run)")
    parser.add_argument("--seconds", type=float, default=25.0, help="timed seconds per collation at max_length 512")
    parser.add_argument("--long-batches", type=int, default=2, help="timed batches per collation at 8,192")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run (≈ 35 s of compiling)")
    args = parser.parse_args()
    import torch

    from orca8k.data.chat_format import ChatEncoder

    hidden, layers, heads, inter, vocab_pieces = (256, 4, 4, 688, 4096) if not args.quick else (64, 2, 4, 128, 600)
    seconds = args.seconds if not args.quick else 2.0
    long_batches = args.long_batches if not args.quick else 1
    peak = matmul_peak_gflops()
    print(f"[bench_train] fp32 matmul peak {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)

    chats, docs = load_realdata(realdata_dir())
    rows = mix_rows(chats, docs, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer([t for _, t in docs] + [t["output"] for c in chats for t in c["conversation"]],
                              Path(tmp), vocab_pieces)
    encoder = ChatEncoder(tok)
    global PAD_ID
    PAD_ID = tok.pad_token_id
    vocab = -(-len(tok) // 16) * 16
    model = make_model(vocab, hidden, layers, heads, inter, native=256)
    n = non_embedding_params(model)
    print(f"[bench_train] model: {n:,} parameters without the input embedding, vocab {vocab}", flush=True)

    result = {"matmul_peak_gflops": round(peak, 1), "threads": torch.get_num_threads(),
              "model": {"hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab,
                        "parameters_non_embedding": n},
              "batch_rows": BATCH_ROWS,
              "flops_per_token": "6N + 12 n_layers d_model s (attention not halved; see mfu_attention_halved)"}
    # the ceiling (run side by side with the 512 runs): full random batches, 2 × 512 tokens, no padding at all
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH_ROWS, 512), generator=g)
    full = [{"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}]
    for max_length, kwargs in ((512, {"seconds": seconds, "max_batches": None, "ceiling": full,
                                      "compiled": not args.no_compile, "text_fill_bos": encoder.bos_id}),
                               (8192, {"seconds": float("inf"), "max_batches": long_batches})):
        examples = encode_examples(encoder, rows, max_length)
        if args.quick:
            examples = examples[:200]
        res = compare(model, examples, max_length, n6=6 * n, layers=layers, hidden=hidden, peak=peak, **kwargs)
        result[f"max_length_{max_length}"] = res
        print(f"[bench_train] max_length {max_length}: " + json.dumps(res), flush=True)
    # the peak again at the end: on a shared machine the best of both is the closer estimate of the true peak
    end_peak = matmul_peak_gflops()
    result["matmul_peak_gflops_end"] = round(end_peak, 1)
    if end_peak > peak:  # MFU against the higher of the two peaks
        rescale(result, peak / end_peak)
    print(json.dumps(result))


def rescale(node, factor: float) -> None:
    """Multiply every `mfu*` value in a nested dict by `factor` (in place)."""
    for key, value in node.items():
        if isinstance(value, dict):
            rescale(value, factor)
        elif key.startswith("mfu"):
            node[key] = round(value * factor, 4)


if __name__ == "__main__":
    main()
