"""The OA chat format, label masks and BOS handling — one place for the rules that decide what the model learns.

Format (the seed's `v3`): `<s><|system|>{system}</s><|prompter|>{q1}</s><|assistant|>{a1}</s><|prompter|>{q2}</s>…`,
no system block when the system prompt is empty. Labels follow the HF convention (aligned to `input_ids`, the model
shifts): `IGNORE_INDEX` (-100) everywhere except the tokens of each assistant reply and its closing `</s>`;
`train_on_system=True` also supervises the system block (the seed did, by accident). Pretraining text is
`<s>{text}</s>` with every token supervised. Position 0 (`<s>`) is labelled -100 in every example: after the shift it
is never a target anyway, and in a packed row it keeps the previous example from being trained to predict `<s>`.

Text from the data is never parsed for special tokens: each segment is encoded on its own with special-token
matching off, and the special ids are inserted by id, so a user message containing `<|assistant|>` or `</s>` stays
plain text. Segments are encoded the way the tokenizer encodes text that follows a special token (no `▁` dummy
prefix, `legacy=False`), so encoding the rendered string with the tokenizer gives the same ids when the content
holds no special-token strings.

Length rules (`encode_chat_examples`, `encode_text_examples`, `encode_rows`; `max_length` in tokens, BOS included):
- a conversation longer than `max_length` is split between exchanges (a user turn and its reply) into several
  examples, each repeating the system block, so no turn is lost;
- an exchange that does not fit even alone is cut (`_cut_exchange`, deterministic) and counted;
- an example left without a supervised token is dropped and counted;
- a text longer than `max_length` is split into contiguous windows of near-equal size covering all of it, each
  starting with `<s>`; the last one ends with `</s>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from orca8k.model.segments import SegmentEncoder
from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PROMPTER, SYSTEM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": PROMPTER, "assistant": ASSISTANT}
EXCHANGE_SPECIAL_TOKENS = 4  # <|prompter|> </s> <|assistant|> </s>

# Jinja chat template saved with the tokenizer: renders exactly the training string (`<s>` included, as
# `apply_chat_template(..., tokenize=False)`; `apply_chat_template(..., tokenize=True)` adds no second BOS because
# the tokenizer adds no special tokens by itself).
OA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] %}<|system|>{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% elif message['role'] == 'user' %}<|prompter|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class RowError(ValueError):
    """A row of a batch breaks the input contract; `row` is its index in the batch (picklable across processes)."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(row, message)
        self.row, self.message = row, message

    def __str__(self) -> str:
        return f"row {self.row}: {self.message}"


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Check the conversation contract: an optional leading system message, then user/assistant alternating,
    starting with user, ending with assistant, every content a string.

    Raises:
        ValueError: naming the index and field of the first offending message.
    """
    if messages is None or len(messages) == 0:
        raise ValueError("messages: empty conversation")
    start = 1 if messages[0].get("role") == "system" else 0
    if start == 1 and not isinstance(messages[0].get("content"), str):
        raise ValueError("messages[0].content: system content must be a string")
    turns = messages[start:]
    if not turns:
        raise ValueError("messages: no user/assistant turn")
    for i, m in enumerate(turns, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise ValueError(f"messages[{i}].role: expected {expected!r}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content: expected a string")
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"messages[{len(messages) - 1}].role: a conversation must end with an assistant reply")


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """The training string of a conversation (what `OA_CHAT_TEMPLATE` renders), `<s>` included."""
    parts = [BOS]
    for m in messages:
        if m["role"] == "system" and not m["content"]:
            continue
        parts.append(f"{ROLE_TOKENS[m['role']]}{m['content']}{EOS}")
    return "".join(parts)


@dataclass
class Encoded:
    """One tokenized example. `labels` is aligned to `input_ids` (the model shifts); -100 = no loss.

    `meta`: `assistant_turns` (replies whose closing `</s>` is in this example), `cut_tokens` (tokens removed by a
    cut), `part`/`parts` (index and count of the examples one conversation or text was split into), and for chats
    `turns`: one `(start, end, role)` token span per message block (`<|role|>…</s>`).
    """

    input_ids: list[int]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class RowExamples:
    """The examples one source row (a conversation or a text chunk) became, with what the length rules did.

    Attributes:
        examples: kept examples, in order, each at most `max_length` tokens.
        dropped_examples: examples dropped because no token was left to supervise (kept for the quarantine file).
        cut_exchanges: exchanges (or system blocks) cut because one alone did not fit.
        cut_tokens: tokens removed by those cuts.
    """

    examples: list[Encoded]
    dropped_examples: list[Encoded] = field(default_factory=list)
    cut_exchanges: int = 0
    cut_tokens: int = 0

    @property
    def dropped(self) -> int:
        """Examples dropped (no supervised token)."""
        return len(self.dropped_examples)


@dataclass
class SegmentedRows:
    """A batch of mix rows after `ChatEncoder.segment_rows`: per row its kind, its messages (chat rows; None for
    text) and its segment ids (chat: one id list per message; text: the text's ids, with the `▁` dummy prefix)."""

    kinds: list[str]
    messages: list[Any]
    segment_ids: list[Any]


class ChatEncoder:
    """Encodes conversations, pretraining text and generation prompts with the OA format.

    Args:
        tokenizer: the fine-tuning tokenizer (`orca8k.model.tokenizer.prepare_tokenizer`).
        train_on_system: supervise the system block too (default off; the seed trained it by accident).

    Raises:
        ValueError: the tokenizer lacks an OA special token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on_system: bool = False) -> None:
        from orca8k.model.tokenizer import check_tokenizer

        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.train_on_system = train_on_system
        ids = tokenizer.convert_tokens_to_ids([BOS, EOS, SYSTEM, PROMPTER, ASSISTANT])
        self.bos_id, self.eos_id, self.system_id, self.prompter_id, self.assistant_id = ids
        self.role_ids = {"system": self.system_id, "user": self.prompter_id, "assistant": self.assistant_id}
        self.segments = SegmentEncoder(tokenizer)  # plain text → ids, special-token strings never matched

    # ------------------------------------------------------------------ pieces
    def segment_ids(self, text: str, *, first: bool = False) -> list[int]:
        """Token ids of plain text, special-token strings never matched.

        Args:
            text: the text.
            first: encode as text at the very start of a sequence (Llama's `▁` dummy prefix), as after `<s>` in
                pretraining; otherwise as text following a special token.
        """
        return self.segment_ids_batch([text], first=first)[0]

    def segment_ids_batch(self, texts: Sequence[str], *, first: bool = False) -> list[list[int]]:
        """`segment_ids` for many texts in one call into the Rust tokenizer (`SegmentEncoder.encode`)."""
        return self.segments.encode(texts, first=first)

    def add_bos(self, ids: list[int]) -> list[int]:
        """Prefix `<s>` exactly once: the one function that adds BOS, for training, evaluation and sampling.

        Raises:
            ValueError: `ids` already starts with BOS (a second BOS would be a bug upstream).
        """
        if ids and ids[0] == self.bos_id:
            raise ValueError("add_bos: sequence already starts with <s>")
        return [self.bos_id, *ids]

    # ------------------------------------------------------------------ examples, no length limit
    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> Encoded:
        """Encode a conversation with its label mask (BOS once, every assistant turn supervised), whatever its length.

        Returns:
            `Encoded` with `input_ids`/`labels` of equal length `[seq_len]` (see `Encoded.meta`).

        Raises:
            ValueError: the messages break the contract (see `check_messages`).
        """
        system, exchanges = self._chat_segments(messages, self.segment_ids_batch)
        return self._chat_examples(system, exchanges, None).examples[0]

    def encode_text(self, text: str, *, add_eos: bool = True) -> Encoded:
        """Encode pretraining text as `<s>{text}</s>`, every token after `<s>` supervised, whatever its length."""
        ids = self.segment_ids(text, first=True) + ([self.eos_id] if add_eos else [])
        return self._window(ids, 0, len(ids), 0, 1)

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """Generation prompt: `<s>[<|system|>{system}</s>]<|prompter|>{prompt}</s><|assistant|>` (OA v3; no system
        block when `system` is empty or None, which is OA v2_5)."""
        ids: list[int] = []
        if system:
            ids += [self.system_id, *self.segment_ids(system), self.eos_id]
        ids += [self.prompter_id, *self.segment_ids(prompt), self.eos_id, self.assistant_id]
        return self.add_bos(ids)

    # ------------------------------------------------------------------ examples within max_length
    def encode_chat_examples(self, messages: Sequence[dict[str, Any]], max_length: int) -> RowExamples:
        """Encode a conversation into examples of at most `max_length` tokens (see the module's length rules).

        Raises:
            ValueError: the messages break the contract, or `max_length` < 16.
        """
        _check_max_length(max_length)
        system, exchanges = self._chat_segments(messages, self.segment_ids_batch)
        return self._chat_examples(system, exchanges, max_length)

    def encode_text_examples(self, text: str, max_length: int, *, add_eos: bool = True) -> RowExamples:
        """Encode pretraining text into windows of at most `max_length` tokens covering all of it.

        Raises:
            ValueError: `max_length` < 16.
        """
        _check_max_length(max_length)
        return self._text_examples(self.segment_ids(text, first=True), max_length, add_eos)

    def encode_rows(
        self, kinds: Sequence[str], messages: Sequence[Any], texts: Sequence[str | None], max_length: int
    ) -> list[RowExamples]:
        """Batched `encode_chat_examples` / `encode_text_examples` over rows of the mix (one tokenizer call per
        segment kind for the whole batch; the same result as one call per row): `assemble_rows(segment_rows(...))`.

        Args:
            kinds: `"chat"` or `"text"` per row.
            messages: per row, the conversation (chat rows) or None.
            texts: per row, the text (text rows) or None.
            max_length: tokens per example, BOS included.

        Returns:
            One `RowExamples` per row, in order.

        Raises:
            RowError: (a ValueError) an unknown kind, a chat row breaking the conversation contract, or a text row
                without text; `.row` is the row's index.
        """
        _check_max_length(max_length)
        return self.assemble_rows(self.segment_rows(kinds, messages, texts), max_length)

    def segment_rows(self, kinds: Sequence[str], messages: Sequence[Any], texts: Sequence[str | None]
                     ) -> SegmentedRows:
        """The tokenizer's half of `encode_rows`: check the rows and encode every segment of the batch (one call into
        the Rust tokenizer per segment kind, which releases the GIL, so a thread can run it while another assembles
        the previous batch).

        Raises:
            RowError: as `encode_rows`.
        """
        chat_rows = [i for i, k in enumerate(kinds) if k == "chat"]
        text_rows = [i for i, k in enumerate(kinds) if k == "text"]
        if len(chat_rows) + len(text_rows) != len(kinds):
            bad = next(i for i, k in enumerate(kinds) if k not in ("chat", "text"))
            raise RowError(bad, f"kind {kinds[bad]!r} is neither 'chat' nor 'text'")
        segments: list[str] = []
        for i in chat_rows:
            try:
                check_messages(messages[i])
            except ValueError as err:
                raise RowError(i, str(err)) from None
            segments += [m["content"] for m in messages[i]]
        for i in text_rows:
            if not isinstance(texts[i], str):
                raise RowError(i, "a text row needs a string `text`")
        ids: list[Any] = [None] * len(kinds)
        chat_ids = iter(self.segment_ids_batch(segments))
        for i in chat_rows:
            ids[i] = [next(chat_ids) for _ in messages[i]]
        for i, ids_i in zip(text_rows, self.segment_ids_batch([texts[i] for i in text_rows], first=True),
                            strict=True):
            ids[i] = ids_i
        return SegmentedRows(list(kinds), [messages[i] if k == "chat" else None for i, k in enumerate(kinds)], ids)

    def assemble_rows(self, rows: SegmentedRows, max_length: int) -> list[RowExamples]:
        """The format's half of `encode_rows`: special ids, label masks and the length rules on `segment_rows`'s
        output (pure Python; no tokenizer call)."""
        _check_max_length(max_length)
        out: list[RowExamples] = []
        for kind, messages, ids in zip(rows.kinds, rows.messages, rows.segment_ids, strict=True):
            if kind == "chat":
                system, exchanges = self._chat_segments(messages, lambda _texts, ids=ids: ids, checked=True)
                out.append(self._chat_examples(system, exchanges, max_length))
            else:
                out.append(self._text_examples(ids, max_length, True))
        return out

    # ------------------------------------------------------------------ assembly (the format rules)
    def _chat_segments(self, messages: Sequence[dict[str, Any]], encode: Any, checked: bool = False
                       ) -> tuple[list[int] | None, list[tuple[list[int], list[int]]]]:
        """Segment ids of a conversation: the system content (None when absent or empty) and (user, reply) pairs."""
        if not checked:
            check_messages(messages)
        seg = encode([m["content"] for m in messages])
        start = 1 if messages[0]["role"] == "system" else 0
        system = seg[0] if start and messages[0]["content"] else None
        exchanges = [(seg[j], seg[j + 1]) for j in range(start, len(messages), 2)]
        return system, exchanges

    def _system_block(self, system: list[int] | None) -> tuple[list[int], list[int]]:
        if system is None:
            return [], []
        ids = [self.system_id, *system, self.eos_id]
        labels = [IGNORE_INDEX, *system, self.eos_id] if self.train_on_system else [IGNORE_INDEX] * len(ids)
        return ids, labels

    def _exchange_block(self, user: list[int], reply: list[int], complete: bool = True) -> tuple[list[int], list[int]]:
        end = [self.eos_id] if complete else []
        ids = [self.prompter_id, *user, self.eos_id, self.assistant_id, *reply, *end]
        labels = [IGNORE_INDEX] * (len(user) + 3) + reply + end
        return ids, labels

    def _example(self, header: tuple[list[int], list[int]], blocks: list[tuple[list[int], list[int]]],
                 **meta: Any) -> Encoded:
        ids, labels = list(header[0]), list(header[1])
        turns: list[tuple[int, int, str]] = []
        if header[0]:
            turns.append((1, 1 + len(ids), "system"))
        for b_ids, b_labels in blocks:
            user_end = b_ids.index(self.assistant_id)  # the first <|assistant|>: user text holds no special ids
            turns += [(1 + len(ids), 1 + len(ids) + user_end, "user"),
                      (1 + len(ids) + user_end, 1 + len(ids) + len(b_ids), "assistant")]
            ids += b_ids
            labels += b_labels
        return Encoded(self.add_bos(ids), [IGNORE_INDEX, *labels], {**meta, "turns": turns})

    def _chat_examples(self, system: list[int] | None, exchanges: list[tuple[list[int], list[int]]],
                       max_length: int | None) -> RowExamples:
        header = self._system_block(system)
        limit = max_length if max_length is not None else float("inf")
        result = RowExamples([])
        parts: list[tuple[tuple, list, int, int]] = []  # (header, blocks, assistant_turns, cut_tokens) per example
        current: list[tuple[list[int], list[int]]] = []
        used = 1 + len(header[0])
        for user, reply in exchanges:
            size = len(user) + len(reply) + EXCHANGE_SPECIAL_TOKENS
            if 1 + len(header[0]) + size > limit:  # does not fit even alone: cut it, in an example of its own
                if current:
                    parts.append((header, current, len(current), 0))
                    current, used = [], 1 + len(header[0])
                parts.append(self._cut_exchange(system, user, reply, int(limit)))
                result.cut_exchanges += 1
                continue
            if used + size > limit:
                parts.append((header, current, len(current), 0))
                current, used = [], 1 + len(header[0])
            current.append(self._exchange_block(user, reply))
            used += size
        if current:
            parts.append((header, current, len(current), 0))
        for part_header, blocks, complete_turns, cut in parts:
            example = self._example(part_header, blocks, assistant_turns=complete_turns, cut_tokens=cut)
            result.cut_tokens += cut
            (result.examples if example.num_supervised else result.dropped_examples).append(example)
        for k, example in enumerate(result.examples):
            example.meta.update(part=k, parts=len(result.examples))
        return result

    def _cut_exchange(self, system: list[int] | None, user: list[int], reply: list[int], max_length: int
                      ) -> tuple[tuple[list[int], list[int]], list, int, int]:
        """Cut one exchange (and, if it takes over half the room, the system content) to fit `max_length`.

        Deterministic rule: the system content keeps its start, and is cut only as far as needed to leave half of
        `max_length` to the exchange; the reply keeps its start and at least half of the remaining room (all of it
        if the user text is short); the user text keeps its end (the part next to the reply). A reply that was cut
        gets no closing `</s>` (it does not end there), so it is not counted in `assistant_turns`.

        Returns:
            `(system block, [exchange block], assistant_turns, cut_tokens)`.
        """
        system_len = len(system) + 2 if system is not None else 0
        original = 1 + system_len + len(user) + len(reply) + EXCHANGE_SPECIAL_TOKENS
        room = max_length - 1 - EXCHANGE_SPECIAL_TOKENS - system_len
        if system is not None and room < max_length // 2:
            system = system[: max(0, len(system) - (max_length // 2 - room))]
            room = max_length - 1 - EXCHANGE_SPECIAL_TOKENS - (len(system) + 2)
        reply_keep = min(len(reply), max(room - len(user), room // 2))
        user_keep = min(len(user), room - reply_keep)
        complete = reply_keep == len(reply)
        header = self._system_block(system)
        block = self._exchange_block(user[len(user) - user_keep:], reply[:reply_keep], complete)
        return header, [block], int(complete), original - (1 + len(header[0]) + len(block[0]))

    def text_example_arrays(self, text_ids: Sequence[int], max_length: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """`encode_text_examples`'s examples for a text's segment ids (`segment_ids(text, first=True)`), flattened with
        numpy instead of one list per example: the tokenize stage's path for the bulk of the tokens.

        Returns:
            `(input_ids, labels, lengths)`: int32 `[tokens]` arrays equal to the concatenation of the examples'
            `input_ids` and `labels` (each window gets `<s>` in front, labelled -100; the text ends with `</s>`), and
            each example's length. A window always holds a target, so no example is dropped.
        """
        ids = np.empty(len(text_ids) + 1, np.int32)
        ids[:-1] = text_ids
        ids[-1] = self.eos_id
        bounds = text_window_bounds(len(ids), max_length)
        starts = [start for start, _ in bounds]
        return (np.insert(ids, starts, self.bos_id), np.insert(ids, starts, IGNORE_INDEX),
                [end - start + 1 for start, end in bounds])

    def _text_examples(self, text_ids: list[int], max_length: int, add_eos: bool) -> RowExamples:
        ids = text_ids + ([self.eos_id] if add_eos else [])
        bounds = text_window_bounds(len(ids), max_length)
        result = RowExamples([])
        for k, (start, end) in enumerate(bounds):
            example = self._window(ids, start, end, k, len(bounds))
            (result.examples if example.num_supervised else result.dropped_examples).append(example)
        return result

    def _window(self, ids: list[int], start: int, end: int, part: int, parts: int) -> Encoded:
        window = ids[start:end]
        ends_text = end == len(ids) and bool(ids) and ids[-1] == self.eos_id
        return Encoded(self.add_bos(window), [IGNORE_INDEX, *window],
                       {"assistant_turns": 0, "cut_tokens": 0, "part": part, "parts": parts, "ends_text": ends_text})


def text_window_bounds(n_ids: int, max_length: int) -> list[tuple[int, int]]:
    """`(start, end)` of the windows a text of `n_ids` ids (its `</s>` included) is split into: contiguous, covering
    all of it, as few as fit `max_length - 1` ids each (the `<s>` in front takes one), of near-equal size (the first
    ones one id longer where the count does not divide)."""
    n_windows = max(1, -(-n_ids // (max_length - 1)))
    size, extra = divmod(n_ids, n_windows)
    bounds, start = [], 0
    for k in range(n_windows):
        end = start + size + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _check_max_length(max_length: int) -> None:
    if max_length < 16:
        raise ValueError(f"max_length={max_length}: at least 16 tokens are needed")
