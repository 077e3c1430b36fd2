"""The built-in task: an assistant world standing in for human annotators (see `world`), demonstrations of mixed
quality (`demonstrations`), the hidden gold utility that only evaluates (`gold`), simulated annotators under
Bradley–Terry noise (`annotators`), and the records of the three stages with their JSONL loaders (`data`)."""
from rlhf.core.task.annotators import Annotator, AnnotatorConfig, AnnotatorPool, ranking_pairs
from rlhf.core.task.data import (
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
from rlhf.core.task.demonstrations import DemonstratorMix, make_demonstrations, pretraining_texts, write_answer
from rlhf.core.task.gold import GoldBreakdown, best_response, gold_breakdown, gold_utility, split_sentences
from rlhf.core.task.world import INTENTS, TOPICS, Prompt, all_prompts, split_prompts, world_texts

__all__ = [
    "Annotator", "AnnotatorConfig", "AnnotatorPool", "ranking_pairs",
    "DataError", "Demonstration", "PreferencePair", "Ranking",
    "load_demonstrations", "load_jsonl", "load_pairs", "load_rankings", "write_jsonl",
    "DemonstratorMix", "make_demonstrations", "pretraining_texts", "write_answer",
    "GoldBreakdown", "best_response", "gold_breakdown", "gold_utility", "split_sentences",
    "INTENTS", "TOPICS", "Prompt", "all_prompts", "split_prompts", "world_texts",
]
