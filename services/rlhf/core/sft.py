"""Supervised fine-tuning on demonstrations, with the loss on response tokens only.

Each example is the chat-formatted prompt followed by the response and eos, tokenized apart and joined (as
generation produces them). Labels are the input ids with every prompt and padding position set to -100, so the
cross-entropy (the model shifts labels by one inside) counts response tokens only: the model learns to answer, not to
ask. `pretrain` reuses the same loop on plain texts with every token labelled, for the base model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.core.data import Demonstration
from rlhf.core.tokenizer import encode_prompt_response, format_prompt
from rlhf.core.train_loop import make_optimizer, minibatch_indices, optimizer_step, seed_everything, warmup_cosine

IGNORE_INDEX = -100  # what torch's cross-entropy (and every HF causal LM's loss) skips


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (also used for the base model's pretraining)."""

    learning_rate: float = 1e-3
    """Peak AdamW learning rate. Small models from scratch take ~1e-3; a pretrained checkpoint wants ~1e-5."""
    batch_size: int = 32
    """Examples per optimizer step."""
    num_steps: int = 300
    """Optimizer steps (the budget); the data are cycled in shuffled epochs."""
    warmup_steps: int = 20
    """Linear warmup steps, then cosine decay to ``min_lr_ratio`` of the peak."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay on weight matrices."""
    max_grad_norm: float = 1.0
    """Gradient norm clip."""
    max_length: int = 256
    """Longest example in tokens; longer ones are cut at the end (a prompt alone longer than this is an error)."""
    seed: int = 0
    """Seeds the shuffling (and torch, for any randomness in the model)."""


@dataclass(frozen=True)
class CausalLMBatch:
    input_ids: torch.Tensor  # (B, T) right-padded with the pad id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor  # (B, T) input ids, IGNORE_INDEX on prompt and padding positions

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step."""

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    def final_loss(self, window: int = 20) -> float:
        """Mean of the last ``window`` steps' losses."""
        tail = self.losses[-window:]
        return sum(tail) / len(tail)


def _pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> CausalLMBatch:
    """(ids, labels) rows -> a right-padded batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return CausalLMBatch(input_ids, attention_mask, labels)


def build_sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 256,
) -> CausalLMBatch:
    """A batch of already formatted prompts and their responses; only response tokens (and eos) are labelled."""
    rows = []
    for prompt_text, response in zip(prompt_texts, responses, strict=True):
        prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt_text, response)
        if len(prompt_ids) >= max_length:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room for its response (max_length={max_length})")
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        rows.append((ids, labels))
    return _pad(rows, tokenizer.pad_token_id)


def build_lm_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 256) -> CausalLMBatch:
    """A batch of plain texts (bos + text + eos), every token labelled: language-model pretraining."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        rows.append((ids, list(ids)))
    return _pad(rows, tokenizer.pad_token_id)


def train_causal_lm(
    model: PreTrainedModel,
    make_batch: Callable[[list[int]], CausalLMBatch],
    num_examples: int,
    config: SFTConfig,
    desc: str = "sft",
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """The loop: ``config.num_steps`` AdamW steps on batches ``make_batch(indices)``; ``callback(step, loss)``."""
    seed_everything(config.seed)
    model.train()
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, config.num_steps, config.min_lr_ratio)
    device = next(model.parameters()).device
    result = TrainResult()
    bar = tqdm(total=config.num_steps, desc=desc, disable=not progress, leave=False)
    for step, indices in enumerate(minibatch_indices(num_examples, config.batch_size, config.num_steps, config.seed)):
        batch = make_batch(indices)
        # 1. forward: the model shifts the labels and averages cross-entropy over labelled tokens.
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device),
        )
        # 2. update.
        optimizer_step(model, optimizer, scheduler, out.loss, config.max_grad_norm)
        loss = float(out.loss.detach())
        result.losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if callback is not None:
            callback(step, loss)
    bar.close()
    model.eval()
    return result


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[Demonstration],
    config: SFTConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``demonstrations`` (prompts are chat-formatted with ``tokenizer``)."""
    config = config or SFTConfig()
    prompt_texts = [format_prompt(tokenizer, d.prompt) for d in demonstrations]
    responses = [d.response for d in demonstrations]

    def make_batch(indices: list[int]) -> CausalLMBatch:
        return build_sft_batch(
            tokenizer, [prompt_texts[i] for i in indices], [responses[i] for i in indices], config.max_length
        )

    return train_causal_lm(model, make_batch, len(demonstrations), config, "sft", callback, progress)


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: SFTConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Language-model training of ``model`` in place on plain ``texts`` (every token labelled)."""
    config = config or SFTConfig()
    texts = list(texts)

    def make_batch(indices: list[int]) -> CausalLMBatch:
        return build_lm_batch(tokenizer, [texts[i] for i in indices], config.max_length)

    return train_causal_lm(model, make_batch, len(texts), config, "pretrain", callback, progress)
