"""Reward-model training on preference pairs and K-wise rankings.

A ranking of K responses is used whole: all K responses go through the model in one batch and the loss is taken over
the ranking as one unit — either all its C(K, 2) pairs under Bradley–Terry, averaged per ranking (InstructGPT's loss,
`rlhf.core.losses.PairwiseRankingLoss`), or the Plackett–Luce likelihood of the whole order
(`rlhf.core.losses.PlackettLuceLoss`). A preference pair is a ranking of two; a pair that carries a ``margin`` is
trained with the Bradley–Terry loss with that margin (`rlhf.core.losses.PairwiseLoss`, Llama 2 eq. 2).

Accuracy is reported on held-out rankings (share of their implied pairs that the model orders as the annotators did);
against the gold order and beside the annotators' ceiling in the demo (`rlhf.sim.demo`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhf.core.losses import PairwiseLoss, PairwiseRankingLoss, PlackettLuceLoss
from rlhf.core.models import RewardModel
from rlhf.core.data import Ranking
from rlhf.core.tokenizer import format_chat, format_prompt
from rlhf.core.train_loop import SINGLE_PROCESS, DataParallel, LoopOptions, StepOutput, run_steps


@dataclass(frozen=True)
class RewardTrainingConfig:
    """Reward-model training."""

    loss: Literal["pairwise", "plackett_luce"] = "pairwise"
    """``"pairwise"``: Bradley–Terry over every pair of a ranking, averaged per ranking (InstructGPT);
    ``"plackett_luce"``: the likelihood of the whole order. Equal for K = 2."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate (the backbone starts from the supervised policy, so lower than from scratch)."""
    batch_size: int = 16
    """Rankings per optimizer step (each brings all its K responses)."""
    num_epochs: float = 2.0
    """Passes over the rankings; the number of steps is derived (`num_steps`)."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up; cosine decay after."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay on weight matrices."""
    max_grad_norm: float = 1.0
    """Gradient norm clip."""
    margin_scale: float = 1.0
    """Multiplies the ``margin`` of pairs that carry one; 0 trains them without margin."""
    seed: int = 0
    """Seeds the shuffling."""

    def num_steps(self, num_rankings: int) -> int:
        """Optimizer steps for ``num_rankings`` rankings: ``ceil(num_epochs * num_rankings / batch_size)``."""
        return max(1, -(-int(self.num_epochs * num_rankings) // self.batch_size))

    def warmup_steps(self, num_rankings: int) -> int:
        return int(self.warmup_ratio * self.num_steps(num_rankings))


@dataclass
class RewardTrainResult:
    losses: list[float] = field(default_factory=list)
    """Loss of every step."""
    accuracies: list[float] = field(default_factory=list)
    """Training-batch pair accuracy of every step."""
    metrics: list[dict[str, float]] = field(default_factory=list)
    """Every step's metrics (``step``, ``loss``, ``accuracy``, ``learning_rate``, ``grad_norm``, ...)."""


@dataclass(frozen=True)
class _RankingBatch:
    prompts: list[str]  # formatted prompt of every response, flattened: ranking by ranking, best first
    responses: list[str]
    offsets: list[int]  # start of each ranking in the flat lists
    sizes: list[int]  # K_n
    margins: list[float | None]


def _ranking_batch(tokenizer, rankings: Sequence[Ranking]) -> _RankingBatch:
    prompts: list[str] = []
    responses: list[str] = []
    offsets, sizes, margins = [], [], []
    for r in rankings:
        offsets.append(len(responses))
        sizes.append(len(r.responses))
        margins.append(r.margin if len(r.responses) == 2 else None)
        formatted = prompt_text(tokenizer, r)
        for response in r.ordered:
            prompts.append(formatted)
            responses.append(response)
    return _RankingBatch(prompts, responses, offsets, sizes, margins)


def prompt_text(tokenizer, ranking: Ranking) -> str:
    """What the reward model reads before each response: the chat template over the conversation, or the plain
    prompt formatted as the policy sees it (the reward service formats the same way)."""
    if ranking.messages:
        return format_chat(tokenizer, [{"role": r, "content": c} for r, c in ranking.messages])
    return format_prompt(tokenizer, ranking.prompt)


def _grid(flat: torch.Tensor, batch: _RankingBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat rewards -> (N, K_max) rewards best first and the (N, K_max) valid mask, for the rankings ``rows``."""
    k_max = max(batch.sizes[i] for i in rows)
    rewards = flat.new_zeros(len(rows), k_max)
    valid = torch.zeros(len(rows), k_max, dtype=torch.bool, device=flat.device)
    for n, i in enumerate(rows):
        k = batch.sizes[i]
        rewards[n, :k] = flat[batch.offsets[i] : batch.offsets[i] + k]
        valid[n, :k] = True
    return rewards, valid


class RewardTrainer:
    """Trains a `RewardModel` on rankings (pairs are rankings of two)."""

    def __init__(self, reward_model: RewardModel, config: RewardTrainingConfig | None = None) -> None:
        self.reward_model = reward_model
        self.config = config or RewardTrainingConfig()
        self.ranking_loss = PlackettLuceLoss() if self.config.loss == "plackett_luce" else PairwiseRankingLoss()
        self.pair_loss = PairwiseLoss()

    def loss(
        self, rankings: Sequence[Ranking], forward: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, float]:
        """The loss of a batch of rankings (one forward pass over all their responses) and its pair accuracy.
        ``forward``: the module to run the reward model through (its DDP wrapper); default the model itself."""
        # 1. score every response of every ranking in one batch.
        batch = _ranking_batch(self.reward_model.tokenizer, rankings)
        forward = forward or self.reward_model
        flat = forward(**self.reward_model.encode(batch.prompts, batch.responses))  # (sum K_n,)
        # 2. pairs with a margin: Bradley–Terry with margin; the rest: the ranking loss, each ranking one unit.
        with_margin = [i for i, m in enumerate(batch.margins) if m is not None and self.config.margin_scale > 0]
        plain = [i for i in range(len(rankings)) if i not in set(with_margin)]
        parts: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        if plain:
            rewards, valid = _grid(flat, batch, plain)
            out = self.ranking_loss(rewards, valid)
            parts.append((out.loss, out.accuracy, len(plain)))
        if with_margin:
            rewards, _ = _grid(flat, batch, with_margin)
            margin = torch.tensor([batch.margins[i] for i in with_margin], dtype=rewards.dtype, device=rewards.device)
            out = self.pair_loss(rewards[:, 0], rewards[:, 1], margin * self.config.margin_scale)
            parts.append((out.loss, out.accuracy, len(with_margin)))
        # 3. every ranking weighs the same.
        total = sum(n for _, _, n in parts)
        loss = sum(part_loss * n for part_loss, _, n in parts) / total
        accuracy = sum(float(acc) * n for _, acc, n in parts) / total
        return loss, accuracy

    def train(
        self,
        rankings: Sequence[Ranking],
        callback: Callable[[int, float, float], None] | None = None,
        progress: bool = True,
        options: LoopOptions | None = None,
    ) -> RewardTrainResult:
        """Train in place; ``callback(step, loss, batch_accuracy)`` after every step. ``options``
        (`rlhf.core.train_loop.LoopOptions`): data parallelism, ``max_steps``, checkpoints and resume, a metrics hook.
        Every ranking weighs the same in a step's loss, whatever the number of processes."""
        c = self.config
        options = options or LoopOptions()
        result = RewardTrainResult()

        def compute(forward: torch.nn.Module, indices: list[int]) -> StepOutput:
            loss, accuracy = self.loss([rankings[i] for i in indices], forward)
            return StepOutput(loss, float(len(indices)), {"accuracy": accuracy * len(indices)})

        def on_step(metrics: dict[str, float]) -> None:
            metrics["rankings"] = metrics.pop("weight")
            result.losses.append(metrics["loss"])
            result.accuracies.append(metrics["accuracy"])
            result.metrics.append(metrics)
            if callback is not None:
                callback(int(metrics["step"]) - 1, metrics["loss"], metrics["accuracy"])
            if options.on_step is not None:
                options.on_step(metrics)

        run_steps(
            self.reward_model, options.parallel.wrap(self.reward_model), c.num_steps(len(rankings)), c.batch_size,
            len(rankings), compute, c, dataclasses.replace(options, on_step=on_step), "reward model", progress,
            postfix=lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['accuracy']:.2f}"},
        )
        return result

    @torch.no_grad()
    def evaluate(
        self, rankings: Sequence[Ranking], batch_size: int = 32, parallel: DataParallel = SINGLE_PROCESS
    ) -> dict[str, float]:
        """Held-out loss (mean over rankings) and pair accuracy (over all their implied pairs); each rank scores its
        share and the sums are reduced."""
        model = self.reward_model
        was_training = model.training
        model.eval()
        loss_sum = n = 0.0
        correct = pairs = 0.0
        mine = parallel.eval_shard(rankings)
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            loss, _ = self.loss(chunk)
            loss_sum += float(loss) * len(chunk)
            n += len(chunk)
            batch = _ranking_batch(model.tokenizer, chunk)
            flat = model(**model.encode(batch.prompts, batch.responses)).float()
            for offset, k in zip(batch.offsets, batch.sizes):
                r = flat[offset : offset + k]
                for i in range(k):
                    for j in range(i + 1, k):
                        correct += float(r[i] > r[j])
                        pairs += 1
        loss_sum, n, correct, pairs = parallel.eval_sum([loss_sum, n, correct, pairs])
        model.train(was_training)
        return {"eval_loss": loss_sum / n if n else float("nan"),
                "eval_accuracy": correct / pairs if pairs else float("nan"), "eval_rankings": n}


def pair_accuracy(
    reward_model: RewardModel,
    prompts: Sequence[str],
    better: Sequence[str],
    worse: Sequence[str],
    batch_size: int = 64,
) -> float:
    """Share of pairs with reward(better) > reward(worse); ``prompts`` are user messages (formatted here)."""
    if not prompts:
        raise ValueError("no pairs to evaluate")
    formatted = [format_prompt(reward_model.tokenizer, p) for p in prompts]
    r_better = reward_model.score(formatted, list(better), batch_size)
    r_worse = reward_model.score(formatted, list(worse), batch_size)
    return float((r_better > r_worse).float().mean())


def ranking_accuracy(reward_model: RewardModel, rankings: Sequence[Ranking], batch_size: int = 64) -> float:
    """Share of the pairs implied by ``rankings`` that the reward model orders as the rankings do (held-out
    accuracy against the annotators' labels)."""
    prompts, better, worse = [], [], []
    for r in rankings:
        for a, b in r.pairs():
            prompts.append(r.prompt)
            better.append(a)
            worse.append(b)
    return pair_accuracy(reward_model, prompts, better, worse, batch_size)
