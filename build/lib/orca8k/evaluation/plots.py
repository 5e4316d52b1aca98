"""PNG figures of the evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_context(
    table: Sequence[Mapping[str, Any]], native_context: int, labels: Mapping[str, str], out: Path
) -> Path:
    """Perplexity vs context length, one line per model, the native context marked (log scale when the values span
    more than 3×, as an unscaled base blowing up past its context does).

    Args:
        table: rows with `model`, `context_length`, `perplexity` (the `layout.ppl_vs_context` table).
        native_context: the base's native context (a dashed vertical line).
        labels: legend text per model name.
        out: the PNG to write.

    Returns:
        `out`.
    """
    import math

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    finite = [r["perplexity"] for r in table if r["perplexity"] is not None and math.isfinite(r["perplexity"])]
    for model in dict.fromkeys(r["model"] for r in table):
        rows = sorted((r for r in table if r["model"] == model), key=lambda r: r["context_length"])
        ys = [r["perplexity"] if r["perplexity"] is not None else float("nan") for r in rows]
        ax.plot([r["context_length"] for r in rows], ys, marker="o", label=labels.get(model, model))
    if finite and max(finite) / min(finite) > 3:  # a blow-up past the native context: log scale, plain numbers
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axvline(native_context, color="grey", linestyle="--", linewidth=1)
    ax.text(native_context, ax.get_ylim()[1], " native context", va="top", fontsize=8, color="grey")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the same scored tokens")
    scored = {r.get("scored_tokens") for r in table}
    ax.set_title(
        "Perplexity vs context length (lower is better)"
        + (f"\n{scored.pop()} scored tokens per point, the same at every length" if len(scored) == 1 else ""),
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_passkey(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Passkey retrieval: exact-match accuracy and per-digit key log-probability vs context length, one line per
    depth (chance log-probability `-ln 10` dotted).

    Args:
        rows: the `layout.passkey` table (`context_length`, `depth`, `accuracy`, `key_logprob_per_digit`).
        out: the PNG to write.

    Returns:
        `out`.
    """
    import math

    plt = _pyplot()
    fig, (acc_ax, lp_ax) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=120)
    for depth in sorted({r["depth"] for r in rows}):
        sub = sorted((r for r in rows if r["depth"] == depth), key=lambda r: r["context_length"])
        xs = [r["context_length"] for r in sub]
        acc_ax.plot(xs, [r["accuracy"] for r in sub], marker="o", label=f"depth {depth:g}")
        lp_ax.plot(xs, [r["key_logprob_per_digit"] for r in sub], marker="o", label=f"depth {depth:g}")
    lp_ax.axhline(-math.log(10.0), color="grey", linestyle=":", linewidth=1, label="chance (−ln 10)")
    acc_ax.set_ylim(-0.05, 1.05)
    acc_ax.set_title("exact match of the greedy digits")
    lp_ax.set_title("log-probability of the key per digit (nats)")
    for ax in (acc_ax, lp_ax):
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Passkey retrieval, fine-tuned model")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
