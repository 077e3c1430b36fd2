"""Tiny checkpoints of real architectures, built here (nothing downloaded), for the training commands' tests:

- `llama_chatml`: a Llama-architecture causal LM with tied embeddings, a byte-level BPE tokenizer trained here, the
  ChatML chat template, and special tokens that are not the project's own (``<s>``, ``</s>``, ``<|im_start|>``,
  ``<|im_end|>`` as eos) and no pad token, like many published Llama/Qwen checkpoints.
- `gpt2_plain`: a GPT-2 causal LM with a byte-level BPE tokenizer whose only special token is ``<|endoftext|>``
  (bos = eos = unk), no pad token and no chat template, like the original GPT-2.

And the small JSONL data the tests train on: a task a tiny model learns in a few dozen steps (answer a colour
question with that colour; prefer polite answers).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["car", "house", "hat", "ball", "door", "cup", "bike", "shirt"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        c, t = rng.choice(COLOURS), rng.choice(THINGS)
        texts += [f"What colour is the {c} {t}?", f"The {t} is {c}.", f"Thank you, the {t} is {c}. Have a nice day!",
                  f"No. {t} {t} {t}.", "Please tell me about the world, the sky and the sea."]
    return texts


def _bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer=trainer)
    return backend


def llama_chatml(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny Llama with a ChatML BPE tokenizer (no pad token) to ``path``; returns ``path``."""
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(specials, 400), bos_token="<s>", eos_token="<|im_end|>", unk_token=None,
        additional_special_tokens=["</s>", "<|im_start|>"], model_max_length=128,
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpt2_plain(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny GPT-2 with a plain BPE tokenizer (no pad token, no chat template) to ``path``."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<|endoftext|>"], 400), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=128,
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)  # dropout 0.1 as GPT-2 ships: the commands switch it off
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demonstrations(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c, t = rng.choice(COLOURS), rng.choice(THINGS)
        rows.append({"prompt": f"What colour is the {c} {t}?", "response": f"The {t} is {c}."})
    return rows


def preference_pairs(n: int = 64, seed: int = 0) -> list[dict]:
    """Polite, correct answers are chosen over curt wrong ones; every fourth record is a ranking of three."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c, t = rng.choice(COLOURS), rng.choice(THINGS)
        prompt = f"What colour is the {c} {t}?"
        good, bad = f"Thank you, the {t} is {c}. Have a nice day!", f"No. {t} {t} {t}."
        if i % 4 == 3:
            rows.append({"prompt": prompt, "responses": [bad, good, f"The {t} is {c}."], "ranking": [1, 2, 0]})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def prompts(n: int = 32, seed: int = 0) -> list[dict]:
    """Prompt-file rows: plain prompts and, every other row, a conversation with a system turn."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        c, t = rng.choice(COLOURS), rng.choice(THINGS)
        question = f"What colour is the {c} {t}?"
        if i % 2:
            rows.append({"messages": [{"role": "system", "content": "Be polite."},
                                      {"role": "user", "content": question}]})
        else:
            rows.append({"prompt": question})
    return rows


def write_data(root: Path, demos: int, pairs: int, prompt_count: int) -> Path:
    """``demos.jsonl``, ``pairs.jsonl`` and ``prompts.jsonl`` under ``root`` (the commands' three inputs)."""
    write_jsonl(root / "demos.jsonl", demonstrations(demos))
    write_jsonl(root / "pairs.jsonl", preference_pairs(pairs))
    write_jsonl(root / "prompts.jsonl", prompts(prompt_count))
    return root
