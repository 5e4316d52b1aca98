"""GPU training check: a ~1B Llama on random tokens at 8k context, bf16, gradient checkpointing, packed vs padded.

Needs only torch and transformers (and numpy) — no accelerate, deepspeed, datasets or network, no ../shared. Run it
through `benchmarks/gpu_check.sh` (≤ 5 min on one modern GPU); `--tiny` runs the same code on CPU in seconds.

Steps:
1. the bf16 matmul peak of this device: the best of repeated 8192³ `torch.mm` (TFLOP/s);
2. a Llama of ≈ 1.1 B parameters built from its config (hidden 2048, 16 layers, 16 heads, MLP 5,632, vocab 32,016,
   native context 4,096 with linear RoPE × 2 → 8,192, the project's convention), fp32 master weights, bf16 autocast
   (what `TrainingArguments(bf16=True)` does), gradient checkpointing (non-re-entrant), torch AdamW (fused on CUDA),
   attention: flash_attention_2 when the package is installed (sdpa again if that run fails), else sdpa — packed
   rows carry no attention mask, so transformers 5 builds a block-diagonal mask from `position_ids` (sdpa) or runs
   varlen (flash-attention 2);
3. synthetic examples with lengths like the recipe's mix (a seeded log-uniform draw between 64 and 8,192 tokens), the
   same examples collated two ways with the project's own code (`orca8k.data.packing.plan_bins` +
   `orca8k.data.collate.CausalLMCollator`): `packing` (rows of ≤ 8,192 tokens, no cross-attention) and `padded`
   (the seed's collator: 2 examples per batch, padded to the longer);
4. a few timed optimiser steps each after warm-up: useful (non-pad) tokens/s, padding fraction, peak memory, and MFU =
   useful tokens/s × (6·N + 12·n_layers·d_model·s) / the measured bf16 peak (N without the input embedding, s the
   batch's padded length; the attention term not halved for causality; `mfu_6n` without it).

The last stdout line is one JSON object (errors, e.g. an out-of-memory, are reported in its `errors` list).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orca8k.data.collate import CausalLMCollator  # noqa: E402  (torch + the format constants only)
from orca8k.data.packing import plan_bins  # noqa: E402  (numpy only)

PAD, BOS = 2, 1


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_examples(count: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    """Examples `<s> …` with log-uniform lengths in [64, max_length]; the first token's label is -100 (as the
    project's encoder labels position 0), half of the rest supervised like a chat reply."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(64), math.log(max_length), size=count)).astype(int)
    out = []
    for n in lengths:
        ids = [BOS, *rng.integers(3, vocab, size=int(n) - 1).tolist()]
        cut = int(n) // 2
        labels = [-100] * cut + ids[cut:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def packed_rows(examples: list[dict], max_length: int) -> list[dict]:
    rows = []
    for b in plan_bins([len(e["input_ids"]) for e in examples], max_length):
        ids, labels, pos = [], [], []
        for i in b:
            ids += examples[i]["input_ids"]
            labels += examples[i]["labels"]
            pos += list(range(len(examples[i]["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def build_model(args, device: str, attn: str):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers 5 names the RoPE settings `rope_parameters`; 4.x `rope_scaling` (tolerate either install)
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    else:
        rope = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0}
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.max_length // 2, tie_word_embeddings=False, use_cache=False, **rope,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # fp32 master weights
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def timed(model, batches: list[dict], device: str, warmup: int, steps: int, autocast_dtype) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                            fused=device == "cuda")

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**batch, use_cache=False).logits
        loss = loss_fn(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for i in range(warmup):
        step(batches[i % len(batches)])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    useful = positions = 0
    weighted_len = 0.0
    start = time.perf_counter()
    losses = []
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]
        losses.append(step(batch))
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else real_tokens_packed(batch)
        useful += real
        positions += batch["input_ids"].numel()
        weighted_len += real * batch["input_ids"].shape[1]
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "useful_tokens": useful, "positions": positions, "mean_seq_len": weighted_len / useful,
            "steps": steps, "loss_last": losses[-1],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def real_tokens_packed(batch: dict) -> int:
    """Real tokens of packed rows: the trailing pad pseudo-example (it starts with PAD, examples with BOS) excluded."""
    total = 0
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        restarts = [i for i, p in enumerate(pos) if p == 0]
        last = restarts[-1]
        total += last if last > 0 and ids[last] == PAD else len(ids)
    return total


def measure(args, device, attn, autocast_dtype, peak, packed, padded, result) -> None:
    """Build the model with `attn`, time both collations, and fill `result` (in place)."""
    model = build_model(args, device, attn)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    print(f"[gpu_check] Llama {n / 1e9:.3f} B non-embedding parameters, attention {attn}, gradient checkpointing",
          flush=True)
    result.update({"attention": attn, "parameters_non_embedding": n})
    for name, batches in (("packing", packed), ("padded", padded)):
        r = timed(model, batches, device, args.warmup, args.steps, autocast_dtype)
        tps = r["useful_tokens"] / r["seconds"]
        flops = 6 * n + 12 * args.layers * args.hidden * r["mean_seq_len"]
        result[name] = {
            "useful_tokens_per_second": round(tps, 1),
            "padding_fraction": round(1 - r["useful_tokens"] / r["positions"], 4),
            "mfu": round(tps * flops / (peak * 1e12), 4),
            "mfu_6n": round(tps * 6 * n / (peak * 1e12), 4),
            "mean_seq_len": round(r["mean_seq_len"], 1),
            "steps": r["steps"], "seconds": round(r["seconds"], 2), "loss_last": round(r["loss_last"], 4),
            "peak_memory_gib": round(r["peak_memory_gib"], 2) if r["peak_memory_gib"] is not None else None,
        }
        print(f"[gpu_check] {name}: {json.dumps(result[name])}", flush=True)
    del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model at 512 tokens, fp32")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--examples", type=int, default=160)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab, args.max_length = 64, 2, 4, 128, 512, 512
        dtype, autocast_dtype, mm = torch.float32, None, 512
        args.steps, args.warmup = 2, 1
    else:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab, args.max_length = 2048, 16, 16, 5632, 32016, 8192
        dtype, autocast_dtype, mm = torch.bfloat16, torch.bfloat16, 8192
        if device != "cuda":
            sys.exit("gpu_check: no CUDA device (use --tiny for a CPU smoke run)")
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    peak = matmul_peak_tflops(device, dtype, mm, repeats=10)
    print(f"[gpu_check] {info} matmul peak {peak:.1f} TFLOP/s ({dtype})", flush=True)

    examples = synthetic_examples(args.examples, args.max_length, args.vocab, seed=0)
    collate = CausalLMCollator(pad_token_id=PAD)
    rows = packed_rows(examples, args.max_length)
    packed = [collate(rows[i:i + 2]) for i in range(0, len(rows) - 1, 2)]  # 2 rows per step, like padded
    padded = [collate(examples[i:i + 2]) for i in range(0, len(examples) - 1, 2)]
    attns = ["flash_attention_2", "sdpa"] if device == "cuda" and importlib.util.find_spec("flash_attn") else ["sdpa"]
    result = {**info, "matmul_peak_tflops": round(peak, 1), "matmul_dtype": str(dtype).replace("torch.", ""),
              "max_length": args.max_length, "errors": []}
    for attn in attns:  # flash-attention 2 when installed; sdpa if it fails here
        try:
            measure(args, device, attn, autocast_dtype, peak, packed, padded, result)
            break
        except Exception as err:  # noqa: BLE001 - report and fall back, never end without a JSON line
            result["errors"].append(f"{attn}: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
            print(f"[gpu_check] {attn} failed: {result['errors'][-1]}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if "packing" in result and "padded" in result:
        result["speedup_packing_over_padded"] = round(
            result["packing"]["useful_tokens_per_second"] / result["padded"]["useful_tokens_per_second"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
