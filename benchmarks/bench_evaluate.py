"""Cost of the evaluate stage on the demo, from params: a demo-sized random Llama (`base.architecture` of
params.yaml, fp32, CPU), synthetic token ids, the real scoring code.

    PYTHONPATH=src python benchmarks/bench_evaluate.py [--params params.yaml] [--per-source-tokens N]

Measures (one run, so ratios are comparable; CPU seconds too, since the machine is shared): PPL-vs-length for one model at the params' lengths, tail and budget
(the stage runs it for 3 models), per-source scoring throughput at `tokenize.max_length`, and the passkey trials
(teacher-forced scoring + greedy generation). Prints the projected stage time for `--per-source-tokens` validation
tokens (default: 150k, about the demo's val split). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


class _Encoder:
    """What the context scorer needs of a `ChatEncoder`: `add_bos`."""

    bos_id = 1

    def add_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id, *ids]


class _Tokenizer:
    pad_token_id = 2

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orca8k.config import load_config
    from orca8k.data.collate import CausalLMCollator
    from orca8k.evaluation.context import Document, context_lengths, perplexity_by_length, plan_targets
    from orca8k.evaluation.passkey import PasskeyTrial, evaluate_passkey
    from orca8k.evaluation.per_source import evaluate_per_source
    from orca8k.plan import padded_vocab_size

    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--per-source-tokens", type=int, default=150_000)
    args = parser.parse_args()
    cfg = load_config(args.params)
    arch, ev = cfg.base.architecture, cfg.evaluate
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.pad_vocab_size_multiple)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, max_position_embeddings=arch.max_position_embeddings,
        rope_scaling={"rope_type": "linear", "factor": cfg.model.rope_scaling.factor}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    config._attn_implementation = cfg.model.attn_implementation
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    native = arch.max_position_embeddings

    # PPL vs context length, one model
    lengths = context_lengths(native, ev.context_factors)
    docs = [Document(f"d{i}", "fanfics", torch.randint(3, arch.vocab_size, (4 * max(lengths),), generator=gen).tolist())
            for i in range(64)]
    blocks = plan_targets([len(d.ids) for d in docs], max(lengths), ev.scored_tail_tokens, ev.tokens_per_length)
    start, cpu = time.perf_counter(), time.process_time()
    perplexity_by_length(model, docs, blocks, lengths, ev.scored_tail_tokens, _Encoder(), ev.per_device_eval_batch_size)
    context_seconds, context_cpu = time.perf_counter() - start, time.process_time() - cpu
    context_tokens = len(blocks) * sum(lengths)

    # per-source scoring at tokenize.max_length
    rows = [{"source": "s", "input_ids": (ids := torch.randint(3, arch.vocab_size, (cfg.tokenize.max_length,), generator=gen).tolist()),
             "labels": ids} for _ in range(4 * ev.per_device_eval_batch_size)]
    start, cpu = time.perf_counter(), time.process_time()
    evaluate_per_source(model, rows, CausalLMCollator(pad_token_id=2), ev.per_device_eval_batch_size)
    per_source_seconds, per_source_cpu = time.perf_counter() - start, time.process_time() - cpu
    per_source_tok_s = len(rows) * cfg.tokenize.max_length / per_source_seconds

    # passkey: trials of the params' lengths (random prompts of the fitted size, 5-digit answers)
    trials = []
    for length in context_lengths(native, ev.passkey.context_factors):
        for depth in ev.passkey.depths:
            for t in range(ev.passkey.trials):
                n_answer = ev.passkey.digits + 1
                prompt = [1] + torch.randint(3, arch.vocab_size, (length - n_answer - 2,), generator=gen).tolist()
                trials.append(PasskeyTrial(length, depth, t, "1" * ev.passkey.digits, prompt, list(range(3, 3 + n_answer)),
                                           0, 0, 0, (0, 0), 0))
    start, cpu = time.perf_counter(), time.process_time()
    evaluate_passkey(model, _Tokenizer(), trials)
    passkey_seconds, passkey_cpu = time.perf_counter() - start, time.process_time() - cpu

    projected = 3 * context_seconds + args.per_source_tokens / per_source_tok_s + passkey_seconds
    # CPU seconds / threads: the wall time the same work takes on an idle machine (the machine is shared)
    threads = torch.get_num_threads()
    per_source_cpu_tok_s = len(rows) * cfg.tokenize.max_length / per_source_cpu
    projected_idle = (3 * context_cpu + args.per_source_tokens / per_source_cpu_tok_s + passkey_cpu) / threads
    print(json.dumps({
        "threads": threads,
        "load_average_1min": round(__import__("os").getloadavg()[0], 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "context_lengths": lengths,
        "context_windows_per_length": len(blocks),
        "context_forward_tokens_per_model": context_tokens,
        "context_seconds_per_model": round(context_seconds, 2),
        "context_forward_tok_per_s": round(context_tokens / context_seconds),
        "per_source_tok_per_s": round(per_source_tok_s),
        "passkey_trials": len(trials),
        "passkey_seconds": round(passkey_seconds, 2),
        "per_source_tokens_assumed": args.per_source_tokens,
        "context_cpu_seconds_per_model": round(context_cpu, 2),
        "per_source_cpu_seconds": round(per_source_cpu, 2),
        "passkey_cpu_seconds": round(passkey_cpu, 2),
        "projected_stage_compute_seconds": round(projected, 1),
        "projected_stage_compute_seconds_idle": round(projected_idle, 1),
    }))


if __name__ == "__main__":
    main()
