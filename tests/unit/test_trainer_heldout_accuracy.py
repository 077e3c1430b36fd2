"""The gate's held-out accuracy scores every response in batches; it equals scoring each ranking on its own."""
from __future__ import annotations

import torch

from rlhf.core.data import Ranking
from rlhf.core.models import ModelSize, build_causal_lm, build_reward_model
from rlhf.core.reward_training import prompt_text
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.sim import world_texts
from rlhf.trainer.reward import heldout_accuracy


def per_ranking(reward_model, rankings) -> float:
    """The reference: one forward pass per ranking."""
    right, total = 0.0, 0
    for r in rankings:
        scores = reward_model.score([prompt_text(reward_model.tokenizer, r)] * len(r.ordered), list(r.ordered)).tolist()
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                right += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
                total += 1
    return right / total


def test_batched_heldout_accuracy_equals_one_pass_per_ranking_across_batch_boundaries():
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    backbone = build_causal_lm(tokenizer, ModelSize(arch="llama", n_layer=2, n_embd=32, n_head=2), seed=0)
    reward_model = build_reward_model(backbone, tokenizer)
    torch.manual_seed(0)
    torch.nn.init.normal_(reward_model.model.score.weight)
    reward_model.eval()
    answers = ["boil it .", "bring food , a blanket and water to the park .", "turn off the water .",
               "replace the washer and check the seal .", "water it ."]
    rankings = [
        Ranking("how do I cook rice", tuple(answers[:2]), (1, 0)),
        Ranking("plan a picnic", tuple(answers[:3]), (2, 0, 1)),
        Ranking("fix a leaking tap", tuple(answers), (4, 3, 2, 1, 0)),
        Ranking("water a plant", tuple(answers[1:3]), (0, 1)),
        Ranking("", tuple(answers[:2]), (0, 1), messages=(("user", "hello"), ("assistant", "hi ."), ("user", "cook rice"))),
    ]
    reference = per_ranking(reward_model, rankings)
    assert 0.0 < reference < 1.0  # a random head: neither all right nor all wrong, so a mix-up would show
    for batch_size in (1, 3, 4, 64):  # 14 responses: batches that cut rankings apart
        assert heldout_accuracy(reward_model, rankings, batch_size=batch_size) == reference
    # the order is the ranking's: reversing every ranking turns right into wrong
    flipped = [Ranking(r.prompt, r.responses, tuple(reversed(r.ranking)), messages=r.messages) for r in rankings]
    assert heldout_accuracy(reward_model, flipped) == 1.0 - reference
    assert heldout_accuracy(reward_model, []) == 0.0
