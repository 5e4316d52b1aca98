"""The training loss is normalised per supervised token over the whole accumulated batch: batch 1 × accumulation 2
gives the same gradients as batch 2 × accumulation 1 when the two examples have different numbers of supervised
tokens (the seed's per-micro-batch mean does not)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from orca8k.config import load_config
from orca8k.layout import Layout
from orca8k.training.setup import build_trainer
from orca8k.training.trainer import supervised_loss_sums
from tests.fixtures.common import REPO
from tests.fixtures.train import build_train_inputs, tiny_train_overrides


@pytest.fixture(scope="module")
def two_examples(tmp_path_factory, base_tokenizer_dir, tokenizer_dir):
    """One chat and one text: very different supervised-token counts."""
    return build_train_inputs(tmp_path_factory.mktemp("two_examples"), base_tokenizer_dir, tokenizer_dir, train_rows=1)


class GradCapture(TrainerCallback):
    """Gradients and weights at the first optimiser step (before the update)."""

    def __init__(self):
        self.grads = self.weights = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            self.weights = {n: p.detach().clone() for n, p in model.state_dict().items()}


def _first_step(root, inputs, batch, accum, **extra):
    sets = tiny_train_overrides(root, inputs, **{
        "train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": accum, "train.max_steps": 1,
        "train.max_grad_norm": 1e9,  # no clipping: compare raw gradients
        **extra,
    })
    cfg = load_config(REPO / "params.yaml", sets)
    setup = build_trainer(cfg, Layout.from_config(cfg))
    capture = GradCapture()
    setup.trainer.add_callback(capture)
    setup.trainer.train()
    return capture, setup


def _reference_grads(setup, weights, naive: bool) -> dict[str, torch.Tensor]:
    """Plain torch on the same weights: loss = Σ target log-losses / Σ targets over both examples, or (naive, the
    seed's accumulation) the mean of the per-example means."""
    model = copy.deepcopy(setup.trainer.model)
    model.load_state_dict(weights)
    model.zero_grad()
    model.train()
    sums, counts = [], []
    for row in setup.trainer.train_dataset:
        s, c = supervised_loss_sums(model(input_ids=torch.tensor([row["input_ids"]])).logits, torch.tensor([row["labels"]]))
        sums.append(s.sum())
        counts.append(c.sum())
    loss = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums) if naive else sum(sums) / sum(counts)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_accumulation_normalises_per_supervised_token(tmp_path, two_examples):
    a, setup = _first_step(tmp_path / "a", two_examples, batch=1, accum=2)
    b, _ = _first_step(tmp_path / "b", two_examples, batch=2, accum=1)
    counts = [sum(1 for x in r["labels"][1:] if x != -100) for r in setup.trainer.train_dataset]
    assert len(counts) == 2 and counts[0] != counts[1], counts
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:  # same start (seeded load + embedding resize)
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert a.grads.keys() == b.grads.keys() and len(a.grads) > 10
    for name in a.grads:
        torch.testing.assert_close(a.grads[name], b.grads[name], rtol=1e-4, atol=1e-7, msg=name)

    exact = _reference_grads(setup, a.weights, naive=False)
    naive = _reference_grads(setup, a.weights, naive=True)
    for name in a.grads:
        torch.testing.assert_close(a.grads[name], exact[name], rtol=1e-4, atol=1e-7, msg=name)
    name = "model.layers.0.mlp.up_proj.weight"
    gap = float((naive[name] - exact[name]).abs().max() / exact[name].abs().max())
    assert gap > 0.05, f"the mean of micro-batch means should differ visibly; relative gap {gap:.3g}"


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, two_examples):
    plain, _ = _first_step(tmp_path / "plain", two_examples, batch=2, accum=1)
    ckpt, setup = _first_step(tmp_path / "ckpt", two_examples, batch=2, accum=1, **{"train.gradient_checkpointing": True})
    assert setup.trainer.model.is_activation_checkpointing
    for name in plain.grads:
        torch.testing.assert_close(ckpt.grads[name], plain.grads[name], rtol=1e-5, atol=1e-8, msg=name)
