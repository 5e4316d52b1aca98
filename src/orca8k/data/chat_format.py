"""The OA chat format, label masks and BOS handling — one place for the rules that decide what the model learns.

Format (the seed's `v3`): `<s><|system|>{system}</s><|prompter|>{q1}</s><|assistant|>{a1}</s><|prompter|>{q2}</s>…`,
no system block when the system prompt is empty. Labels follow the HF convention (aligned to `input_ids`, the model
shifts): `IGNORE_INDEX` (-100) everywhere except the tokens of each assistant reply and its closing `</s>`;
`train_on_system=True` also supervises the system block (the seed did, by accident). Pretraining text is
`<s>{text}</s>` with every token supervised.

Text from the data is never parsed for special tokens: each segment is encoded on its own with special-token
matching off, and the special ids are inserted by id, so a user message containing `<|assistant|>` or `</s>` stays
plain text. Segments are encoded the way the tokenizer encodes text that follows a special token (no `▁` dummy
prefix, `legacy=False`), so encoding the rendered string with the tokenizer gives the same ids when the content
holds no special-token strings.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PROMPTER, SYSTEM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": PROMPTER, "assistant": ASSISTANT}

# Jinja chat template saved with the tokenizer: renders exactly the training string (`<s>` included, as
# `apply_chat_template(..., tokenize=False)`; tokenize the result with `add_special_tokens=False`).
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


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Check the conversation contract: an optional leading system message, then user/assistant alternating,
    starting with user, ending with assistant, every content a string.

    Raises:
        ValueError: naming the index and field of the first offending message.
    """
    if not messages:
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


def _set_dummy_prefix(node: Any, dummy_prefix: bool) -> Any:
    """Rewrite a tokenizers JSON spec so Llama's `▁` dummy prefix is always (True) or never (False) added:
    Metaspace pre-tokenizers get `prepend_scheme` always/never; legacy `Prepend("▁")` normalizers are dropped
    when no prefix is wanted."""
    if isinstance(node, list):
        return [x for x in (_set_dummy_prefix(n, dummy_prefix) for n in node) if x is not None]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Metaspace":
        return {**node, "prepend_scheme": "always" if dummy_prefix else "never"}
    if node.get("type") == "Prepend" and not dummy_prefix:
        return None
    return {k: _set_dummy_prefix(v, dummy_prefix) for k, v in node.items()}


def _segment_tokenizer(spec: dict[str, Any], dummy_prefix: bool) -> Any:
    from tokenizers import Tokenizer

    spec = copy.deepcopy(spec)
    for key in ("normalizer", "pre_tokenizer"):
        if spec.get(key) is not None:
            spec[key] = _set_dummy_prefix(spec[key], dummy_prefix)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.encode_special_tokens = True  # text is never parsed for special tokens
    return tok


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
    """One tokenized example. `labels` is aligned to `input_ids` (the model shifts); -100 = no loss."""

    input_ids: list[int]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatEncoder:
    """Encodes conversations, pretraining text and generation prompts with the OA format.

    Args:
        tokenizer: the fine-tuning tokenizer (`orca8k.model.tokenizer.prepare_tokenizer`).
        train_on_system: supervise the system block too (default off; the seed trained it by accident).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on_system: bool = False) -> None:
        self.tokenizer = tokenizer
        self.train_on_system = train_on_system
        ids = tokenizer.convert_tokens_to_ids([BOS, EOS, SYSTEM, PROMPTER, ASSISTANT])
        self.bos_id, self.eos_id, self.system_id, self.prompter_id, self.assistant_id = ids
        self.role_ids = {"system": self.system_id, "user": self.prompter_id, "assistant": self.assistant_id}
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        # Two segment encoders over the same vocabulary that never match special tokens inside text:
        # `_inner` for text after a special token (no dummy prefix), `_first` for text at the start (`▁` prefix).
        self._inner = _segment_tokenizer(spec, dummy_prefix=False)
        self._first = _segment_tokenizer(spec, dummy_prefix=True)

    # ------------------------------------------------------------------ pieces
    def segment_ids(self, text: str, *, first: bool = False) -> list[int]:
        """Token ids of plain text, special-token strings never matched.

        Args:
            text: the text.
            first: encode as text at the very start of a sequence (Llama's `▁` dummy prefix), as after `<s>` in
                pretraining; otherwise as text following a special token.
        """
        if not text:
            return []
        enc = (self._first if first else self._inner).encode(text, add_special_tokens=False)
        return list(enc.ids)

    def add_bos(self, ids: list[int]) -> list[int]:
        """Prefix `<s>` exactly once: the one function that adds BOS, for training, evaluation and sampling.

        Raises:
            ValueError: `ids` already starts with BOS (a second BOS would be a bug upstream).
        """
        if ids and ids[0] == self.bos_id:
            raise ValueError("add_bos: sequence already starts with <s>")
        return [self.bos_id, *ids]

    # ------------------------------------------------------------------ examples
    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> Encoded:
        """Encode a conversation with its label mask (BOS once, every assistant turn supervised).

        Returns:
            `Encoded` with `input_ids`/`labels` of equal length `[seq_len]`; `meta["turns"]` holds one
            `(start, end)` token span per message block (`<|role|>…</s>`, BOS excluded) for turn-boundary splits.

        Raises:
            ValueError: the messages break the contract (see `check_messages`).
        """
        check_messages(messages)
        input_ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int, str]] = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system" and not content:
                continue
            start = len(input_ids) + 1  # +1: BOS is prefixed below
            body = self.segment_ids(content) + [self.eos_id]
            supervised = role == "assistant" or (role == "system" and self.train_on_system)
            input_ids += [self.role_ids[role], *body]
            labels += [IGNORE_INDEX, *(body if supervised else [IGNORE_INDEX] * len(body))]
            spans.append((start, len(input_ids) + 1, role))
        return Encoded(self.add_bos(input_ids), [IGNORE_INDEX, *labels], {"turns": spans})

    def encode_text(self, text: str, *, add_eos: bool = True) -> Encoded:
        """Encode pretraining text as `<s>{text}</s>`, every token supervised (BOS too is a label position; the
        model never predicts it because labels are shifted)."""
        ids = self.add_bos(self.segment_ids(text, first=True) + ([self.eos_id] if add_eos else []))
        return Encoded(ids, list(ids))

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """Generation prompt: `<s>[<|system|>{system}</s>]<|prompter|>{prompt}</s><|assistant|>` (OA v3; no system
        block when `system` is empty or None, which is OA v2_5)."""
        ids: list[int] = []
        if system:
            ids += [self.system_id, *self.segment_ids(system), self.eos_id]
        ids += [self.prompter_id, *self.segment_ids(prompt), self.eos_id, self.assistant_id]
        return self.add_bos(ids)
