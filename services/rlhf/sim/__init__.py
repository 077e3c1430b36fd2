"""The built-in task, apart from the core a user imports to train: an assistant world standing in for human annotators
(see `world`), demonstrations of mixed quality (`demonstrations`), the hidden gold utility that only evaluates
(`gold`), simulated annotators under Bradley–Terry noise (`annotators`), and `rlhf demo` (`demo`). The records of the
three stages and their JSONL loaders are the core's (`rlhf.core.data`), re-exported here for the task's users."""
from rlhf.core.data import (
    DataError,
    Demonstration,
    PreferencePair,
    Ranking,
    load_demonstrations,
    load_jsonl,
    load_pairs,
    load_rankings,
    write_jsonl,
)
from rlhf.sim.annotators import Annotator, AnnotatorConfig, AnnotatorPool, ranking_pairs
from rlhf.sim.demonstrations import DemonstratorMix, make_demonstrations, pretraining_texts, write_answer
from rlhf.sim.gold import GoldBreakdown, best_response, gold_breakdown, gold_utility, split_sentences
from rlhf.sim.world import INTENTS, TOPICS, Prompt, all_prompts, split_prompts, world_texts

__all__ = [
    "Annotator", "AnnotatorConfig", "AnnotatorPool", "ranking_pairs",
    "DataError", "Demonstration", "PreferencePair", "Ranking",
    "load_demonstrations", "load_jsonl", "load_pairs", "load_rankings", "write_jsonl",
    "DemonstratorMix", "make_demonstrations", "pretraining_texts", "write_answer",
    "GoldBreakdown", "best_response", "gold_breakdown", "gold_utility", "split_sentences",
    "INTENTS", "TOPICS", "Prompt", "all_prompts", "split_prompts", "world_texts",
]
