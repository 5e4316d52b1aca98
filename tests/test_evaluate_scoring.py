"""Token scoring and per-source metrics: exact values on crafted logits, determinism and padding on a tiny Llama."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from orca8k.data.chat_format import IGNORE_INDEX
from orca8k.data.collate import CausalLMCollator
from orca8k.evaluation.per_source import evaluate_per_source, per_source_metrics
from orca8k.evaluation.scoring import TokenStats, score_batch, score_logits
from tests.fixtures.models import make_tiny_llama

X = IGNORE_INDEX


class TableModel(torch.nn.Module):
    """Logits depend only on the current token: `logits[token] = table[token]` (a crafted bigram model)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


# vocab 4; row t = the next-token distribution after token t (log-probabilities, so softmax gives them back)
TABLE = torch.log(
    torch.tensor(
        [
            [0.1, 0.6, 0.2, 0.1],  # after 0: argmax 1
            [0.1, 0.1, 0.7, 0.1],  # after 1: argmax 2
            [0.4, 0.3, 0.2, 0.1],  # after 2: argmax 0
            [0.25, 0.25, 0.25, 0.25],  # after 3: a tie, argmax → index 0
        ]
    )
)


def test_token_accuracy_and_loss_are_exact_on_a_crafted_case():
    model = TableModel(TABLE)
    # sequence 0 1 2 1 3: predictions of positions 1..4 come from tokens 0, 1, 2, 1
    batch = {
        "input_ids": torch.tensor([[0, 1, 2, 1, 3]]),
        "labels": torch.tensor([[X, 1, 2, X, 3]]),  # scored: 1 after 0 (hit), 2 after 1 (hit), 3 after 1 (miss)
    }
    nll, correct, tokens = score_batch(model, batch)
    assert tokens.tolist() == [3]
    assert correct.tolist() == [2]
    assert nll.item() == pytest.approx(-(math.log(0.6) + math.log(0.7) + math.log(0.1)), abs=1e-6)


def test_tie_and_masked_rows_count_nothing_extra():
    logits = TABLE[torch.tensor([[3, 3], [0, 0]])]  # [2, 2, vocab]
    targets = torch.tensor([[0, 1], [X, X]])
    nll, correct, tokens = score_logits(logits, targets)
    assert tokens.tolist() == [2, 0] and correct.tolist() == [1, 0]  # the tie resolves to token 0
    assert nll.tolist() == pytest.approx([2 * math.log(4), 0.0])


def test_per_source_metrics_are_exact_and_grouped_by_source():
    model = TableModel(TABLE)
    rows = [
        {"source": "b", "input_ids": [0, 1, 2], "labels": [X, 1, 2]},  # hits: 1 after 0, 2 after 1
        {"source": "a", "input_ids": [2, 0], "labels": [X, 0]},  # hit: 0 after 2
        {"source": "b", "input_ids": [1, 3, 0, 1], "labels": [X, 3, X, 1]},  # miss 3 after 1, hit 1 after 0
    ]
    stats = evaluate_per_source(model, rows, CausalLMCollator(pad_token_id=3), batch_size=2)
    assert list(stats) == ["a", "b"]
    assert (stats["a"].tokens, stats["a"].correct) == (1, 1)
    assert (stats["b"].tokens, stats["b"].correct) == (4, 3)
    b_loss = -(math.log(0.6) + math.log(0.7) + math.log(0.1) + math.log(0.6)) / 4
    metrics = per_source_metrics(stats)
    assert metrics["b"]["eval_loss"] == pytest.approx(b_loss, abs=1e-6)
    assert metrics["b"]["perplexity"] == pytest.approx(math.exp(b_loss), rel=1e-6)
    assert metrics["b"]["token_accuracy"] == 0.75
    assert metrics["a"] == {
        "eval_loss": pytest.approx(-math.log(0.4), abs=1e-6),
        "perplexity": pytest.approx(1 / 0.4, rel=1e-6),
        "token_accuracy": 1.0,
        "supervised_tokens": 1,
    }


def test_rows_breaking_the_contract_name_the_row_and_field():
    with pytest.raises(ValueError, match=r"row 1: field 'labels'"):
        evaluate_per_source(TableModel(TABLE), [{"source": "a", "input_ids": [0, 1], "labels": [X, 1]},
                                                {"source": "a", "input_ids": [0, 1], "labels": [X]}], CausalLMCollator(3), 2)


def test_per_source_eval_is_deterministic_and_independent_of_batch_size():
    model = make_tiny_llama(50, context=64, seed=3)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(7):
        n = 5 + 3 * i
        ids = torch.randint(3, 50, (n,), generator=gen).tolist()
        labels = [X if j < n // 2 else t for j, t in enumerate(ids)]
        rows.append({"source": "s" if i % 2 else "t", "input_ids": ids, "labels": labels})
    first = evaluate_per_source(model, rows, CausalLMCollator(2), batch_size=3)
    second = evaluate_per_source(model, rows, CausalLMCollator(2), batch_size=3)
    assert first == second  # bit-identical
    one_by_one = evaluate_per_source(model, rows, CausalLMCollator(2), batch_size=1)
    for source in first:
        assert one_by_one[source].tokens == first[source].tokens
        assert one_by_one[source].correct == first[source].correct
        assert one_by_one[source].nll_sum == pytest.approx(first[source].nll_sum, rel=1e-5)


def test_token_stats_of_nothing_is_nan():
    assert math.isnan(TokenStats().eval_loss) and math.isnan(TokenStats().perplexity)
