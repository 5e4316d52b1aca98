"""Passkey retrieval: a random number hidden at a given depth of filler text, asked for at the end.

The synthetic test of the position-interpolation literature (Mohtashami & Jaggi 2023, "Landmark Attention",
arXiv:2305.16300; used by Chen et al. 2023, arXiv:2306.15595, to test linear RoPE scaling), with its prompt: an
instruction, `N` copies of the filler paragraph ("The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again.") with the key sentence inserted after `⌊depth × N + ½⌋` of them, then the question (the
demo's text data holds documents of the same format). `N` is the largest count for which the prompt, the key and
one extra generated token fit in the context length. Two scores per trial, from the same model:

- exact match: the first run of digits in the greedy continuation (`len(answer) + 1` new tokens) equals the key
  (read off one teacher-forced pass: see `evaluate_passkey`);
- `key_logprob_per_digit`: the teacher-forced log-probability of the key's tokens, divided by its digits
  (chance for a uniform guess over digits: `-ln 10 ≈ -2.303` nats).

Keys are drawn from `random.Random` seeded by the run seed, length, depth and trial (stable across runs and
machines). The prompt is plain text behind one BOS (`ChatEncoder.add_bos`, the BOS of training), as in the
literature; the fine-tuned model is trained on plain text too (the text sources).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from orca8k.errors import ConfigError
from orca8k.evaluation.scoring import score_logits

if TYPE_CHECKING:
    from orca8k.data.chat_format import ChatEncoder

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CHANCE_LOGPROB_PER_DIGIT = -math.log(10.0)


@dataclass(frozen=True)
class PasskeyTrial:
    """One prompt.

    Attributes:
        context_length: the length the prompt was fitted to (tokens).
        depth: asked depth (0 = key right after the instruction, 1 = right before the question).
        trial: index of the key for this (length, depth).
        key: the digits.
        prompt_ids: `[BOS, …]` up to and including the question (`[prompt_len]`).
        answer_ids: the key's tokens as they follow the question (`" {key}"`).
        filler_count: filler paragraphs `N`.
        key_index: filler paragraphs before the key sentence (`⌊depth × N + ½⌋`).
        key_token_position: index in `prompt_ids` where the key sentence starts.
        filler_token_span: `(start, end)` token indices of the filler region (key sentence included).
        key_sentence_tokens: tokens of the key sentence.
    """

    context_length: int
    depth: float
    trial: int
    key: str
    prompt_ids: list[int]
    answer_ids: list[int]
    filler_count: int
    key_index: int
    key_token_position: int
    filler_token_span: tuple[int, int]
    key_sentence_tokens: int

    @property
    def realised_depth(self) -> float:
        """Where the key sentence starts within the filler region without it, as a fraction of its tokens."""
        start, end = self.filler_token_span
        span = end - start - self.key_sentence_tokens
        return (self.key_token_position - start) / span if span > 0 else 0.0


def prompt_text(filler_count: int, key_index: int, key: str) -> tuple[str, str, str]:
    """The prompt as three strings: before the key sentence, the key sentence, after it (question included)."""
    before = " ".join([INTRO, *[FILLER] * key_index])
    after = " ".join([*[FILLER] * (filler_count - key_index), QUESTION])
    return before + " ", KEY_SENTENCE.format(key=key), " " + after


def draw_key(seed: int, context_length: int, depth: float, trial: int, digits: int) -> str:
    """A `digits`-digit key (no leading zero), the same for the same arguments on every run."""
    rng = random.Random(f"passkey:{seed}:{context_length}:{depth!r}:{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def build_trial(encoder: ChatEncoder, context_length: int, depth: float, key: str, trial: int = 0) -> PasskeyTrial:
    """Fit the passkey prompt to `context_length` tokens with the key at `depth`.

    Args:
        encoder: the fine-tuning tokenizer's `ChatEncoder` (plain-text ids, `add_bos`).
        context_length: tokens available for prompt + key + one extra generated token.
        depth: in [0, 1]; the key sentence follows `⌊depth × N + ½⌋` of the `N` filler paragraphs.
        key: the digits to hide.
        trial: recorded in the result.

    Returns:
        The trial with `N` as large as fits.

    Raises:
        ConfigError: `depth` is outside [0, 1], or not even zero filler paragraphs fit (names
            `evaluate.passkey`).
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"evaluate.passkey.depths: {depth} is outside [0, 1]")

    def encode(n: int) -> tuple[list[int], list[int], int, int, int]:
        k = int(depth * n + 0.5)  # round half up
        before, key_sentence, after = prompt_text(n, k, key)
        text = before + key_sentence + after
        prompt = encoder.add_bos(encoder.segment_ids(text, first=True))
        full = encoder.add_bos(encoder.segment_ids(text + " " + key, first=True))
        if full[: len(prompt)] != prompt:  # the key must not merge with the question's last token
            raise ValueError(f"passkey: the key {key!r} changes the tokens of the question")
        key_pos = len(encoder.add_bos(encoder.segment_ids(before.rstrip(" "), first=True)))
        return prompt, full[len(prompt) :], k, key_pos, len(encoder.segment_ids(key_sentence))

    def fits(n: int) -> bool:
        prompt, answer, *_ = encode(n)
        return len(prompt) + len(answer) + 1 <= context_length

    if not fits(0):
        raise ConfigError(
            f"evaluate.passkey: context length {context_length} is too short for the instruction, key and question"
        )
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # largest n with fits(n): fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    prompt, answer, k, key_pos, key_len = encode(low)
    filler_start = len(encoder.add_bos(encoder.segment_ids(INTRO, first=True)))
    filler_end = len(prompt) - len(encoder.segment_ids(" " + QUESTION))
    return PasskeyTrial(
        context_length, depth, trial, key, prompt, answer, low, k, key_pos, (filler_start, filler_end), key_len
    )


def make_trials(
    encoder: ChatEncoder, lengths: Sequence[int], depths: Sequence[float], trials: int, digits: int, seed: int
) -> list[PasskeyTrial]:
    """All trials: every length × depth × trial, keys from `draw_key`."""
    return [
        build_trial(encoder, length, depth, draw_key(seed, length, depth, t, digits), t)
        for length in lengths
        for depth in depths
        for t in range(trials)
    ]


@dataclass
class PasskeyResult:
    """The outcome of one trial."""

    context_length: int
    depth: float
    trial: int
    key: str
    generated_text: str
    generated_ids: list[int]
    correct: bool
    key_logprob: float
    key_logprob_per_digit: float
    prompt_tokens: int
    filler_count: int
    realised_depth: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_passkey(model: Any, tokenizer: Any, trials: Sequence[PasskeyTrial]) -> list[PasskeyResult]:
    """Score each trial with one forward pass over `prompt + key`: the key's log-probability and greedy exact match.

    Greedy decoding picks the arg-max at every step, so it reproduces the key's `n` tokens exactly when the arg-max
    at each key position, given the prompt and the key's earlier tokens, is the key's token — which is what the
    teacher-forced pass shows, position by position. The pass also gives the step after the key (does greedy stop
    the number there?) and, on a miss, the greedy output up to and including its first wrong token. This equals
    running `generate(do_sample=False)` for `n + 1` tokens (up to arithmetic ties), at the cost of a single prefill.

    Args:
        model: a causal LM in eval mode.
        tokenizer: decodes the greedy ids.
        trials: from `make_trials`.

    Returns:
        One `PasskeyResult` per trial, in order. `generated_text` is the greedy continuation: the key and the token
        after it on a hit, the tokens up to the first wrong one on a miss; `correct` is whether its first run of
        digits is the key (a digit after the key makes it a miss).
    """
    import torch

    device = next(model.parameters()).device
    results = []
    for t in trials:
        n = len(t.answer_ids)
        answer = torch.tensor([t.answer_ids], dtype=torch.long, device=device)  # [1, n]
        with torch.inference_mode():
            ids = torch.tensor([t.prompt_ids + t.answer_ids], dtype=torch.long, device=device)  # [1, prompt + n]
            logits = model(input_ids=ids, logits_to_keep=n + 1, use_cache=False).logits  # [1, n + 1, vocab]
            nll_sum, _, _ = score_logits(logits[:, :n], answer)
            greedy = logits[0].argmax(dim=-1).tolist()  # [n + 1]: the arg-max after each prefix of the key
        wrong = next((j for j in range(n) if greedy[j] != t.answer_ids[j]), n)
        generated = t.answer_ids[:wrong] + [greedy[wrong]]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        found = re.search(r"\d+", text)
        logprob = -float(nll_sum[0])
        results.append(
            PasskeyResult(
                t.context_length, t.depth, t.trial, t.key, text, generated,
                bool(wrong == n and found and found.group() == t.key), logprob, logprob / len(t.key),
                len(t.prompt_ids), t.filler_count, t.realised_depth,
            )
        )
    return results


def passkey_table(results: Sequence[PasskeyResult]) -> list[dict[str, Any]]:
    """DVC plot rows, one per (context_length, depth): `accuracy`, `key_logprob_per_digit` (mean over trials),
    `trials`."""
    groups: dict[tuple[int, float], list[PasskeyResult]] = {}
    for r in results:
        groups.setdefault((r.context_length, r.depth), []).append(r)
    return [
        {
            "context_length": length,
            "depth": depth,
            "accuracy": sum(r.correct for r in group) / len(group),
            "key_logprob_per_digit": sum(r.key_logprob_per_digit for r in group) / len(group),
            "trials": len(group),
        }
        for (length, depth), group in groups.items()
    ]


def passkey_summary(results: Sequence[PasskeyResult]) -> dict[str, Any]:
    """The `passkey` section of the eval metrics: overall accuracy and per-digit log-probability, the chance
    level, and both per context length."""
    if not results:
        return {"accuracy": math.nan, "key_logprob_per_digit": math.nan, "trials": 0}
    by_length: dict[str, dict[str, float]] = {}
    for length in sorted({r.context_length for r in results}):
        group = [r for r in results if r.context_length == length]
        by_length[str(length)] = {
            "accuracy": sum(r.correct for r in group) / len(group),
            "key_logprob_per_digit": sum(r.key_logprob_per_digit for r in group) / len(group),
        }
    return {
        "accuracy": sum(r.correct for r in results) / len(results),
        "key_logprob_per_digit": sum(r.key_logprob_per_digit for r in results) / len(results),
        "chance_logprob_per_digit": CHANCE_LOGPROB_PER_DIGIT,
        "trials": len(results),
        "by_context_length": by_length,
    }
