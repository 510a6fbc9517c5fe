"""Preference data: pairs of a prompt with a chosen and a rejected reply, checked, tokenized and collated.

A record is one of:

* ``{"prompt": str, "chosen": str, "rejected": str}``: plain text; the reply is appended to the prompt (and
  the end-of-sequence token to the reply), as TRL's ``DPOTrainer`` does for non-conversational data.
* ``{"prompt": [messages], "chosen": ..., "rejected": ...}`` or ``{"messages": [messages], "chosen": ...,
  "rejected": ...}``: a conversation rendered with the tokenizer's chat template; each reply is a string (one
  assistant message) or a list of messages. With ``format`` chat, string prompts become a user message.

Tokenization follows TRL: the prompt alone (with the generation prompt for chats) and the prompt followed by
each reply are tokenized, and the reply is what follows their common prefix; prompt plus reply is cut to
``max_length`` (``n_truncated``). Every problem is one error naming the file and line: a missing or empty
field, a chosen reply equal to the rejected one, supervised fields (``text``, ``instruction``, ``output``)
mixed into a pair, and a prompt that leaves no room for a reply within ``max_length``.

Collation puts the chosen sequences of a micro-batch first and the rejected ones after them, in one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fourbit._errors import FieldError

from .batching import Batch, collate
from .data import IGNORE_INDEX, Encoded, EncodedDataset
from .records import record_error

__all__ = ["DPO_LOSS_TYPES", "PAIR_FIELDS", "PREFERENCE_TASKS", "Pair", "PairBatch", "check_pairs", "collate_pairs", "encode_pairs"]

PAIR_FIELDS = ("chosen", "rejected")
PREFERENCE_TASKS = ("dpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_SUPERVISED_FIELDS = ("text", "instruction", "output")


@dataclass
class Pair:
    """One tokenized pair; ``ref_chosen``/``ref_rejected`` are the reference model's summed reply log-probs
    (DPO), filled in once before training."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    def __len__(self) -> int:
        """Tokens of both sequences (the prompt counts twice: it runs before each reply)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def input_ids(self) -> list[int]:
        """Both sequences, chosen then rejected (for fingerprints)."""
        return self.prompt_ids + self.chosen_ids + self.prompt_ids + self.rejected_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen_ids + [IGNORE_INDEX] + self.rejected_ids

    def sequences(self) -> tuple[Encoded, Encoded]:
        """The chosen and the rejected sequence, labelled on the reply only."""
        ignore = [IGNORE_INDEX] * len(self.prompt_ids)
        return (Encoded(self.prompt_ids + self.chosen_ids, ignore + self.chosen_ids),
                Encoded(self.prompt_ids + self.rejected_ids, ignore + self.rejected_ids))


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_messages(value: Any, name: str, fail: Any) -> None:
    if not isinstance(value, list) or not value:
        raise fail(f"'{name}' must be a string or a non-empty list of {{'role', 'content'}} messages, found "
                   f"{_type_name(value) if value != [] else 'an empty list'}")
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise fail(f"'{name}' item {n} must be a message with string 'role' and 'content'")


def _reply_text(value: Any) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _check_pair(record: Any, fmt: str, fail: Any) -> None:
    """One record: the fields of a pair, of the right types, two different non-empty replies."""
    if not isinstance(record, Mapping):
        raise fail(f"expected an object (column: value), found {_type_name(record)}")
    mixed = [k for k in _SUPERVISED_FIELDS if k in record]
    present = [k for k in PAIR_FIELDS if k in record]
    if mixed and present:
        raise fail(f"mixes supervised field '{mixed[0]}' with preference field '{present[0]}'; a record is "
                   "either a pair (prompt, chosen, rejected) or a supervised example, not both")
    prompt_key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    keys = {"prompt": prompt_key, "chosen": "chosen", "rejected": "rejected"}
    missing = [k for k, key in keys.items() if key is None or record.get(key) is None]
    if missing:
        found = f"supervised field '{mixed[0]}'" if mixed else f"the fields {sorted(record)}"
        raise fail(f"missing '{missing[0]}' (found {found}); a preference record has 'prompt' (or 'messages'), "
                   "'chosen' and 'rejected'")
    for key in (prompt_key, *PAIR_FIELDS):
        value = record[key]
        if isinstance(value, str):
            continue
        if fmt == "text":
            raise fail(f"'{key}' must be a string with `format` text, found {_type_name(value)}")
        _check_messages(value, key, fail)
    for key in PAIR_FIELDS:
        if not _reply_text(record[key]).strip():
            raise fail(f"'{key}' is empty; every pair needs two non-empty replies")
    if record["chosen"] == record["rejected"]:
        raise fail("'chosen' equals 'rejected'; a pair needs two different replies")


def check_pairs(records: Sequence[Mapping[str, Any]], *, format: str = "auto", source: str = "data") -> None:
    """Check preference records without a tokenizer (see the module docstring).

    Raises:
        InputFileError: naming the file and line of the first bad record (``ValueError`` for plain dicts).
        FieldError: ``format`` instruction (pairs are text or chat).
    """
    if format == "instruction":
        raise FieldError("format", "preference pairs are text or chat (prompt, chosen, rejected); use `format` "
                                   "auto, text or chat")
    if not records:
        raise ValueError(f"{source}: the dataset is empty")
    for i, record in enumerate(records):
        def fail(message: str, record: Any = record, i: int = i) -> ValueError:
            return record_error(record, i, source, message)

        _check_pair(record, format, fail)


def _is_chat(record: Mapping[str, Any], fmt: str) -> bool:
    prompt = record.get("prompt", record.get("messages"))
    return fmt == "chat" or not isinstance(prompt, str) or any(not isinstance(record[k], str) for k in PAIR_FIELDS)


def _as_messages(value: Any, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_pair(tokenizer: Any, record: Mapping[str, Any], chat: bool) -> tuple[list[int], list[int], list[int]]:
    """TRL's tokenization: prompt, prompt + chosen, prompt + rejected; the replies start at the common prefix."""
    prompt = record.get("prompt", record.get("messages"))
    if chat:
        messages = _as_messages(prompt, "user")
        p_ids = _chat_ids(tokenizer, messages, True)
        full = [_chat_ids(tokenizer, messages + _as_messages(record[k], "assistant"), False) for k in PAIR_FIELDS]
    else:
        eos = tokenizer.eos_token or ""
        replies = [r if r.endswith(eos) else r + eos for r in (record["chosen"], record["rejected"])]
        p_ids = list(tokenizer(prompt)["input_ids"])
        full = [list(tokenizer(prompt + r)["input_ids"]) for r in replies]
    n = min(_common_prefix(p_ids, full[0]), _common_prefix(p_ids, full[1]))
    return p_ids[:n], full[0][n:], full[1][n:]


def encode_pairs(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    format: str = "auto",
    max_length: int = 512,
    source: str = "data",
) -> EncodedDataset:
    """Check (:func:`check_pairs`) and tokenize preference records into :class:`Pair` examples.

    Args:
        records: rows from :func:`fourbit.train.records.load_records` (or plain dicts).
        tokenizer: a HF tokenizer (with a chat template for chat pairs).
        format: ``auto`` (chat when the prompt or a reply is a list of messages), ``text`` or ``chat``.
        max_length: prompt plus reply longer than this is cut to it (``n_truncated`` counts the pairs).

    Returns:
        An :class:`~fourbit.train.data.EncodedDataset` of :class:`Pair` (format ``pairs``).

    Raises:
        InputFileError: see :func:`check_pairs`; a prompt of ``max_length`` tokens or more, which leaves no
            room for a reply (naming the file, line and `max_length`); chat pairs with a tokenizer that has no
            chat template.
    """
    check_pairs(records, format=format, source=source)
    out = EncodedDataset([], format="pairs")
    for i, record in enumerate(records):
        chat = _is_chat(record, format)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise record_error(record, i, source, "a chat pair needs a tokenizer with a chat template; this one "
                                                  "has none (give the prompt and replies as strings)")
        prompt, chosen, rejected = _tokenize_pair(tokenizer, record, chat)
        if len(prompt) >= max_length:
            raise record_error(record, i, source, f"the prompt is {len(prompt)} tokens, leaving no room for a "
                                                  f"reply within `max_length` {max_length}; shorten the prompt or "
                                                  "raise `max_length`")
        room = max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            out.n_truncated += 1
        out.examples.append(Pair(prompt, chosen[:room], rejected[:room]))
    return out


@dataclass
class PairBatch:
    """A micro-batch of ``n_pairs`` pairs: ``batch`` holds the chosen sequences in rows ``[0, n_pairs)`` and
    the rejected ones in rows ``[n_pairs, 2 n_pairs)``, labelled on the replies; ``ref`` the cached reference
    log-probs ``[2 n_pairs]`` in the same order (None before they are computed)."""

    batch: Batch
    n_pairs: int
    ref: torch.Tensor | None

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_targets(self) -> int:
        """Pairs: the preference losses are means over pairs."""
        return self.n_pairs

    @property
    def n_chosen_tokens(self) -> int:
        """Predicted tokens of the chosen sequences, prompt included (ORPO's NLL term, as TRL's)."""
        mask = self.batch.attention_mask[: self.n_pairs, 1:]
        return int(mask.sum())

    def to(self, device: torch.device) -> PairBatch:
        from .step import to_device

        ref = None if self.ref is None else self.ref.to(device)
        return PairBatch(to_device(self.batch, device), self.n_pairs, ref)


def collate_pairs(rows: Sequence[Sequence[Pair]], pad_id: int) -> PairBatch:
    """Right-pad the chosen and the rejected sequences of ``rows`` (each a list of one :class:`Pair`) into one
    :class:`PairBatch`."""
    pairs = [row[0] for row in rows]
    seqs = [p.sequences() for p in pairs]
    batch = collate([[c] for c, _ in seqs] + [[r] for _, r in seqs], pad_id, packed=False)
    ref = None
    if all(p.ref_chosen is not None for p in pairs):
        ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float64)
    return PairBatch(batch, len(pairs), ref)
