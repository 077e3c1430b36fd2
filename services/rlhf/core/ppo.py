"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), in numbered steps:

    1. generate responses to a batch of prompts (KV-cached sampling, ``rlhf.core.generation``)
    2. log-probs of the policy and the reference, values of the critic (one forward each)
    3. scores of the responses (``reward_fn`` on text), shaped: missing-EOS penalty, normalisation, clipping
    4. rewards: -beta * KL per token, plus the score at the last response token
    5. advantages: GAE, whitened
    6. update: several epochs of shuffled mini-batches; clipped policy and value losses; early stop at a target KL
    7. metrics, and beta's update by the KL controller

``generate_rollout`` does 1 and 3, ``experience_from_rollout`` 2 (and the shaping of 3), ``make_experience`` 1-3,
``compute_rewards`` 4, ``compute_advantages`` 5, ``update`` 6, ``learn`` 4-7 and ``step`` all of them.

Asynchronous PPO (rollout workers apart from the learner, ``rlhf.trainer``) runs ``generate_rollout`` in the workers
and ``experience_from_rollout`` + ``learn`` in the learner.  A rollout sampled from an older policy carries its
``behaviour_logprobs``; the learner weighs each token's loss by the truncated importance weight
min(pi_old / pi_behaviour, ``importance_clip``).  A rollout of the learner's own current weights needs no correction
and is exactly the synchronous step.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from rlhf.core.advantages import compute_gae
from rlhf.core.generation import SamplingParams, decode_responses, generate, left_pad
from rlhf.core.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    kl_estimate,
)
from rlhf.core.losses import (
    REDUCTIONS,
    PolicyLoss,
    ValueLoss,
    entropy_from_logits,
    truncated_importance_weights,
)
from rlhf.core.masking import last_token_index, masked_mean, masked_var, masked_whiten
from rlhf.core.train_loop import SINGLE_PROCESS, DataParallel

__all__ = [
    "CriticModel",
    "Experience",
    "PPOConfig",
    "PPOTrainer",
    "PolicyAndCritic",
    "PolicyWithValueHead",
    "PromptEncoder",
    "RewardFn",
    "Rollout",
    "RunningMoments",
    "UpdateStats",
    "ValueHead",
    "evaluate_policy",
    "logprobs_from_logits",
]

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
"""reward_fn(prompts, responses) -> (B,) scores.  Text in, so a reward model may use its own tokenizer."""

PromptEncoder = Callable[[str], list[int]]
"""prompt text -> the token ids the policy continues (e.g. after a chat template)."""

CHECKPOINT_FILE = "ppo_state.pt"


@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of one PPO run.  Defaults suit the small models of the built-in task on a CPU."""

    # --- rollout -------------------------------------------------------------------------------------------------
    batch_size: int = 32
    """Prompts (and so responses) per PPO step."""
    num_mini_batches: int = 4
    """Each PPO epoch splits the batch into this many shuffled mini-batches, one optimizer step each."""
    ppo_epochs: int = 4
    """Passes over the batch per PPO step (K in the PPO paper)."""
    response_length: int = 32
    """Most new tokens per response; a response that reaches it without EOS did not end (see missing_eos_penalty)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; log-probs are taken under the same scaled distribution, so that the
    ratio is that of the sampling policy (TRL does the same)."""
    rollout_forward_batch_size: int | None = None
    """Rows per no-grad forward pass while scoring a rollout (policy, reference); None = the whole batch at once."""

    # --- advantages ----------------------------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount factor.  1 is usual for text: the only sparse reward comes at the end."""
    lam: float = 0.95
    """GAE lambda: bias (0) / variance (1) trade-off of the advantage estimate."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the batch's response tokens."""

    # --- losses --------------------------------------------------------------------------------------------------
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float | None = 0.2
    """Value clip epsilon around the rollout's values; None = unclipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 = none, as in InstructGPT."""
    loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean"
    """token_mean: every response token weighs the same; sequence_mean: every response does."""

    # --- KL penalty ----------------------------------------------------------------------------------------------
    kl_coef: float = 0.05
    """beta: weight of the per-token KL(policy || reference) penalty in the reward (initial value if adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator of the penalty: k1 = log(pi/pi_ref), k3 = (r - 1) - log r (>= 0, lower variance).
    See http://joschu.net/blog/kl-approx.html."""
    adaptive_kl: bool = False
    """Steer beta towards kl_target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target KL per response (nats, summed over tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller: how fast beta moves."""
    target_kl: float | None = None
    """Stop this step's remaining PPO epochs once an epoch's mean approx KL(old || new) per token exceeds it."""
    importance_clip: float = 2.0
    """Cap of the truncated importance weight min(pi_old / pi_behaviour, cap) on the loss of a rollout sampled from
    an older policy (asynchronous workers); rollouts of the current weights are unweighted."""

    # --- scores --------------------------------------------------------------------------------------------------
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit response_length without EOS (TRL's missing_eos_penalty);
    None = no penalty."""
    normalize_reward: bool = False
    """Standardise scores with a running mean and std over all the scores seen so far."""
    reward_clip: float | None = None
    """Clip (normalised) scores to [-reward_clip, reward_clip]; None = no clipping."""

    # --- optimisation --------------------------------------------------------------------------------------------
    learning_rate: float = 1e-5
    """Adam learning rate of the policy."""
    value_learning_rate: float | None = None
    """Adam learning rate of the value head or critic; None = learning_rate."""
    lr_warmup_steps: int = 0
    """Linear warm-up of both learning rates over this many optimizer steps, then constant."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seeds the prompt order, the mini-batch shuffles and the per-row sampling seeds of the rollouts."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "num_mini_batches", "ppo_epochs", "response_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_mini_batches:
            suggestion = self.num_mini_batches * max(1, self.batch_size // self.num_mini_batches)
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_mini_batches ({self.num_mini_batches}); "
                f"change one, e.g. batch_size={suggestion}"
            )
        if self.batch_size < 2 and self.whiten_advantages:
            raise ValueError(
                "whitening advantages needs batch_size >= 2; raise batch_size or set whiten_advantages=False"
            )
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 for PPO rollouts (sampling), got {self.temperature}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {sorted(REDUCTIONS)}, got {self.loss_reduction!r}")
        if not self.importance_clip >= 1.0:
            raise ValueError(f"PPOConfig.importance_clip must be >= 1, got {self.importance_clip}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")

    @property
    def mini_batch_size(self) -> int:
        """Rows per optimizer step."""
        return self.batch_size // self.num_mini_batches

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per PPO step when no early stop happens."""
        return self.ppo_epochs * self.num_mini_batches


# ---------------------------------------------------------------------------------------------------------------------
# the rollout records


@dataclass(frozen=True)
class Rollout:
    """Generated and scored responses, before any learner-side computation (what a rollout worker ships).  B rows,
    L = P + T tokens: P prompt (left-padded), T response (right-padded)."""

    prompts: list[str]  # (B,) as given to reward_fn
    responses: list[str]  # (B,) decoded responses
    sequences: torch.Tensor  # (B, L) prompt ids then response ids
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, T) bool; response tokens, EOS included
    raw_scores: torch.Tensor  # (B,) reward_fn's scores
    ended: torch.Tensor  # (B,) bool; ended with EOS / a stop token
    behaviour_logprobs: torch.Tensor | None = None  # (B, T) log mu(a_t|s_t) of the sampling policy, 0 where masked

    def __post_init__(self) -> None:
        b = self.sequences.shape[0]
        shapes_ok = (
            len(self.prompts) == b == len(self.responses) == self.attention_mask.shape[0] == self.action_mask.shape[0]
            == self.raw_scores.shape[0] == self.ended.shape[0]
            and self.attention_mask.shape == self.sequences.shape
            and self.action_mask.shape[1] <= self.sequences.shape[1]
            and (self.behaviour_logprobs is None or self.behaviour_logprobs.shape == self.action_mask.shape)
        )
        if not shapes_ok:
            raise ValueError(
                f"inconsistent rollout: {b} sequences {tuple(self.sequences.shape)}, attention_mask "
                f"{tuple(self.attention_mask.shape)}, action_mask {tuple(self.action_mask.shape)}, "
                f"{len(self.prompts)} prompts, {len(self.responses)} responses, {self.raw_scores.shape[0]} scores"
            )


@dataclass(frozen=True)
class Experience:
    """One batch of rollouts.  B rows, L = P + T tokens: P prompt (left-padded), T response (right-padded)."""

    sequences: torch.Tensor  # (B, L) prompt ids then response ids
    attention_mask: torch.Tensor  # (B, L) 1 for prompt and response tokens, 0 for padding on either side
    action_mask: torch.Tensor  # (B, T) bool; response tokens, EOS included
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t|s_t) of the sampled tokens
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t|s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    raw_scores: torch.Tensor  # (B,) reward_fn's scores
    scores: torch.Tensor  # (B,) scores after the missing-EOS penalty, normalisation and clipping
    ended: torch.Tensor  # (B,) bool; the response ended with EOS / a stop token (not at response_length)
    entropy: torch.Tensor  # (B, T) entropy of the policy at each response position
    rewards: torch.Tensor | None = None  # (B, T) -beta * KL_t, plus the score at the last token
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate used in the reward
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets
    importance_weights: torch.Tensor | None = None  # (B, T) truncated min(pi_old / mu, cap); None = on-policy

    @property
    def response_length(self) -> int:
        return self.action_mask.shape[1]

    def select(self, index: torch.Tensor) -> Experience:
        """The rows ``index`` (a mini-batch)."""
        return Experience(
            **{
                f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                for f in dataclasses.fields(self)
            }
        )


# ---------------------------------------------------------------------------------------------------------------------
# policy + value


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log softmax(logits)[token]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class ValueHead(nn.Module):
    """hidden (..., H) -> value (...).  Zero-initialised: V = 0 at the start, so early advantages are plain returns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


def _last_hidden_state(causal_lm: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L, H) the final (normed) hidden states, from the trunk alone where the model exposes one."""
    trunk = causal_lm.base_model
    kwargs = {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": _positions(attention_mask)}
    if trunk is not causal_lm:
        return trunk(**kwargs).last_hidden_state
    return causal_lm(**kwargs, output_hidden_states=True, use_cache=False).hidden_states[-1]


def _hidden_size(causal_lm: nn.Module) -> int:
    return int(causal_lm.get_output_embeddings().weight.shape[1])


class PolicyWithValueHead(nn.Module):
    """The policy with a value head on its last hidden state (the default, ``value_model=None``).

    Why: one forward pass of the trunk gives both the logits and the values, at rollout and at every update, which
    halves the compute against a separate critic of the same size (what matters on a CPU, and in memory on a GPU).
    The price is that the value loss also shapes the policy's trunk; ``vf_coef`` bounds that.  Give the trainer a
    separate critic (``CriticModel``, e.g. started from the reward model as in InstructGPT) to decouple them.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        head = ValueHead(_hidden_size(policy))
        param = next(policy.parameters())
        self.value_head = head.to(device=param.device, dtype=param.dtype)

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters())

    def forward(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> logits (B, T, V) for the last T tokens, values (B, T) of the states before them."""
        hidden = _last_hidden_state(self.policy, sequences, attention_mask)  # (B, L, H)
        states = hidden[:, -num_actions - 1 : -1]  # (B, T, H) the state before each response token
        return self.policy.get_output_embeddings()(states), self.value_head(states)


class CriticModel(nn.Module):
    """A separate critic: a transformer trunk (a Hugging Face base model) with a value head."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        param = next(backbone.parameters())
        self.value_head = ValueHead(hidden_size).to(device=param.device, dtype=param.dtype)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> CriticModel:
        """A critic from a copy of a causal LM's trunk (its LM head dropped)."""
        return cls(copy.deepcopy(model.base_model), _hidden_size(model))

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L) values."""
        hidden = self.backbone(
            input_ids=sequences, attention_mask=attention_mask, position_ids=_positions(attention_mask)
        ).last_hidden_state
        return self.value_head(hidden)


class PolicyAndCritic(nn.Module):
    """The policy and a separate critic, behind the same interface as ``PolicyWithValueHead``."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def forward(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _causal_lm_logits(self.policy, sequences, attention_mask, num_actions)
        values = self.critic(sequences, attention_mask)[:, -num_actions - 1 : -1]
        return logits, values


def _causal_lm_logits(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
) -> torch.Tensor:
    """(B, L) -> (B, T, V) logits predicting the last T tokens."""
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        logits_to_keep=num_actions + 1,
        use_cache=False,
    )
    return out.logits[:, -num_actions - 1 : -1]


# ---------------------------------------------------------------------------------------------------------------------
# reward normalisation


class RunningMoments:
    """Running mean and variance of everything passed to ``update`` (Chan et al.'s parallel combination)."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


# ---------------------------------------------------------------------------------------------------------------------
# the trainer


def _build_optimizer(model: PolicyWithValueHead | PolicyAndCritic, config: PPOConfig) -> torch.optim.Adam:
    """Adam with two parameter groups: the policy, and the value head or critic (its own learning rate)."""
    value_ids = {id(p) for p in model.value_parameters()}
    policy_params = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
    value_params = [p for p in model.value_parameters() if p.requires_grad]
    value_lr = config.value_learning_rate if config.value_learning_rate is not None else config.learning_rate
    return _adam(
        [{"params": policy_params, "lr": config.learning_rate}, {"params": value_params, "lr": value_lr}],
        eps=config.adam_eps,
    )


def _adam(param_groups: list[dict[str, Any]], eps: float) -> torch.optim.Adam:
    """Adam with the fused kernel where the parameters allow it (CPU and CUDA, floating point): on small models the
    per-parameter Python loop of the default implementation costs more than the arithmetic."""
    params = [p for group in param_groups for p in group["params"]]
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if fusable:
        try:
            return torch.optim.Adam(param_groups, eps=eps, fused=True)
        except (RuntimeError, ValueError):  # an older torch without the fused CPU kernel
            pass
    return torch.optim.Adam(param_groups, eps=eps)


@dataclass(frozen=True)
class UpdateStats:
    """Means over the mini-batch updates of one PPO step."""

    policy_loss: float
    value_loss: float
    approx_kl: float
    clipfrac: float
    value_clipfrac: float
    grad_norm: float
    epochs_run: int


class PPOTrainer:
    """PPO on a causal LM against a text-based reward function.

    ``policy`` is trained in place (``prompts`` may be empty and ``reward_fn`` None for a learner that only gets
    rollouts from elsewhere: ``experience_from_rollout`` + ``learn``); ``ref_policy`` (None: a frozen copy of the policy as it is now) anchors the KL
    penalty; ``value_model`` None puts a value head on the policy (see ``PolicyWithValueHead`` for why), or give a
    separate critic, any module ``(sequences (B, L), attention_mask (B, L)) -> values (B, L)`` such as ``CriticModel``.
    Prompts are visited in a shuffled order, reshuffled each pass.  ``encode_prompt`` turns a prompt into the ids the
    policy continues (default: ``tokenizer(prompt)["input_ids"]``; pass one that applies the chat template the policy
    was fine-tuned with); ``reward_fn`` always gets the prompts as given.  Dropout is switched off in all models: PPO's
    ratio compares the same function at rollout and at update.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: nn.Module,
        ref_policy: nn.Module | None,
        tokenizer: Any,
        reward_fn: RewardFn | None,
        prompts: Sequence[str],
        value_model: nn.Module | None = None,
        *,
        encode_prompt: PromptEncoder | None = None,
        parallel: DataParallel = SINGLE_PROCESS,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.prompts = list(prompts)
        self.encode_prompt: PromptEncoder = encode_prompt or (lambda text: tokenizer(text)["input_ids"])
        self.policy = policy.eval()
        self.ref_policy = (ref_policy if ref_policy is not None else copy.deepcopy(policy)).eval()
        self.ref_policy.requires_grad_(False)
        self.model: PolicyWithValueHead | PolicyAndCritic = (
            PolicyWithValueHead(self.policy)
            if value_model is None
            else PolicyAndCritic(self.policy, value_model.eval())
        )
        self.device = next(self.policy.parameters()).device
        self.parallel = parallel
        if parallel.distributed and config.batch_size % parallel.world_size:
            raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the number of processes "
                             f"({parallel.world_size})")

        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.sampling = SamplingParams(max_new_tokens=config.response_length, temperature=config.temperature)

        reduction = REDUCTIONS[config.loss_reduction]
        self.policy_loss = PolicyLoss(config.cliprange, reduction)
        self.value_loss = ValueLoss(config.cliprange_value, reduction)
        self._reduce = reduction

        # The module the update runs forward through: DDP around the policy and value under torchrun.
        self.forward_model = parallel.wrap(self.model)
        self.optimizer = _build_optimizer(self.model, config)
        warmup = config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.kl_controller: KLController = (
            AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        self.reward_moments = RunningMoments()
        # Two streams: the sampling seeds of the rollouts, and the mini-batch shuffles of the update.  Apart, so that
        # a rollout worker (which draws seeds only) and a learner (which shuffles only) reproduce this trainer.
        self.seed_generator = seed_generator(config.seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(config.seed)
        self.global_step = 0
        self._epoch = 0  # passes over the prompts so far
        self._cursor = 0  # position in this pass's order
        self._order: list[int] | None = None

    # --- data ----------------------------------------------------------------------------------------------------

    def _pass_order(self) -> list[int]:
        if self._order is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(self.config.seed * 1_000_003 + self._epoch)
            self._order = torch.randperm(len(self.prompts), generator=gen).tolist()
        return self._order

    def next_prompts(self) -> list[str]:
        """The next batch_size prompts in this pass's shuffled order, wrapping into the next pass."""
        if not self.prompts:
            raise ValueError("PPOTrainer was given no prompts: only learn() and experience_from_rollout() work")
        batch: list[str] = []
        while len(batch) < self.config.batch_size:
            order = self._pass_order()
            take = order[self._cursor : self._cursor + self.config.batch_size - len(batch)]
            batch.extend(self.prompts[i] for i in take)
            self._cursor += len(take)
            if self._cursor >= len(order):
                self._epoch, self._cursor, self._order = self._epoch + 1, 0, None
        return batch

    # --- 1-3. rollout ---------------------------------------------------------------------------------------------

    def draw_seeds(self, n: int) -> list[int]:
        """The next ``n`` per-row sampling seeds of this run."""
        return draw_seeds(self.seed_generator, n)

    @torch.no_grad()
    def make_experience(self, prompts: list[str], seeds: list[int] | None = None) -> Experience:
        """Generate responses to ``prompts`` and score them: the rollout part of a PPO step. ``seeds``: one sampling
        seed per prompt (default: drawn from the trainer's seed stream)."""
        return self.experience_from_rollout(self.generate_rollout(prompts, seeds))

    @torch.no_grad()
    def generate_rollout(self, prompts: list[str], seeds: list[int] | None = None,
                         reward_fn: RewardFn | None = None, behaviour_logprobs: bool = False) -> Rollout:
        """Steps 1 and 3: sample a response to each prompt and score it (``reward_fn``: the trainer's by default).
        ``behaviour_logprobs``: also keep the sampling log-probs (what an asynchronous worker ships)."""
        reward_fn = reward_fn or self.reward_fn
        if reward_fn is None:
            raise ValueError("PPOTrainer was given no reward_fn: pass one to generate_rollout")
        return generate_rollout(
            self.policy, self.tokenizer, prompts, seeds if seeds is not None else self.draw_seeds(len(prompts)),
            self.encode_prompt, reward_fn, self.sampling, behaviour_logprobs=behaviour_logprobs,
        )

    @torch.no_grad()
    def experience_from_rollout(self, rollout: Rollout, off_policy: bool = False) -> Experience:
        """Step 2 on a rollout: log-probs and values under the current weights, reference log-probs, shaped scores.
        ``off_policy``: the rollout was sampled by other weights (its ``behaviour_logprobs``): weigh its tokens by the
        truncated importance weights."""
        sequences = rollout.sequences.to(self.device)
        attention_mask = rollout.attention_mask.to(self.device)
        action_mask = rollout.action_mask.to(self.device)
        num_actions = action_mask.shape[1]
        # 2. log-probs, values, reference log-probs
        logprobs, values, entropy, ref_logprobs = self._evaluate_rollout(sequences, attention_mask, num_actions)
        zeros = torch.zeros((), device=self.device)
        logprobs = torch.where(action_mask, logprobs, zeros)
        weights = None
        if off_policy:
            if rollout.behaviour_logprobs is None:
                raise ValueError("an off-policy rollout needs its behaviour_logprobs")
            weights = truncated_importance_weights(
                logprobs, rollout.behaviour_logprobs.to(self.device), action_mask, self.config.importance_clip
            ).weights
        raw_scores = rollout.raw_scores.to(self.device, torch.float32)
        ended = rollout.ended.to(self.device)
        return Experience(
            sequences=sequences,
            attention_mask=attention_mask,
            action_mask=action_mask,
            logprobs=logprobs,
            ref_logprobs=torch.where(action_mask, ref_logprobs, zeros),
            values=torch.where(action_mask, values, zeros),
            raw_scores=raw_scores,
            scores=self.shape_scores(raw_scores, ended),
            ended=ended,
            entropy=entropy,
            importance_weights=weights,
        )

    @torch.no_grad()
    def _evaluate_rollout(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_actions: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L) sequences -> (B, T) each: policy log-probs, values, policy entropy, reference log-probs.

        Log-probs come from a full forward pass (not from sampling), the same computation as in ``update``, so the
        PPO ratio is exactly 1 before the first optimizer step.
        """
        temperature = self.config.temperature
        actions = sequences[:, -num_actions:]
        parts: list[tuple[torch.Tensor, ...]] = []
        chunk = self.config.rollout_forward_batch_size or sequences.shape[0]
        for rows in torch.arange(sequences.shape[0], device=self.device).split(chunk):
            logits, values = self.model(sequences[rows], attention_mask[rows], num_actions)
            logits = logits.float() / temperature
            ref_logits = _causal_lm_logits(self.ref_policy, sequences[rows], attention_mask[rows], num_actions)
            parts.append((
                logprobs_from_logits(logits, actions[rows]),
                values.float(),
                entropy_from_logits(logits),
                logprobs_from_logits(ref_logits.float() / temperature, actions[rows]),
            ))
        logprobs, values, entropy, ref_logprobs = (torch.cat(column) for column in zip(*parts))
        return logprobs, values, entropy, ref_logprobs

    def shape_scores(self, raw_scores: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """(B,) scores -> (B,): missing-EOS penalty, then running normalisation, then clipping (each if configured)."""
        cfg = self.config
        scores = raw_scores
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
        if cfg.normalize_reward:
            self.reward_moments.update(self._gather_rows(scores))
            scores = self.reward_moments.normalize(scores)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return scores

    # --- 4. rewards -----------------------------------------------------------------------------------------------

    def compute_rewards(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """rewards (B, T): -beta * KL_t on response tokens plus the score at each row's last token; and KL_t (B, T)."""
        mask = exp.action_mask
        kl = torch.where(mask, kl_estimate(exp.logprobs, exp.ref_logprobs, self.config.kl_estimator), 0.0)
        rewards = -self.kl_controller.value * kl
        last = last_token_index(mask)  # (B,)
        rewards = rewards.scatter_add(1, last[:, None], exp.scores[:, None].to(rewards.dtype))
        return rewards, kl

    # --- 5. advantages --------------------------------------------------------------------------------------------

    def compute_advantages(self, exp: Experience, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages (whitened if configured) and returns, both (B, T)."""
        gae = compute_gae(exp.values, rewards, exp.action_mask, self.config.gamma, self.config.lam)
        advantages = gae.advantages
        if self.config.whiten_advantages:
            if self.parallel.distributed:
                advantages = self._global_whiten(advantages, exp.action_mask)
            else:
                advantages = masked_whiten(advantages, exp.action_mask)
        return advantages, gae.returns

    # --- data parallelism: rank r holds rows r, r + N, r + 2N, ... of every global batch ------------------------------

    def _local_rows(self, n: int) -> list[int]:
        return list(range(self.parallel.rank, n, self.parallel.world_size))

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(B_local,) -> (B,) the values of every rank's rows in global row order (what one process would hold)."""
        par = self.parallel
        if not par.distributed:
            return values
        full = torch.zeros(self.config.batch_size, dtype=torch.float64)
        full[self._local_rows(self.config.batch_size)] = values.detach().double().cpu()
        return torch.tensor(par.all_reduce_sum(full.tolist()), dtype=values.dtype, device=values.device)

    def _global_whiten(self, values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """`masked_whiten` with the mean and (unbiased) variance of every rank's response tokens."""
        m = mask.bool()
        total, count = self.parallel.all_reduce_sum([float(values[m].double().sum()), float(m.sum())])
        mean = total / count
        (squares,) = self.parallel.all_reduce_sum([float(((values[m].double() - mean) ** 2).sum())])
        var = squares / max(count - 1, 1)
        whitened = (values - mean) * (1.0 / math.sqrt(var + eps))
        return torch.where(m, whitened, torch.zeros((), dtype=values.dtype, device=values.device))

    # --- 6. update ------------------------------------------------------------------------------------------------

    def update(self, batch: Experience) -> UpdateStats:
        """PPO epochs over shuffled mini-batches of ``batch`` (which carries advantages and returns)."""
        cfg = self.config
        sums = dict.fromkeys(("policy_loss", "value_loss", "approx_kl", "clipfrac", "value_clipfrac", "grad_norm"), 0.0)
        n_updates, epochs_run = 0, 0
        par = self.parallel
        for _ in range(cfg.ppo_epochs):
            # The permutation is of the global batch (the same on every rank); each rank trains on its rows of it.
            perm = torch.randperm(cfg.batch_size if par.distributed else batch.sequences.shape[0],
                                  generator=self.generator)
            epoch_kl = 0.0
            for mb_rows in perm.split(cfg.mini_batch_size):
                if par.distributed:
                    local = [int(r) // par.world_size for r in mb_rows if int(r) % par.world_size == par.rank]
                    mb_stats = self._train_minibatch(batch.select(torch.tensor(local or [0], device=self.device)),
                                                     empty=not local)
                else:
                    mb_stats = self._train_minibatch(batch.select(mb_rows.to(self.device)))
                for key, value in mb_stats.items():
                    sums[key] += value
                epoch_kl += mb_stats["approx_kl"]
                n_updates += 1
            epochs_run += 1
            if cfg.target_kl is not None and epoch_kl / cfg.num_mini_batches > cfg.target_kl:
                break
        return UpdateStats(**{k: v / max(n_updates, 1) for k, v in sums.items()}, epochs_run=epochs_run)

    def _train_minibatch(self, mb: Experience, empty: bool = False) -> dict[str, float]:
        """One optimizer step on a mini-batch. Under torchrun ``mb`` is this rank's rows of the global mini-batch
        (``empty``: none, a dummy row of weight 0): its losses are weighted by its share of the global tokens (or
        responses, for sequence_mean), so that DDP's gradient average is the one-process gradient."""
        cfg = self.config
        logits, values = self.forward_model(mb.sequences, mb.attention_mask, mb.response_length)
        logits = logits.float() / cfg.temperature
        actions = mb.sequences[:, -mb.response_length :]
        logprobs = logprobs_from_logits(logits, actions)  # (mb, T)
        pg = self.policy_loss(logprobs, mb.logprobs, mb.advantages, mb.action_mask, mb.importance_weights)
        vf = self.value_loss(values.float(), mb.values, mb.returns, mb.action_mask)
        loss = pg.loss + cfg.vf_coef * vf.loss
        if cfg.entropy_coef:  # (the entropy metric comes from the rollout; no extra softmax here without a bonus)
            loss = loss - cfg.entropy_coef * self._reduce(entropy_from_logits(logits), mb.action_mask)
        stats = {"policy_loss": pg.loss.item(), "value_loss": vf.loss.item(), "approx_kl": pg.approx_kl.item(),
                 "clipfrac": pg.clipfrac.item(), "value_clipfrac": vf.clipfrac.item()}
        par = self.parallel
        if par.distributed:
            weight = 0.0 if empty else float(
                mb.action_mask.sum() if cfg.loss_reduction == "token_mean" else mb.action_mask.shape[0])
            keys = sorted(stats)
            totals = par.all_reduce_sum([weight, *(stats[k] * weight for k in keys)])
            stats = {k: totals[1 + i] / totals[0] for i, k in enumerate(keys)}
            loss = loss * (weight / totals[0] * par.world_size)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {**stats, "grad_norm": grad_norm.item()}

    # --- the step -------------------------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO step on the next batch of prompts; returns its metrics."""
        t0 = time.perf_counter()
        prompts = self.next_prompts()
        seeds = self.draw_seeds(len(prompts))
        if self.parallel.distributed:  # this rank's rows of the global batch, with the seeds they have in it
            rows = self._local_rows(len(prompts))
            prompts, seeds = [prompts[i] for i in rows], [seeds[i] for i in rows]
        exp = self.make_experience(prompts, seeds)
        t1 = time.perf_counter()
        metrics = self.learn(exp)
        metrics.update(time_rollout_s=t1 - t0, time_update_s=time.perf_counter() - t1)
        return metrics

    def learn(self, exp: Experience) -> dict[str, float]:
        """Steps 4-7 on an experience batch: rewards, advantages, the PPO update, metrics, beta's update."""
        rewards, kl = self.compute_rewards(exp)
        advantages, returns = self.compute_advantages(exp, rewards)
        batch = dataclasses.replace(exp, rewards=rewards, kl=kl, advantages=advantages, returns=returns)
        stats = self.update(batch)
        beta = self.kl_controller.value
        metrics = self.metrics(batch, stats, beta)
        if batch.importance_weights is not None:
            m = batch.action_mask.bool()
            metrics["importance_weight"] = float(batch.importance_weights[m].mean()) if m.any() else 1.0
            metrics["importance_clipfrac"] = (
                float((batch.importance_weights[m] >= self.config.importance_clip).float().mean()) if m.any() else 0.0)
        # 7. beta follows the KL just measured (Ziegler et al.: n_steps = samples in the batch).
        self.kl_controller.update(metrics["kl"], n_steps=self.config.batch_size)
        self.global_step += 1
        metrics["step"] = float(self.global_step)
        return metrics

    def metrics(self, batch: Experience, stats: UpdateStats, beta: float) -> dict[str, float]:
        """Diagnostics of one step under stable names (the names of TRL's PPO, without its prefixes)."""
        mask = batch.action_mask
        assert batch.kl is not None and batch.returns is not None
        kl_per_seq = batch.kl.sum(dim=1)  # (B,)
        non_score = -beta * kl_per_seq  # (B,)
        if self.parallel.distributed:
            return self._global_metrics(batch, stats, beta, kl_per_seq, non_score)
        residual_var = masked_var(batch.returns - batch.values, mask, unbiased=False)
        returns_var = masked_var(batch.returns, mask, unbiased=False)
        return {
            "rlhf_reward": float((batch.scores + non_score).mean()),
            "score": float(batch.raw_scores.mean()),
            "shaped_score": float(batch.scores.mean()),
            "kl": float(kl_per_seq.mean()),
            "non_score_reward": float(non_score.mean()),
            "entropy": float(masked_mean(batch.entropy, mask)),
            "approx_kl": stats.approx_kl,
            "clipfrac": stats.clipfrac,
            "value_clipfrac": stats.value_clipfrac,
            "value_loss": stats.value_loss,
            "policy_loss": stats.policy_loss,
            "explained_variance": float(1.0 - residual_var / returns_var) if returns_var > 0 else float("nan"),
            "response_length": float(mask.sum(dim=1).float().mean()),
            "eos_fraction": float(batch.ended.float().mean()),
            "beta": beta,
            "grad_norm": stats.grad_norm,
            "ppo_epochs_run": float(stats.epochs_run),
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
        }

    def _global_metrics(self, batch: Experience, stats: UpdateStats, beta: float, kl_per_seq: torch.Tensor,
                        non_score: torch.Tensor) -> dict[str, float]:
        """`metrics` over every rank's rows: per-response means over the global batch, per-token means over all its
        response tokens (the variances from summed moments)."""
        assert batch.returns is not None
        m = batch.action_mask.bool()
        residual = (batch.returns - batch.values).double()[m]
        returns = batch.returns.double()[m]
        row_sums = [(batch.scores + non_score).sum(), batch.raw_scores.sum(), batch.scores.sum(), kl_per_seq.sum(),
                    non_score.sum(), m.sum(dim=1).float().sum(), batch.ended.float().sum()]
        token_sums = [batch.entropy.double()[m].sum(), residual.sum(), (residual**2).sum(), returns.sum(),
                      (returns**2).sum()]
        totals = self.parallel.all_reduce_sum(
            [float(m.shape[0]), float(m.sum()), *(float(v) for v in row_sums), *(float(v) for v in token_sums)])
        rows, tokens = totals[0], totals[1]
        (rlhf_reward, score, shaped, kl, non_score_mean, length, eos) = (v / rows for v in totals[2:9])
        entropy, r1, r2, g1, g2 = (v / tokens for v in totals[9:14])
        residual_var, returns_var = r2 - r1**2, g2 - g1**2
        return {
            "rlhf_reward": rlhf_reward, "score": score, "shaped_score": shaped, "kl": kl,
            "non_score_reward": non_score_mean, "entropy": entropy, "approx_kl": stats.approx_kl,
            "clipfrac": stats.clipfrac, "value_clipfrac": stats.value_clipfrac, "value_loss": stats.value_loss,
            "policy_loss": stats.policy_loss,
            "explained_variance": 1.0 - residual_var / returns_var if returns_var > 0 else float("nan"),
            "response_length": length, "eos_fraction": eos, "beta": beta, "grad_norm": stats.grad_norm,
            "ppo_epochs_run": float(stats.epochs_run), "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
        }

    def train(
        self, num_steps: int, callback: Callable[[int, dict[str, float]], bool | None] | None = None
    ) -> list[dict[str, float]]:
        """Run ``num_steps`` PPO steps.  ``callback(step, metrics)`` after each; returning True stops the run."""
        history = []
        for _ in range(num_steps):
            metrics = self.step()
            history.append(metrics)
            if callback is not None and callback(self.global_step, metrics):
                break
        return history

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as if it had not stopped."""
        np_state = np.random.get_state()
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            # The reference too: rebuilding it (a copy of "the policy at the start") would copy the wrong weights.
            "ref_policy": self.ref_policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "global_step": self.global_step,
            "data": {"epoch": self._epoch, "cursor": self._cursor},
            "rng": {
                "generator": self.generator.get_state(),
                "seed_generator": self.seed_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_config = state.get("config")
        if saved_config is not None and saved_config != dataclasses.asdict(self.config):
            changed = sorted(k for k in saved_config if saved_config[k] != getattr(self.config, k, None))
            raise ValueError(f"checkpoint was written with a different PPOConfig (fields: {changed}); resume with it")
        self.model.load_state_dict(state["model"])
        self.ref_policy.load_state_dict(state["ref_policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.global_step = int(state["global_step"])
        self._epoch, self._cursor, self._order = int(state["data"]["epoch"]), int(state["data"]["cursor"]), None
        rng = state["rng"]
        self.generator.set_state(rng["generator"])
        if "seed_generator" in rng:  # (checkpoints before the two streams were split have one only)
            self.seed_generator.set_state(rng["seed_generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        np_rng = rng["numpy"]
        keys = np_rng["keys"].numpy().astype(np.uint32)
        np.random.set_state((np_rng["name"], keys, np_rng["pos"], np_rng["has_gauss"], np_rng["cached"]))

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write the trainer state (models, optimizer, scheduler, KL controller, reward statistics, RNGs, data
        position) to ``directory/ppo_state.pt``; returns that path.  Export the policy itself with save_pretrained."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CHECKPOINT_FILE
        tmp = target.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(target)  # atomic: a crash mid-write leaves the previous checkpoint intact
        return target

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what ``save_checkpoint`` wrote; the next ``step`` continues the stopped run exactly."""
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        self.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# rollouts (what a worker runs; the trainer's own step uses the same functions)


def seed_generator(seed: int) -> torch.Generator:
    """The stream of per-row sampling seeds of a run with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 7_919 + 104_729)
    return gen


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """The next ``n`` sampling seeds of a seed stream."""
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


@torch.no_grad()
def generate_rollout(
    policy: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    seeds: list[int],
    encode_prompt: PromptEncoder,
    reward_fn: RewardFn,
    sampling: SamplingParams,
    *,
    behaviour_logprobs: bool = False,
) -> Rollout:
    """1. sample one response per prompt (row i with ``seeds[i]``), 3. score them with ``reward_fn``."""
    device = next(policy.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids, prompt_mask = left_pad([encode_prompt(p) for p in prompts], pad, device)
    out = generate(policy, prompt_ids, prompt_mask, sampling, eos_token_id=eos, pad_token_id=pad, seeds=seeds,
                   return_logprobs=behaviour_logprobs)
    action_mask = out.response_mask  # (B, T)
    sequences = torch.cat([prompt_ids, out.response_ids], dim=1)  # (B, L)
    attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)  # (B, L)
    ended = torch.tensor([r == "stop" for r in out.finish_reasons], device=device)
    responses = decode_responses(tokenizer, out)
    raw_scores = torch.as_tensor(reward_fn(prompts, responses), dtype=torch.float32).to(device).flatten()
    if raw_scores.shape[0] != len(prompts):
        raise ValueError(f"reward_fn returned {raw_scores.shape[0]} scores for {len(prompts)} responses")
    behaviour = None
    if behaviour_logprobs and out.logprobs is not None:
        behaviour = torch.where(action_mask, out.logprobs.float(), torch.zeros((), device=device))
    return Rollout(prompts=list(prompts), responses=responses, sequences=sequences, attention_mask=attention_mask,
                   action_mask=action_mask, raw_scores=raw_scores, ended=ended, behaviour_logprobs=behaviour)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_policy(
    policy: nn.Module,
    ref_policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    encode_prompt: PromptEncoder,
    reward_fn: RewardFn,
    response_length: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    parallel: DataParallel = SINGLE_PROCESS,
) -> dict[str, float]:
    """Reward and KL of ``policy`` on held-out ``prompts``: one sampled response each (row i seeded with seed + i,
    so two policies are compared on the same randomness), its ``reward_fn`` score, and the exact
    KL(policy || ref) of its token distributions summed over the response (nats per response)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = SamplingParams(max_new_tokens=response_length, temperature=temperature)
    scores: list[float] = []
    kls: list[float] = []
    lengths: list[float] = []
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    mine = parallel.shard(range(len(prompts)))  # global indices: row i is seeded seed + i on any rank
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        chunk = [prompts[i] for i in rows]
        ids, mask = left_pad([encode_prompt(p) for p in chunk], pad, device)
        out = generate(policy, ids, mask, sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                       seeds=[seed + i for i in rows])
        responses = decode_responses(tokenizer, out)
        scores += torch.as_tensor(reward_fn(chunk, responses), dtype=torch.float32).flatten().tolist()
        t = out.response_ids.shape[1]
        sequences = torch.cat([ids, out.response_ids], dim=1)
        attention = torch.cat([mask, out.response_mask.long()], dim=1)
        logp = torch.log_softmax(_causal_lm_logits(policy, sequences, attention, t).float() / temperature, dim=-1)
        ref_logp = torch.log_softmax(_causal_lm_logits(ref_policy, sequences, attention, t).float() / temperature,
                                     dim=-1)
        per_token = (logp.exp() * (logp - ref_logp)).sum(dim=-1)  # (B, T)
        kls += (per_token * out.response_mask.float()).sum(dim=1).tolist()
        lengths += out.response_mask.sum(dim=1).float().tolist()
    policy.train(was_training)
    count, score_sum, kl_sum, length_sum = parallel.all_reduce_sum(
        [float(len(scores)), sum(scores), sum(kls), sum(lengths)])
    n = max(1.0, count)
    return {"eval_reward": score_sum / n, "eval_kl": kl_sum / n, "eval_response_length": length_sum / n,
            "eval_prompts": count}
