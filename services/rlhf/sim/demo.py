"""``rlhf demo``: the three RLHF stages on the built-in task, from nothing, on the CPU.

    1. world and tokenizer        the assistant world of `rlhf.sim`; a word-level tokenizer trained on it
    2. base policy                a small causal LM pretrained a little on the world's plain text
    3. supervised policy          fine-tuned on demonstrations of mixed quality (loss on response tokens only)
    4. rankings                   K samples of the supervised policy per prompt, ranked by simulated annotators
    5. reward model               the supervised policy's body with a scalar head, trained on the rankings
    6. PPO                        the supervised policy against the reward model, KL-anchored to itself;
                                  with ``rounds`` > 1, steps 4-6 repeat on the current PPO policy's samples
                                  (iterated RLHF), the reward model trained further on all rankings so far
    7. evaluation                 the hidden gold utility of base, SFT and PPO on held-out prompts, PPO's win rate
                                  over SFT, the reward model's accuracy beside the annotators' ceiling, PPO's KL
    8. report                     a table, ``results.json``, ``ppo_curves.png`` and every model in HF format

The gold utility is never shown to the reward model or to PPO: it evaluates, and drives the simulated annotators.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.core.generation import SamplingParams, decode_responses, encode_prompts, generate
from rlhf.core.models import (
    Manifest,
    RewardModel,
    build_causal_lm,
    build_reward_model,
    config_dict,
    count_parameters,
    frozen_copy,
    save_artifact,
)
from rlhf.core.plot import Panel, Series, render_panels
from rlhf.core.ppo import PPOConfig, PPOTrainer
from rlhf.core.reward_training import RewardTrainer, RewardTrainingConfig, ranking_accuracy
from rlhf.core.sft import SFTConfig, pretrain, train_sft
from rlhf.sim import (
    AnnotatorConfig,
    AnnotatorPool,
    Prompt,
    Ranking,
    gold_utility,
    make_demonstrations,
    pretraining_texts,
    ranking_pairs,
    split_prompts,
    world_texts,
    write_jsonl,
)
from rlhf.sim.demonstrations import DemonstratorMix
from rlhf.core.tokenizer import TokenizerConfig, format_prompt, train_tokenizer

RESULT_KEYS = ("gold_utility", "rm_accuracy", "rm_ceiling", "kl", "win_rate_ppo_vs_sft")


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, with defaults that meet the targets in minutes on two CPU cores."""

    seed: int = 0
    """Seeds every stage (each derives its own seed from it)."""
    model_size: str = "small"
    """Named size of the policy (`rlhf.core.models.SIZES`); the reward model shares its backbone."""
    threads: int = 1
    """torch intra-op threads. One is fastest for these tiny matrices on a shared machine: a second thread that
    waits for a busy core stalls every operation."""

    # --- data ------------------------------------------------------------------------------------------------------
    held_out_share: float = 0.2
    """Share of the world's prompts kept out of every stage's training, for evaluation."""
    num_pretraining_texts: int = 4000
    """Plain-text documents of the world's language for the base model."""
    num_demonstrations: int = 4000
    """Demonstrations (of mixed quality) for the supervised stage."""
    demonstrators: DemonstratorMix = field(default_factory=DemonstratorMix)
    """Shares of expert, average and poor demonstrators."""
    num_rankings: int = 3000
    """Rankings collected in round 1 (each of ``ranking_k`` samples of the supervised policy for one prompt)."""
    num_rankings_later: int = 1000
    """Rankings collected in each later round (of the current PPO policy's samples)."""
    ranking_k: int = 4
    """Responses per ranking (K)."""
    annotators: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """The simulated annotators: Bradley–Terry temperature, share and strength of the length bias."""

    # --- training --------------------------------------------------------------------------------------------------
    pretrain: SFTConfig = field(default_factory=lambda: SFTConfig(num_steps=200, learning_rate=2e-3))
    """The base model's language-model training."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(num_steps=600, learning_rate=2e-3))
    """Supervised fine-tuning."""
    reward: RewardTrainingConfig = field(default_factory=lambda: RewardTrainingConfig(learning_rate=1e-3))
    """Reward-model training."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            batch_size=32, num_mini_batches=2, ppo_epochs=4, response_length=48, learning_rate=6e-5,
            value_learning_rate=1e-3, kl_coef=0.1, missing_eos_penalty=1.0,
        )
    )
    """PPO (`rlhf.core.ppo.PPOConfig`). Tried on this task: learning rate 1e-4 with kl_coef 0.05 drifted into text the
    reward model overrates (reward up, gold down); 3e-5 with 0.2 stalled at a KL of ~1 nat; 6e-5 with 0.1 climbs
    steadily and stays well inside the KL budget. Rewards are standardized on SFT samples (`Demo.reward_fn`)."""
    ppo_steps: int = 100
    """PPO steps in all, split evenly over the rounds."""
    rounds: int = 2
    """Rounds of iterated RLHF (Bai et al. 2022, https://arxiv.org/abs/2204.05862, sec. 4.5). Round 1 ranks samples of
    the supervised policy, trains the reward model and runs PPO; each later round ranks samples of the current PPO
    policy, trains the reward model further on all rankings so far, and continues PPO. Later rounds show the reward
    model what PPO has learned to exploit."""
    reward_epochs_later: float = 1.0
    """Epochs over all rankings so far when the reward model is trained further in a later round."""
    kl_budget: float = 6.0
    """The most mean KL(PPO || SFT) per response, in nats summed over tokens, for a run to count as within budget."""

    # --- evaluation ------------------------------------------------------------------------------------------------
    eval_samples_per_prompt: int = 4
    """Samples per held-out prompt for each policy's gold utility and for the win rate."""
    eval_every: int = 20
    """PPO steps between gold evaluations for the curves (on a subset of the held-out prompts)."""
    sampling_batch_size: int = 64
    """Prompts per generation batch."""

    @property
    def max_new_tokens(self) -> int:
        """Longest response when sampling for rankings and evaluation: PPO's ``response_length``, so every stage
        sees responses of the same lengths."""
        return self.ppo.response_length

    def ppo_steps_per_round(self, round_index: int) -> int:
        """PPO steps of round ``round_index`` (0-based): an even split of ``ppo_steps``, the remainder last."""
        base = self.ppo_steps // self.rounds
        return base + (self.ppo_steps - base * self.rounds if round_index == self.rounds - 1 else 0)

    @classmethod
    def tiny(cls, seed: int = 0) -> DemoConfig:
        """A smoke-test budget: every stage runs end to end in seconds; the numbers mean nothing."""
        return cls(
            seed=seed,
            model_size="tiny",
            num_pretraining_texts=64,
            num_demonstrations=64,
            num_rankings=24,
            num_rankings_later=8,
            rounds=2,
            ranking_k=3,
            pretrain=SFTConfig(num_steps=3, batch_size=8, warmup_steps=1),
            sft=SFTConfig(num_steps=3, batch_size=8, warmup_steps=1),
            reward=RewardTrainingConfig(num_epochs=1.0, batch_size=8),
            ppo=PPOConfig(batch_size=8, num_mini_batches=2, ppo_epochs=1, response_length=12),
            ppo_steps=3,
            eval_samples_per_prompt=1,
            eval_every=1,
        )

    def seed_for(self, stage: str) -> int:
        """A stable per-stage seed derived from ``seed``."""
        return (self.seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(stage))) % 2**31


# ----------------------------------------------------------------------------------------------------------------------
# sampling and measuring


@dataclass
class Samples:
    prompts: list[Prompt]
    responses: list[str]
    kl: list[float] | None = None  # per response: sum over its tokens of KL(pi(.|s_t) || pi_ref(.|s_t)), nats


@torch.no_grad()
def _sequence_kl(
    policy: PreTrainedModel, ref: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
    response_ids: torch.Tensor, response_mask: torch.Tensor,
) -> torch.Tensor:
    """(B,) exact KL(pi || pi_ref) of each sampled response's token distributions, summed over its tokens."""
    sequences = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, response_mask.long()], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    t = response_ids.shape[1]
    logp = torch.log_softmax(policy(input_ids=sequences, attention_mask=attention, position_ids=positions)
                             .logits[:, -t - 1 : -1].float(), dim=-1)
    ref_logp = torch.log_softmax(ref(input_ids=sequences, attention_mask=attention, position_ids=positions)
                                 .logits[:, -t - 1 : -1].float(), dim=-1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(dim=-1)  # (B, T)
    return (per_token * response_mask.float()).sum(dim=1)


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    config: DemoConfig,
    seed: int,
    ref: PreTrainedModel | None = None,
    desc: str | None = None,
) -> Samples:
    """One sampled response per entry of ``prompts`` (temperature 1, as trained); with ``ref``, also each response's
    KL to ``ref``. Row i's randomness comes from seed + i alone (`rlhf.core.generation`)."""
    model.eval()
    responses: list[str] = []
    kls: list[float] = []
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=1.0)
    bs = config.sampling_batch_size
    for start in tqdm(range(0, len(prompts), bs), desc=desc, disable=desc is None, leave=False):
        chunk = prompts[start : start + bs]
        ids, mask = encode_prompts(tokenizer, [format_prompt(tokenizer, p.text) for p in chunk],
                                   add_special_tokens=False)
        out = generate(model, ids, mask, params, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, seeds=[seed + start + j for j in range(len(chunk))])
        responses += decode_responses(tokenizer, out)
        if ref is not None:
            kls += _sequence_kl(model, ref, ids, mask, out.response_ids, out.response_mask).tolist()
    return Samples(list(prompts), responses, kls if ref is not None else None)


def mean_gold(samples: Samples) -> float:
    return statistics.fmean(gold_utility(p, r) for p, r in zip(samples.prompts, samples.responses))


def win_rate(a: Samples, b: Samples) -> float:
    """P(gold(a) > gold(b)) over paired samples of the same prompts, ties counting half."""
    wins = 0.0
    for p, ra, pb, rb in zip(a.prompts, a.responses, b.prompts, b.responses, strict=True):
        assert p == pb
        ga, gb = gold_utility(p, ra), gold_utility(p, rb)
        wins += 1.0 if ga > gb else 0.5 if ga == gb else 0.0
    return wins / len(a.prompts)


def gold_ordered_pairs(groups: Sequence[tuple[Prompt, Sequence[str]]]) -> list[tuple[Prompt, str, str]]:
    """All pairs within each group with different gold utilities, as (prompt, better, worse)."""
    out = []
    for prompt, responses in groups:
        for p, a, b in ranking_pairs(prompt, responses):
            ga, gb = gold_utility(p, a), gold_utility(p, b)
            if ga != gb:
                out.append((p, a, b) if ga > gb else (p, b, a))
    return out


def reward_accuracy_on_pairs(reward_model: RewardModel, pairs: Sequence[tuple[Prompt, str, str]]) -> float:
    """Share of (prompt, better, worse) pairs on which the reward model agrees with the gold order."""
    prompts = [format_prompt(reward_model.tokenizer, p.text) for p, _, _ in pairs]
    better = reward_model.score(prompts, [a for _, a, _ in pairs])
    worse = reward_model.score(prompts, [b for _, _, b in pairs])
    return float((better > worse).float().mean())


# ----------------------------------------------------------------------------------------------------------------------
# the stages


class Demo:
    """The demo's stages as methods, each reading and writing the fields it needs; `run` calls them in order."""

    def __init__(self, config: DemoConfig, out_dir: str, progress: bool = True) -> None:
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.results: dict[str, object] = {}
        self.curves: dict[str, list[float]] = {"step": [], "reward": [], "kl": [], "gold_step": [], "gold": []}
        self.pool = AnnotatorPool(config.annotators)
        self.rankings: list[Ranking] = []
        os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = round(time.perf_counter() - start, 2)

    # 1. world and tokenizer
    def build_world(self) -> None:
        start = time.perf_counter()
        c = self.config
        self.train_prompts, self.held_out_prompts = split_prompts(c.held_out_share, seed=0)
        self.tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
        save_artifact(self._path("tokenizer"), None, self.tokenizer, Manifest(
            kind="tokenizer", version="tokenizer-1", data={"source": "rlhf.sim.world", "kind": "word"},
            config={"vocab_size": len(self.tokenizer)},
        ))
        self._timed("world", start)

    # 2. base policy
    def train_base(self) -> None:
        start = time.perf_counter()
        c = self.config
        self.base = build_causal_lm(self.tokenizer, c.model_size, seed=c.seed_for("base"))
        texts = pretraining_texts(c.num_pretraining_texts, seed=c.seed_for("pretraining-texts"))
        pretrain_config = dataclasses.replace(c.pretrain, seed=c.seed_for("pretrain"))
        result = pretrain(self.base, self.tokenizer, texts, pretrain_config, progress=self.progress)
        self.results["base_loss"] = result.final_loss()
        save_artifact(self._path("base"), self.base, self.tokenizer, Manifest(
            kind="base", version="base-1", parent=None,
            data={"source": "rlhf.sim.pretraining_texts", "texts": len(texts)},
            config={**config_dict(pretrain_config), "model_size": c.model_size},
        ))
        self._timed("base", start)

    # 3. supervised policy
    def train_sft(self) -> None:
        start = time.perf_counter()
        c = self.config
        self.sft = frozen_copy(self.base)
        self.sft.requires_grad_(True)
        demos = make_demonstrations(self.train_prompts, c.num_demonstrations, seed=c.seed_for("demos"),
                                    mix=c.demonstrators)
        write_jsonl(self._path("data", "demonstrations.jsonl"), demos)
        sft_config = dataclasses.replace(c.sft, seed=c.seed_for("sft"))
        result = train_sft(self.sft, self.tokenizer, demos, sft_config, progress=self.progress)
        self.results["sft_loss"] = result.final_loss()
        save_artifact(self._path("sft"), self.sft, self.tokenizer, Manifest(
            kind="sft", version="sft-1", parent="base-1",
            data={"source": "data/demonstrations.jsonl", "demonstrations": len(demos)},
            config=config_dict(sft_config),
        ))
        self._timed("sft", start)

    # 4. rankings (round 1: of the supervised policy; later rounds: of the current PPO policy)
    def collect_rankings(self, round_index: int) -> list[Ranking]:
        start = time.perf_counter()
        c = self.config
        policy = self.sft if round_index == 0 else self.policy
        n = c.num_rankings if round_index == 0 else c.num_rankings_later
        rng = random.Random(c.seed_for(f"rankings-{round_index}"))
        prompts = [rng.choice(self.train_prompts) for _ in range(n)]
        k = c.ranking_k
        samples = sample_responses(policy, self.tokenizer, [p for p in prompts for _ in range(k)], c,
                                   c.seed_for(f"ranking-samples-{round_index}"),
                                   desc=f"sampling for rankings, round {round_index + 1}" if self.progress else None)
        rankings = [self.pool.annotate(p, samples.responses[i * k : (i + 1) * k], rng) for i, p in enumerate(prompts)]
        write_jsonl(self._path("data", f"rankings-round{round_index + 1}.jsonl"), rankings)
        self.rankings += rankings
        self._timed(f"rankings_round{round_index + 1}", start)
        return rankings

    def collect_held_out(self) -> None:
        """K supervised samples on each held-out prompt, ranked by the annotators (for the accuracy against labels),
        and their pairs of different gold utilities (for the accuracy against gold and the annotators' ceiling)."""
        c = self.config
        k = c.ranking_k
        rng = random.Random(c.seed_for("held-out-rankings"))
        held = [p for p in self.held_out_prompts for _ in range(k)]
        samples = sample_responses(self.sft, self.tokenizer, held, c, c.seed_for("held-out-samples"))
        groups = [(p, samples.responses[i * k : (i + 1) * k]) for i, p in enumerate(self.held_out_prompts)]
        self.held_out_rankings = [self.pool.annotate(p, rs, rng) for p, rs in groups]
        self.held_out_pairs = gold_ordered_pairs(groups)
        self.results["rm_ceiling"] = self.pool.ceiling(self.held_out_pairs)
        self.results["held_out_pairs"] = len(self.held_out_pairs)

    # 5. reward model (round 1: from the supervised policy's body; later rounds: the last one, on all rankings)
    def train_reward_model(self, round_index: int) -> None:
        start = time.perf_counter()
        c = self.config
        if round_index == 0:
            self.reward_model = build_reward_model(self.sft, self.tokenizer, seed=c.seed_for("reward-head"))
            reward_config = dataclasses.replace(c.reward, seed=c.seed_for("reward"))
        else:
            reward_config = dataclasses.replace(c.reward, seed=c.seed_for(f"reward-{round_index}"),
                                                num_epochs=c.reward_epochs_later)
        RewardTrainer(self.reward_model, reward_config).train(self.rankings, progress=self.progress)
        accuracy = reward_accuracy_on_pairs(self.reward_model, self.held_out_pairs)
        self.results.setdefault("rm_accuracy_by_round", []).append(accuracy)  # type: ignore[union-attr]
        self.results["rm_accuracy"] = accuracy
        self.results["rm_accuracy_vs_labels"] = ranking_accuracy(self.reward_model, self.held_out_rankings)
        # Centre and scale the reward on the supervised policy's samples, so PPO's rewards are around 0 +- 1.
        flat = [(r.prompt, resp) for r in self.rankings[: c.num_rankings] for resp in r.responses]
        scores = self.reward_model.score([format_prompt(self.tokenizer, p) for p, _ in flat], [x for _, x in flat])
        self.reward_mean, self.reward_std = float(scores.mean()), float(scores.std().clamp(min=1e-6))
        version = f"reward-{round_index + 1}"
        save_artifact(self._path(version), self.reward_model, self.tokenizer, Manifest(
            kind="reward", version=version, parent="sft-1" if round_index == 0 else f"reward-{round_index}",
            data={"source": [f"data/rankings-round{i + 1}.jsonl" for i in range(round_index + 1)],
                  "rankings": len(self.rankings), "k": c.ranking_k, "annotators": config_dict(c.annotators),
                  "score_mean_on_sft": self.reward_mean, "score_std_on_sft": self.reward_std},
            config=config_dict(reward_config),
        ))
        self.reward_version = version
        self._timed(f"reward_model_round{round_index + 1}", start)

    def reward_fn(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """PPO's reward: the current reward model's score, standardized by its statistics on the SFT samples."""
        formatted = [format_prompt(self.tokenizer, p) for p in prompts]
        return (self.reward_model.score(formatted, responses) - self.reward_mean) / self.reward_std

    # 6. PPO
    def start_ppo(self) -> None:
        c = self.config
        self.policy = frozen_copy(self.sft)
        self.policy.requires_grad_(True)
        self.ppo_config = dataclasses.replace(c.ppo, seed=c.seed_for("ppo"))
        self.trainer = PPOTrainer(
            self.ppo_config, self.policy, frozen_copy(self.sft), self.tokenizer, self.reward_fn,
            [p.text for p in self.train_prompts],
            encode_prompt=lambda text: self.tokenizer(format_prompt(self.tokenizer, text),
                                                      add_special_tokens=False)["input_ids"],
        )
        self.curve_prompts = self.held_out_prompts[:: max(1, len(self.held_out_prompts) // 24)] * 2
        # The gold of the SFT policy on the curve's prompts, as step 0.
        self.curves["gold_step"].append(0)
        self.curves["gold"].append(mean_gold(sample_responses(
            self.sft, self.tokenizer, self.curve_prompts, c, c.seed_for("curve"))))

    def train_ppo(self, round_index: int) -> None:
        start = time.perf_counter()
        c = self.config
        steps = c.ppo_steps_per_round(round_index)
        bar = tqdm(total=steps, desc=f"ppo, round {round_index + 1}", disable=not self.progress, leave=False)
        with open(self._path("data", "ppo_metrics.jsonl"), "a", encoding="utf-8") as metrics_file:

            def on_step(step: int, metrics: dict[str, float]) -> None:
                metrics_file.write(json.dumps({**metrics, "round": round_index + 1}) + "\n")
                self.curves["step"].append(step)
                self.curves["reward"].append(metrics["score"])
                self.curves["kl"].append(metrics["kl"])
                if step % c.eval_every == 0 or step == c.ppo_steps:
                    self.curves["gold_step"].append(step)
                    self.curves["gold"].append(mean_gold(sample_responses(
                        self.policy, self.tokenizer, self.curve_prompts, c, c.seed_for("curve"))))
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['score']:.2f}", kl=f"{metrics['kl']:.1f}")

            self.trainer.train(steps, on_step)
        bar.close()
        self.policy.eval()
        self._timed(f"ppo_round{round_index + 1}", start)

    def save_policy(self) -> None:
        c = self.config
        save_artifact(self._path("policy"), self.policy, self.tokenizer, Manifest(
            kind="policy", version="policy-1", parent="sft-1",
            data={"reward_model": self.reward_version, "prompts": len(self.train_prompts), "steps": c.ppo_steps,
                  "rounds": c.rounds},
            config={**config_dict(self.ppo_config), "kl_budget": c.kl_budget},
        ))

    # 7. evaluation
    def evaluate(self) -> None:
        start = time.perf_counter()
        c = self.config
        prompts = [p for p in self.held_out_prompts for _ in range(c.eval_samples_per_prompt)]
        seed = c.seed_for("evaluation")
        desc = "evaluating" if self.progress else None
        base = sample_responses(self.base, self.tokenizer, prompts, c, seed, desc=desc)
        sft = sample_responses(self.sft, self.tokenizer, prompts, c, seed + 10**6, desc=desc)
        ppo = sample_responses(self.policy, self.tokenizer, prompts, c, seed + 2 * 10**6, ref=self.sft, desc=desc)
        assert ppo.kl is not None
        self.results["gold_utility"] = {"base": mean_gold(base), "sft": mean_gold(sft), "ppo": mean_gold(ppo)}
        self.results["kl"] = statistics.fmean(ppo.kl)
        self.results["win_rate_ppo_vs_sft"] = win_rate(ppo, sft)
        self.results["examples"] = [
            {"prompt": p.text, "sft": s, "ppo": q}
            for p, s, q in list(zip(prompts, sft.responses, ppo.responses))[:: max(1, len(prompts) // 6)]
        ]
        self._timed("evaluation", start)

    # 8. report
    def report(self) -> dict[str, object]:
        c = self.config
        r = self.results
        r["kl_budget"] = c.kl_budget
        r["rm_accuracy_share_of_ceiling"] = r["rm_accuracy"] / r["rm_ceiling"]  # type: ignore[operator]
        r["targets"] = {
            "win_rate_ppo_vs_sft>=0.70": r["win_rate_ppo_vs_sft"] >= 0.70,  # type: ignore[operator]
            "kl<=kl_budget": r["kl"] <= c.kl_budget,  # type: ignore[operator]
            "rm_accuracy>=0.9*rm_ceiling": r["rm_accuracy_share_of_ceiling"] >= 0.9,  # type: ignore[operator]
        }
        r["seed"] = c.seed
        r["timings_s"] = dict(self.timings)
        r["parameters"] = {"policy": count_parameters(self.sft), "reward_model": count_parameters(self.reward_model)}
        r["curves"] = self.curves
        r["config"] = config_dict(c)
        with open(self._path("results.json"), "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
        png = render_panels(
            [
                Panel("reward (reward-model score, standardized)", [Series("reward", self.curves["step"],
                                                                           self.curves["reward"])]),
                Panel("gold utility on held-out prompts", [Series("policy", self.curves["gold_step"],
                                                                  self.curves["gold"])]),
                Panel("kl to reference (nats per response)", [Series("kl", self.curves["step"], self.curves["kl"])],
                      hline=c.kl_budget),
            ],
            x_label="ppo step",
        )
        with open(self._path("ppo_curves.png"), "wb") as f:
            f.write(png)
        return r

    def run(self) -> dict[str, object]:
        start = time.perf_counter()
        self.build_world()
        self.train_base()
        self.train_sft()
        self.collect_held_out()
        for round_index in range(self.config.rounds):
            self.collect_rankings(round_index)
            self.train_reward_model(round_index)
            if round_index == 0:
                self.start_ppo()
            self.train_ppo(round_index)
        self.save_policy()
        self.evaluate()
        self.timings["total"] = round(time.perf_counter() - start, 2)
        return self.report()


def format_table(results: dict[str, object]) -> str:
    """The demo's summary as a text table."""
    g = results["gold_utility"]
    t = results["targets"]
    ok = {True: "ok", False: "MISSED"}
    rows = [
        ("gold utility, held-out prompts", "base / SFT / PPO", f"{g['base']:+.2f} / {g['sft']:+.2f} / {g['ppo']:+.2f}", ""),
        ("gold win rate PPO over SFT", ">= 0.70", f"{results['win_rate_ppo_vs_sft']:.3f}",
         ok[t["win_rate_ppo_vs_sft>=0.70"]]),
        ("mean KL(PPO || SFT), nats/response", f"<= {results['kl_budget']:.1f}", f"{results['kl']:.2f}",
         ok[t["kl<=kl_budget"]]),
        ("reward-model accuracy vs gold order", ">= 0.9 x ceiling", f"{results['rm_accuracy']:.3f}",
         ok[t["rm_accuracy>=0.9*rm_ceiling"]]),
        ("annotator accuracy ceiling", "", f"{results['rm_ceiling']:.3f}",
         f"({results['rm_accuracy_share_of_ceiling']:.0%} of it)"),
        ("reward-model accuracy vs held-out labels", "", f"{results['rm_accuracy_vs_labels']:.3f}", ""),
        ("wall time", "< 900 s", f"{results['timings_s']['total']:.0f} s", ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


# ----------------------------------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.path.join("out", "demo"), help="where artifacts go (default: out/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run; the numbers mean nothing")
    parser.add_argument("--ppo-steps", type=int, default=None, help="PPO steps in all (default: the config's)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of iterated RLHF (default: the config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; see DemoConfig.threads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = DemoConfig.tiny(args.seed) if args.tiny else DemoConfig(seed=args.seed)
    if args.ppo_steps is not None:
        config = dataclasses.replace(config, ppo_steps=args.ppo_steps)
    if args.rounds is not None:
        config = dataclasses.replace(config, rounds=args.rounds)
    if args.threads is not None:
        config = dataclasses.replace(config, threads=args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars for saving/loading weights: noise here
    hf_logging.set_verbosity_error()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        results = Demo(config, args.out, progress=not args.no_progress).run()
    finally:
        torch.set_num_threads(threads_before)
    print(format_table(results))
    print(f"artifacts, results.json and ppo_curves.png in {os.path.abspath(args.out)}")
    return 0


__all__ = ["DemoConfig", "Demo", "Samples", "sample_responses", "win_rate", "format_table", "add_arguments", "run",
           "RESULT_KEYS"]
