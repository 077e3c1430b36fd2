"""Supervised fine-tuning on demonstrations, with the loss on response tokens only.

Each example is the chat-formatted prompt followed by the response and eos, tokenized apart and joined (as
generation produces them). Labels are the input ids with every prompt and padding position set to -100, so the
cross-entropy (the model shifts labels by one inside) counts response tokens only: the model learns to answer, not to
ask. `pretrain` reuses the same loop on plain texts with every token labelled, for the base model.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.core.data import Demonstration
from rlhf.core.tokenizer import encode_prompt_response, format_prompt
from rlhf.core.train_loop import SINGLE_PROCESS, DataParallel, LoopOptions, StepOutput, run_steps

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
    """Loss of every optimizer step run."""
    metrics: list[dict[str, float]] = field(default_factory=list)
    """Every step's metrics (``step``, ``loss``, ``learning_rate``, ``grad_norm``, ``tokens``, ...)."""

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
    options: LoopOptions | None = None,
) -> TrainResult:
    """The loop: ``config.num_steps`` AdamW steps on batches ``make_batch(indices)``; ``callback(step, loss)``.

    ``options`` (`rlhf.core.train_loop.LoopOptions`): data parallelism, ``max_steps``, checkpoints and resume, a
    per-step metrics hook. The loss of a step is the mean over the global minibatch's target tokens, whatever the
    number of processes.
    """
    options = options or LoopOptions()
    forward_model = options.parallel.wrap(model)
    device = options.parallel.device if options.parallel.distributed else next(model.parameters()).device

    def compute(forward: torch.nn.Module, indices: list[int]) -> StepOutput:
        batch = make_batch(indices)
        # 1. forward: the model shifts the labels and averages cross-entropy over labelled tokens.
        out = forward(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device),
        )
        targets = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # what the mean is over, after the shift
        return StepOutput(out.loss, float(targets), {"tokens": float(batch.attention_mask.sum())})

    result = TrainResult()

    def on_step(metrics: dict[str, float]) -> None:
        result.losses.append(metrics["loss"])
        result.metrics.append(metrics)
        if callback is not None:
            callback(int(metrics["step"]) - 1, metrics["loss"])
        if options.on_step is not None:
            options.on_step(metrics)

    # "tokens" is summed over ranks then divided by the weight like every sum: undo that to report a count.
    def per_step(metrics: dict[str, float]) -> None:
        metrics["tokens"] = metrics["tokens"] * metrics["weight"]
        metrics["target_tokens"] = metrics.pop("weight")
        on_step(metrics)

    run_steps(
        model, forward_model, config.num_steps, config.batch_size, num_examples, compute, config,
        dataclasses.replace(options, on_step=per_step), desc, progress,
        postfix=lambda m: {"loss": f"{m['loss']:.3f}"},
    )
    return result


@torch.no_grad()
def evaluate_causal_lm(
    model: PreTrainedModel,
    make_batch: Callable[[list[int]], CausalLMBatch],
    num_examples: int,
    batch_size: int = 32,
    parallel: DataParallel = SINGLE_PROCESS,
) -> dict[str, float]:
    """Held-out loss: the mean cross-entropy over every target token of the ``num_examples`` examples (each rank
    scores its share; the sums are reduced), and its perplexity."""
    device = parallel.device if parallel.distributed else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    mine = parallel.eval_shard(range(num_examples))
    for start in range(0, len(mine), batch_size):
        batch = make_batch(mine[start : start + batch_size])
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total += float(losses)
        count += float((labels != IGNORE_INDEX).sum())
    total, count = parallel.eval_sum([total, count])
    model.train(was_training)
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def sft_batcher(
    tokenizer: PreTrainedTokenizerBase, demonstrations: Sequence[Demonstration], max_length: int
) -> Callable[[list[int]], CausalLMBatch]:
    """``indices -> CausalLMBatch`` over ``demonstrations`` (prompts chat-formatted with ``tokenizer`` once)."""
    prompt_texts = [format_prompt(tokenizer, d.prompt) for d in demonstrations]
    responses = [d.response for d in demonstrations]

    def make_batch(indices: list[int]) -> CausalLMBatch:
        return build_sft_batch(tokenizer, [prompt_texts[i] for i in indices], [responses[i] for i in indices], max_length)

    return make_batch


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[Demonstration],
    config: SFTConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    options: LoopOptions | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``demonstrations`` (prompts are chat-formatted with ``tokenizer``)."""
    config = config or SFTConfig()
    make_batch = sft_batcher(tokenizer, demonstrations, config.max_length)
    return train_causal_lm(model, make_batch, len(demonstrations), config, "sft", callback, progress, options)


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: SFTConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    options: LoopOptions | None = None,
) -> TrainResult:
    """Language-model training of ``model`` in place on plain ``texts`` (every token labelled)."""
    config = config or SFTConfig()
    texts = list(texts)

    def make_batch(indices: list[int]) -> CausalLMBatch:
        return build_lm_batch(tokenizer, [texts[i] for i in indices], config.max_length)

    return train_causal_lm(model, make_batch, len(texts), config, "pretrain", callback, progress, options)
