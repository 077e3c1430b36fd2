"""Loading what a training command is given, with messages that name the file, the line and the field.

Every check here raises `UsageError` (printed without a traceback): a missing file, a bad JSONL line, a prompt longer
than the context, a tokenizer without pad or eos token, a model that is not a causal LM, a reward model with more
than one label. What is only worth knowing (which token pads) goes to `notes`, printed by rank 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.core.data import DataError, PromptRecord, load_numbered, load_prompts_numbered
from rlhf.core.models import MANIFEST_FILE
from rlhf.core.runtime import model_context
from rlhf.core.tokenizer import format_chat, format_prompt
from rlhf.train.options import UsageError

T = TypeVar("T")

Notes = Callable[[str], None]


def require_file(flag: str, path: str) -> str:
    if not path:
        raise UsageError(f"{flag} is required")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or directory")
    return path


def require_model_dir(flag: str, path: str) -> str:
    require_file(flag, path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{flag} {path}: not a Hugging Face checkpoint folder (no config.json in it)")
    return path


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_config(flag: str, path: str) -> dict[str, Any]:
    require_model_dir(flag, path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def parent_version(path: str) -> str:
    """The version named in a checkpoint's manifest.json (ours), else its folder path."""
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding="utf-8") as f:
            return str(json.load(f)["version"])
    except (OSError, KeyError, ValueError):
        return os.path.abspath(path)


# --------------------------------------------------------------------------------------------------------------------
# tokenizers and models


def load_tokenizer_checked(flag: str, path: str, notes: Notes) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; one without a pad token pads with its eos token (a note says which)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: cannot load a tokenizer from it ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(
                f"{flag} {path}: the tokenizer has neither a pad token nor an eos token; add one "
                "(tokenizer.add_special_tokens({'pad_token': '<pad>'}), resize the model's embeddings, save both)"
            )
        tokenizer.pad_token = tokenizer.eos_token
        notes(f"{flag} {path}: the tokenizer has no pad token; padding with its eos token "
              f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id}); padded positions are masked out")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{flag} {path}: the tokenizer has no eos token, so a response cannot end; add one")
    return tokenizer


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_causal_lm(flag: str, path: str) -> dict[str, Any]:
    """config.json of a causal LM checkpoint; UsageError for anything else (an encoder, a reward model, ...)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = read_config(flag, path)
    model_type = raw.get("model_type", "?")
    architectures = raw.get("architectures") or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(
            f"{flag} {path}: not a causal LM (config.json: model_type {model_type!r}, architectures "
            f"{architectures}); the policy must be a decoder that generates text (GPT-2, Llama, Qwen, Mistral, ...)"
        )
    if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        raise UsageError(
            f"{flag} {path}: not a causal LM (config.json: architectures {architectures}); it has no language-model "
            "head to generate with. A reward model goes to --reward-model; a policy is a *ForCausalLM checkpoint"
        )
    AutoConfig.from_pretrained(path)  # parses
    return raw


def resolve_dtype(name: str) -> torch.dtype | None:
    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm_checked(
    flag: str, path: str, dtype: str, device: torch.device, gradient_checkpointing: bool, notes: Notes
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    from rlhf.core.models import LOAD_LOCK

    check_causal_lm(flag, path)
    tokenizer = load_tokenizer_checked(flag, path, notes)
    kwargs: dict[str, Any] = {}
    if resolve_dtype(dtype) is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _disable_dropout(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(device), tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute); the KV cache goes off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: the stages compare the same function at different times (PPO's ratio, resume, N processes)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # Attention dropout that is a float on the module, not a Dropout (Llama, Qwen, Mistral read it there).
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def context_length(config: Any, flag_value: int, flag: str, path: str, notes: Notes) -> int:
    """The longest sequence to train on: ``--max-length`` when set, cut to the model's context (with a note), else
    the model's context (512 when its config does not say)."""
    own = model_context(config)
    if flag_value:
        if own and flag_value > own:
            notes(f"{flag} {flag_value} is more than the context of {path} ({own} positions); using {own}")
            return own
        return flag_value
    return own or 512


# --------------------------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Numbered:
    """A record and where it came from (for messages that name the line)."""

    path: str
    line: int
    record: Any


def load_records(flag: str, path: str, kind: str | None, accept: tuple[type, ...], what: str) -> list[Numbered]:
    """Records of a JSONL file (`rlhf.core.data`), each of one of the types ``accept``."""
    require_file(flag, path)
    try:
        numbered = load_numbered(path, kind)  # type: ignore[arg-type]
    except DataError as e:
        raise UsageError(str(e)) from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for line, record in numbered:
        if not isinstance(record, accept):
            raise UsageError(f"{path}:{line}: a {type(record).__name__} record where {what} are expected; "
                             "keep each kind in its own file")
        out.append(Numbered(path, line, record))
    if not out:
        raise UsageError(f"{flag} {path}: no records in it")
    return out


def load_prompt_records(flag: str, path: str) -> list[Numbered]:
    require_file(flag, path)
    try:
        numbered = load_prompts_numbered(path)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not numbered:
        raise UsageError(f"{flag} {path}: no prompts in it")
    return [Numbered(path, line, record) for line, record in numbered]


def split_eval(records: Sequence[T], share: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded random ``share`` of the records held out for evaluation."""
    if not 0.0 <= share < 1.0:
        raise UsageError(f"--eval-share must be in [0, 1), got {share}")
    n_eval = int(round(share * len(records)))
    if share > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= len(records):
        raise UsageError(f"--eval-share {share} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def format_any_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | PromptRecord) -> str:
    """The text the model continues for a plain prompt or a conversation (with the chat template when it has one)."""
    if isinstance(prompt, PromptRecord):
        if prompt.messages is None:
            return format_prompt(tokenizer, prompt.prompt or "")
        try:
            return format_chat(tokenizer, prompt.chat())
        except Exception as e:  # jinja's TemplateError: a template that refuses these roles
            raise UsageError(f"the chat template refused a conversation: {e}") from None
    return format_prompt(tokenizer, prompt)


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str | PromptRecord) -> int:
    return len(tokenizer(format_any_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def check_prompt_lengths(tokenizer: PreTrainedTokenizerBase, items: Sequence[Numbered], get_prompt: Callable[[Any], Any],
                         limit: int, limit_name: str, field: str = "prompt") -> None:
    """UsageError naming the first record whose formatted prompt does not fit ``limit`` tokens."""
    for item in items:
        prompt = get_prompt(item.record)
        n = prompt_tokens(tokenizer, prompt)
        if n >= limit:
            name = "messages" if isinstance(prompt, PromptRecord) and prompt.messages is not None else field
            raise UsageError(
                f"{item.path}:{item.line}: field '{name}': {n} tokens with the chat template, which leaves no room "
                f"for a response within {limit_name}; shorten it, drop it, or raise the limit"
            )


def load_reward_model_checked(
    flag: str, path: str, dtype: str, device: torch.device, gradient_checkpointing: bool, max_length: int,
    notes: Notes,
) -> Any:
    """A `RewardModel` from a checkpoint: a reward model (one label) to train further or to score with, or any
    causal LM / encoder, which gets a fresh scalar head. UsageError for a classifier with more than one label."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from rlhf.core.models import _ENCODER_TYPES, LOAD_LOCK, RewardModel

    raw = read_config(flag, path)
    architectures = raw.get("architectures") or []
    labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 0) or 0)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if is_classifier and labels > 1:
        raise UsageError(
            f"{flag} {path}: a classifier with {labels} labels (config.json: id2label has {labels} entries); a reward "
            "model has one output. Train one with `rlhf rm` from a causal LM or an encoder checkpoint"
        )
    model_type = raw.get("model_type", "?")
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UsageError(f"{flag} {path}: model_type {model_type!r} has no sequence-classification head in "
                         "transformers, so it cannot score responses")
    tokenizer = load_tokenizer_checked(flag, path, notes)
    kwargs: dict[str, Any] = {"num_labels": 1}
    if resolve_dtype(dtype) is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    with LOAD_LOCK:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if not is_classifier:
        notes(f"{flag} {path}: a {architectures[0] if architectures else model_type} checkpoint; its body gets a "
              "fresh scalar reward head")
    if model.config.pad_token_id is None:  # the stock head pools the last non-pad token: it needs a pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    _disable_dropout(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    limit = context_length(model.config, max_length, "--max-length", path, notes)
    return RewardModel(model.to(device), tokenizer, pair_input=model_type in _ENCODER_TYPES, max_length=limit)
