"""The token-level suite: what `tokenize` checks on its own output (issue 5), through the shared GX harness.

Every check runs on scalar columns derived from the final arrays by `orca8k.data.token_stats` (never on the
encoder's own counters, except where the two are compared). Batches and suites:

- `<source>.<split>` (suite `tokens.chat` or `tokens.text`, by the examples' kind), one row per example:
  - both: no example exceeds `tokenize.max_length`; exactly one `<s>`, at position 0; every target's label equals
    the input id at its position;
  - chat: ≥ 1 supervised token; exactly one supervised `</s>` per assistant reply the example contains (a reply cut
    to fit has none); every `</s>` in the input closes a block (no forged end of sequence); no target outside the
    assistant replies (or the system block with `tokenize.train_on_system`); the replies counted from the arrays
    equal the encoder's `assistant_turns`;
  - text: every target supervised (`supervised_tokens = num_tokens − 1`: all but position 0); no role token; `</s>`
    only as the last token of the last window.
- `sources` (suite `tokens.sources`, one row per source and split): the supervised-token share within
  `[tokenize.min_supervised_share, tokenize.max_supervised_share]`. Split, cut and drop rates are reported beside it.
- `packed` (suite `tokens.packed`, one row per packed train row, with `tokenize.packing`): at most `max_length`
  tokens; positions restart at 0 at each example and step by 1 inside it; `<s>` exactly at each restart; no target
  on a restart; as many restarts as examples. `packing` (suite `tokens.packing`, one row): the packed rows hold
  exactly the examples' tokens and supervised tokens.

Result JSON: `layout.token_validation_result`; Data Docs: `layout.token_data_docs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from orca8k.config import Config
from orca8k.layout import Layout
from orca8k.validation.harness import Batch, Check, Suite, run_validation

SPLITS = ("train", "val")


def _zero(column: str, name: str, description: str) -> Check:
    return Check(name, gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[0]), description)


def _common(max_length: int, kind: str) -> list[Check]:
    return [
        Check("kind", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=[kind]), f"every example is {kind!r}"),
        Check("max_length", gxe.ExpectColumnValuesToBeBetween(column="num_tokens", min_value=2, max_value=max_length),
              f"2 ≤ num_tokens ≤ tokenize.max_length = {max_length}"),
        Check("one_bos", gxe.ExpectColumnValuesToBeBetween(column="bos_tokens", min_value=1, max_value=1),
              "exactly one <s> per example (bos_tokens = 1)"),
        Check("bos_first", gxe.ExpectColumnValuesToBeInSet(column="bos_first", value_set=[True]),
              "the <s> is at position 0"),
        _zero("label_mismatch", "labels_equal_inputs",
              "every supervised label equals the input id at its position (label_mismatch = 0)"),
    ]


def chat_suite(max_length: int, train_on_system: bool) -> Suite:
    where = "the assistant replies and the system block" if train_on_system else "the assistant replies"
    return Suite("tokens.chat", tuple(_common(max_length, "chat") + [
        Check("supervised_min", gxe.ExpectColumnValuesToBeBetween(column="supervised_tokens", min_value=1),
              "every chat example has ≥ 1 supervised token"),
        _zero("eos_per_reply_error", "one_eos_per_reply",
              "exactly one supervised </s> per assistant reply the example contains "
              "(supervised_eos − complete_replies = 0; a reply cut to fit has no </s>)"),
        _zero("unclosed_or_forged_eos", "eos_closes_blocks",
              "every </s> in the input closes a system/prompter/assistant block, and every complete block has one "
              "(system + prompter + complete replies − eos_tokens = 0): no end of sequence forged from text"),
        _zero("supervised_outside_reply", "supervised_only_in_replies",
              f"no target outside {where} (no loss on role tokens, prompter turns"
              f"{'' if train_on_system else ', the system block'})"),
        _zero("turns_disagree", "replies_match_encoder",
              "the replies counted from the arrays equal the encoder's assistant_turns"),
    ]))


def text_suite(max_length: int) -> Suite:
    return Suite("tokens.text", tuple(_common(max_length, "text") + [
        _zero("unsupervised_targets", "all_targets_supervised",
              "pretraining text: every token after <s> is supervised (num_tokens − 1 − supervised_tokens = 0)"),
        _zero("role_tokens", "no_role_tokens", "no <|system|>/<|prompter|>/<|assistant|> in pretraining text"),
        _zero("eos_not_at_end", "eos_only_at_the_end",
              "</s> appears only as the last token (of a text's last window): eos_tokens − ends_with_eos = 0"),
    ]))


def sources_suite(min_share: float, max_share: float) -> Suite:
    return Suite("tokens.sources", (
        Check("supervised_share",
              gxe.ExpectColumnValuesToBeBetween(column="supervised_share", min_value=min_share, max_value=max_share),
              f"per source and split, supervised tokens / tokens within [tokenize.min_supervised_share = "
              f"{min_share}, tokenize.max_supervised_share = {max_share}]"),
    ), min_rows=1)


def packed_suite(max_length: int) -> Suite:
    return Suite("tokens.packed", (
        Check("max_length", gxe.ExpectColumnValuesToBeBetween(column="num_tokens", min_value=1, max_value=max_length),
              f"every packed row ≤ tokenize.max_length = {max_length} tokens"),
        _zero("broken_positions", "positions_restart_and_step",
              "position_ids start at 0, restart at 0 at each example and step by 1 inside it"),
        _zero("restart_without_bos", "bos_at_each_restart",
              "each example (position restart) starts with <s>, and <s> appears nowhere else"),
        _zero("label_at_restart", "no_target_on_restart",
              "no example's first token is a target: the previous example is never trained to predict it"),
        _zero("segments_vs_examples", "one_segment_per_example", "position restarts = num_examples"),
    ))


def packing_totals_suite() -> Suite:
    return Suite("tokens.packing", (
        _zero("tokens_lost", "tokens_kept", "packed rows hold exactly the examples' tokens"),
        _zero("supervised_lost", "supervised_kept", "packed rows hold exactly the examples' supervised tokens"),
    ), min_rows=None)


def example_frame(stats: pd.DataFrame) -> pd.DataFrame:
    """The derived columns of the chat/text suites, from `tokenize`'s per-example statistics."""
    df = stats.copy()
    df["eos_per_reply_error"] = df["supervised_eos"] - df["complete_replies"]
    df["unclosed_or_forged_eos"] = (df["system_tokens"] + df["prompter_tokens"] + df["complete_replies"]
                                    - df["eos_tokens"])
    df["turns_disagree"] = df["complete_replies"] - df["assistant_turns"]
    df["unsupervised_targets"] = df["num_tokens"] - 1 - df["supervised_tokens"]
    df["role_tokens"] = df["system_tokens"] + df["prompter_tokens"] + df["assistant_tokens"]
    df["eos_not_at_end"] = df["eos_tokens"] - df["ends_with_eos"].astype(np.int64)
    return df


def rates_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per source and split from the tokenize metrics: share, split/cut/drop rates."""
    rows = []
    for split in SPLITS:
        for source, m in metrics[split]["sources"].items():
            rows.append({"id": f"{source}.{split}", "source": source, "split": split,
                         **{k: m[k] for k in ("examples", "tokens", "supervised_tokens", "supervised_share",
                                              "split_rate", "cut_rate", "drop_rate")}})
    return pd.DataFrame(rows)


def packed_frames(packed: dict[str, np.ndarray], stats: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = pd.DataFrame(packed)
    df.insert(0, "id", [f"row{i}" for i in range(len(df))])
    df["restart_without_bos"] = (df["segments"] - df["bos_at_restart"]) + (df["bos_tokens"] - df["bos_at_restart"])
    df["segments_vs_examples"] = df["segments"] - df["num_examples"]
    totals = pd.DataFrame([{
        "tokens_lost": int(stats["num_tokens"].sum()) - int(df["num_tokens"].sum()),
        "supervised_lost": int(stats["supervised_tokens"].sum()) - int(df["supervised_tokens"].sum()),
    }])
    return df, totals


@dataclass(frozen=True)
class PackedRows:
    """The packed rows' statistics while they are still being produced (`tokenize` packs in a thread).

    Args:
        stats: returns `packed_row_stats` per row + `num_examples` (waiting for them; raising what packing raised).
        fingerprint: the packing plan's hash, which the run id hashes for the deferred packed batches.
    """

    stats: Callable[[], dict[str, np.ndarray]]
    fingerprint: str


def build_token_batches(cfg: Config, stats: dict[str, pd.DataFrame],
                        packed: dict[str, np.ndarray] | PackedRows | None, metrics: dict[str, Any]) -> list[Batch]:
    """The batches of the token suite (see the module docstring); with `PackedRows`, the two packed batches come
    last and are deferred (`orca8k.validation.harness.Batch`) until its statistics are ready."""
    t = cfg.tokenize
    suites = {"chat": chat_suite(t.max_length, t.train_on_system), "text": text_suite(t.max_length)}
    batches = []
    for split in SPLITS:
        frame = example_frame(stats[split])
        for source, df in frame.groupby("source", sort=True):
            kinds = df["kind"].unique().tolist()
            kind = "chat" if "chat" in kinds else "text"  # a mixed source fails the suite's `kind` check
            batches.append(Batch(f"{source}.{split}", suites[kind], df.reset_index(drop=True), id_column="id"))
    batches.append(Batch("sources", sources_suite(t.min_supervised_share, t.max_supervised_share),
                         rates_frame(metrics), id_column="id"))
    if isinstance(packed, PackedRows):
        frames = functools.cache(lambda: packed_frames(packed.stats(), stats["train"]))
        batches.append(Batch("packed", packed_suite(t.max_length), lambda: frames()[0], id_column="id",
                             fingerprint=f"packed:{packed.fingerprint}"))
        batches.append(Batch("packing", packing_totals_suite(), lambda: frames()[1], id_column=None,
                             fingerprint=f"packing:{packed.fingerprint}"))
    elif packed is not None:
        rows, totals = packed_frames(packed, stats["train"])
        batches.append(Batch("packed", packed_suite(t.max_length), rows, id_column="id"))
        batches.append(Batch("packing", packing_totals_suite(), totals, id_column=None))
    return batches


def validate_tokens(cfg: Config, layout: Layout, stats: dict[str, pd.DataFrame],
                    packed: dict[str, np.ndarray] | PackedRows | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """Run the token suite, write its result JSON and Data Docs, and stop the stage on failure.

    Returns:
        `{"success", "run_id", "checks", "failed_checks", "result"}` for the stage summary.

    Raises:
        ValidationFailed: a check failed (the result JSON and Data Docs are written first).
    """
    report = run_validation(build_token_batches(cfg, stats, packed, metrics), run_name="tokens",
                            data_docs_dir=layout.token_data_docs)
    rates = {f"{r['source']}.{r['split']}": {k: r[k] for k in ("split_rate", "cut_rate", "drop_rate", "supervised_share")}
             for r in rates_frame(metrics).to_dict("records")}
    report.write_json(layout.token_validation_result, extra={"rates": rates, "max_length": cfg.tokenize.max_length})
    if report.success:  # on failure the same summary is the message of ValidationFailed (printed by the CLI)
        print(report.summary(), flush=True)
    report.raise_for_failure(f"the tokenized data ({layout.tokenized})")
    return {"success": report.success, "run_id": report.run_id, "checks": len(report.checks),
            "failed_checks": len(report.failures()), "result": str(layout.token_validation_result)}
