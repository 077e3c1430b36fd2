"""Tiny models and a word-level tokenizer for the PPO and generation tests (built in memory, nothing downloaded)."""
from __future__ import annotations

import contextlib

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "house", "good", "bad", "yes", "no", "please",
    "thanks", "hello", "world", "red", "blue", "green", "one", "two", "three", "is", "was", "big", "small",
]
PAD_ID, EOS_ID = 0, 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size(), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return LlamaForCausalLM(config).eval()


PROMPTS = [
    "the cat sat on the mat",
    "hello",
    "a dog ran to the house",
    "is the world big",
    "please say yes",
    "one two three",
    "the red dog",
    "blue green",
]


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; on a shared 2-core machine a second thread that spins while
    others hold the cores slows them by 10x.  Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
