"""Batched sampling with a KV cache for any Hugging Face causal LM, shared by the PPO trainer and the policy service.

``generate_steps`` is the decoding loop: it yields every step's new token per row, so a streaming server can send tokens
as they come; ``generate`` runs it to the end and returns one ``GenerationOutput``.

Reproducibility per request: each row draws its random numbers from its own ``torch.Generator`` seeded with that row's
seed, all of them up front (one uniform per step), and picks its token by inverse-CDF sampling from its own
distribution.  So a row's tokens depend on its seed and its own logits only, not on which other rows share the batch.
(Logits themselves can differ in the last bits between batch shapes; a token flips only if its uniform lands within
that rounding of a CDF boundary.)
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "SamplingParams",
    "GenerationStep",
    "GenerationOutput",
    "FinishReason",
    "generate_steps",
    "generate",
    "left_pad",
    "encode_prompts",
    "decode_responses",
]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled."""

    max_new_tokens: int = 64
    """Most tokens to generate; a row that reaches it finishes with reason 'length'."""
    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose mass reaches top_p (after top_k); 1 = off."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the response like EOS does (the stop token is part of the response)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


@dataclass(frozen=True)
class GenerationStep:
    """What one decoding step produced, for every row of the batch."""

    index: int  # step number, 0-based: the position of these tokens in the response
    tokens: torch.Tensor  # (B,) long; the pad id for rows that had finished before this step
    emitted: torch.Tensor  # (B,) bool; the row produced a response token at this step
    finished: torch.Tensor  # (B,) bool; the row is finished after this step
    stopped: torch.Tensor  # (B,) bool; the row finished on EOS or a stop token (else, once finished: 'length')
    logprobs: torch.Tensor | None  # (B,) log-prob of each token under the temperature-scaled distribution; or None

    def finish_reasons(self) -> list[FinishReason | None]:
        """Per row: None while it is still generating, else why it ended."""
        return [
            ("stop" if s else "length") if f else None
            for f, s in zip(self.finished.tolist(), self.stopped.tolist())
        ]


@dataclass(frozen=True)
class GenerationOutput:
    response_ids: torch.Tensor  # (B, T) generated ids, T <= max_new_tokens; pad after a row finished
    response_mask: torch.Tensor  # (B, T) bool; the row's response tokens, its EOS / stop token included
    finish_reasons: list[FinishReason]  # (B,) 'stop' (EOS or a stop token) | 'length'
    logprobs: torch.Tensor | None = None  # (B, T) log-prob of each sampled token (0 where masked), if asked for

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of response tokens per row."""
        return self.response_mask.sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# model plumbing


@dataclass(frozen=True)
class ForwardSpec:
    cache_kwarg: str  # "cache" in transformers >= 5, "past_key_values" before
    logits_to_keep: bool  # the forward can compute logits for the last position only


_SPECS: dict[type, ForwardSpec] = {}


def forward_spec(model: torch.nn.Module) -> ForwardSpec:
    spec = _SPECS.get(type(model))
    if spec is None:
        params = inspect.signature(model.forward).parameters
        spec = ForwardSpec(
            cache_kwarg="cache" if "cache" in params else "past_key_values",
            logits_to_keep="logits_to_keep" in params,
        )
        _SPECS[type(model)] = spec
    return spec


def returned_cache(output: Any, spec: ForwardSpec) -> Any:
    # ModelOutput is a dict of its non-None fields; reading by key avoids the deprecated attribute alias.
    return output[spec.cache_kwarg] if spec.cache_kwarg in output else None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) left-padded mask -> (B, L) positions 0, 1, ... over the real tokens (0 on padding)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class RowParams:
    """SamplingParams of the batch as tensors, built once per call."""

    max_new_tokens: torch.Tensor  # (B,) long
    temperature: torch.Tensor  # (B, 1) float; 1 for greedy rows (they take the argmax, unscaled)
    greedy: torch.Tensor  # (B,) bool
    top_k: torch.Tensor  # (B, 1) long; vocabulary size where off
    top_p: torch.Tensor  # (B, 1) float
    all_greedy: bool
    any_greedy: bool
    filtered: bool  # some row uses top_k or top_p

    @staticmethod
    def build(params: Sequence[SamplingParams], vocab_size: int, device: torch.device) -> RowParams:
        temps = [p.temperature for p in params]
        greedy = torch.tensor([t == 0 for t in temps], device=device)
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        return RowParams(
            max_new_tokens=torch.tensor([p.max_new_tokens for p in params], device=device),
            temperature=torch.tensor([t if t > 0 else 1.0 for t in temps], device=device)[:, None],
            greedy=greedy,
            top_k=torch.tensor(top_k, device=device)[:, None],
            top_p=torch.tensor([p.top_p for p in params], device=device)[:, None],
            all_greedy=bool(greedy.all()),
            any_greedy=bool(greedy.any()),
            filtered=any(k < vocab_size for k in top_k) or any(p.top_p < 1.0 for p in params),
        )


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, V) unnormalised probabilities, (B,) uniforms in [0, 1) -> (B,) index of the sampled entry."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    targets = uniforms[:, None] * cdf[:, -1:]  # (B, 1)
    idx = torch.searchsorted(cdf, targets, right=True)  # first entry whose cdf exceeds the target
    return idx.clamp(max=probs.shape[-1] - 1).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,  # (B, V)
    rows: RowParams,
    uniforms: torch.Tensor,  # (B,) this step's uniform per row
    want_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = logits.float()
    if rows.all_greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1) if want_logprobs else None
        return tokens, logprobs

    logp = torch.log_softmax(logits / rows.temperature, dim=-1)  # (B, V)
    if rows.filtered:
        sorted_logp, sorted_idx = logp.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logp.exp()
        ranks = torch.arange(logp.shape[-1], device=logp.device)[None, :]
        kept = sorted_probs * (ranks < rows.top_k)  # top-k, then top-p on the renormalised rest (as HF does)
        cum = kept.cumsum(dim=-1) / kept.sum(dim=-1, keepdim=True)
        kept = kept * ((cum - kept / kept.sum(dim=-1, keepdim=True)) < rows.top_p)  # mass before a token < top_p
        # Back to vocabulary order before sampling, so that a row without top-k/top-p draws exactly the token it
        # would draw in a batch without any filtered row (its probabilities are the same values in the same order).
        probs = torch.zeros_like(logp).scatter(-1, sorted_idx, kept)
    else:
        probs = logp.exp()
    tokens = _inverse_cdf(probs, uniforms)
    if rows.any_greedy:
        tokens = torch.where(rows.greedy, logits.argmax(dim=-1), tokens)
    logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1) if want_logprobs else None
    return tokens, logprobs


def row_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(steps, B) uniforms, column b drawn from a generator seeded with seeds[b] alone."""
    columns = []
    for seed in seeds:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        columns.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(columns, dim=1).to(device=device, dtype=torch.float32)


def _stop_table(
    params: Sequence[SamplingParams], eos_ids: Sequence[int], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """(B, V) bool: token v ends row b."""
    table = torch.zeros(len(params), vocab_size, dtype=torch.bool)
    for row, p in enumerate(params):
        ids = [i for i in (*eos_ids, *p.stop_token_ids) if 0 <= i < vocab_size]
        table[row, ids] = True
    return table.to(device)


def _as_id_list(ids: int | Iterable[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@torch.inference_mode()
def generate_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, P) prompts, left-padded
    attention_mask: torch.Tensor,  # (B, P) 1 for prompt tokens, 0 for the left padding
    params: SamplingParams | Sequence[SamplingParams],
    *,
    eos_token_id: int | Iterable[int] | None,
    pad_token_id: int | None,
    seeds: Sequence[int] | None = None,
    return_logprobs: bool = False,
) -> Iterator[GenerationStep]:
    """Decode with a KV cache, yielding a ``GenerationStep`` after each new token of the batch.

    ``params`` is one SamplingParams for all rows or one per row; ``seeds`` one int per row (None: drawn from torch's
    global generator).  A row finishes on EOS or one of its stop tokens ('stop') or after its max_new_tokens
    ('length'); finished rows then emit ``pad_token_id``.  The loop ends when every row has finished, or when the
    caller stops iterating.  The yielded tensors are inference tensors (read them, or clone them, outside).
    """
    batch, prompt_len = input_ids.shape
    if batch == 0:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] all 1) and non-empty; see encode_prompts")
    row_params = [params] * batch if isinstance(params, SamplingParams) else list(params)
    if len(row_params) != batch:
        raise ValueError(f"got {len(row_params)} SamplingParams for a batch of {batch}")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (batch,)).tolist()
    elif len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    eos_ids = _as_id_list(eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    device = input_ids.device
    spec = forward_spec(model)
    max_steps = max(p.max_new_tokens for p in row_params)
    extra = {"logits_to_keep": 1} if spec.logits_to_keep else {}

    # 1. prefill: the prompts in one forward pass.
    positions = position_ids_from_mask(attention_mask)  # (B, P)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra)
    cache = returned_cache(out, spec)
    logits = out.logits[:, -1]  # (B, V)

    vocab_size = logits.shape[-1]
    rows = RowParams.build(row_params, vocab_size, device)
    stop_table = _stop_table(row_params, eos_ids, vocab_size, device)  # (B, V)
    uniforms = row_uniforms(seeds, max_steps, device)  # (steps, B)
    row_index = torch.arange(batch, device=device)
    # (B, P + steps) attention mask of prompt + response; a step reads a prefix of it.
    full_mask = torch.cat(
        [attention_mask.to(torch.long), torch.ones(batch, max_steps, dtype=torch.long, device=device)], dim=1
    )
    next_position = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1) position of the first new token
    active = torch.ones(batch, dtype=torch.bool, device=device)  # (B,)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    pad = torch.full((batch,), pad_id, dtype=torch.long, device=device)

    for step in range(max_steps):
        # 2. pick each row's token; finished rows emit pad.
        tokens, logprobs = sample_tokens(logits, rows, uniforms[step], return_logprobs)
        tokens = torch.where(active, tokens, pad)
        emitted = active
        stop_now = active & stop_table[row_index, tokens]
        stopped = stopped | stop_now
        active = active & ~stop_now & (rows.max_new_tokens > step + 1)
        if logprobs is not None:
            logprobs = torch.where(emitted, logprobs, torch.zeros_like(logprobs))
        yield GenerationStep(
            index=step, tokens=tokens, emitted=emitted, finished=~active, stopped=stopped, logprobs=logprobs
        )
        if not bool(active.any()):
            return
        # 3. extend the cache by the new tokens.
        out = model(
            input_ids=tokens[:, None],
            attention_mask=full_mask[:, : prompt_len + step + 1],
            position_ids=next_position + step,
            use_cache=True,
            **{spec.cache_kwarg: cache},
            **extra,
        )
        cache = returned_cache(out, spec)
        logits = out.logits[:, -1]


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, P) left-padded
    attention_mask: torch.Tensor,  # (B, P)
    params: SamplingParams | Sequence[SamplingParams],
    *,
    eos_token_id: int | Iterable[int] | None,
    pad_token_id: int | None,
    seeds: Sequence[int] | None = None,
    return_logprobs: bool = False,
) -> GenerationOutput:
    """Run ``generate_steps`` to the end and collect the responses; see there for the arguments."""
    tokens, emitted, logprobs = [], [], []
    last: GenerationStep | None = None
    for last in generate_steps(
        model,
        input_ids,
        attention_mask,
        params,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seeds=seeds,
        return_logprobs=return_logprobs,
    ):
        tokens.append(last.tokens)
        emitted.append(last.emitted)
        if last.logprobs is not None:
            logprobs.append(last.logprobs)
    if last is None:  # empty batch
        empty = torch.zeros(0, 0, dtype=torch.long, device=input_ids.device)
        return GenerationOutput(empty, empty.bool(), [], empty.float() if return_logprobs else None)
    # Stacked outside inference mode, so the results are ordinary tensors that autograd may save.
    return GenerationOutput(
        response_ids=torch.stack(tokens, dim=1),
        response_mask=torch.stack(emitted, dim=1),
        finish_reasons=["stop" if s else "length" for s in last.stopped.tolist()],
        logprobs=torch.stack(logprobs, dim=1) if return_logprobs else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# text helpers


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids (B, P), attention_mask (B, P), left-padded to the longest."""
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("a prompt has no tokens; give every prompt at least one token")
    width = max((len(ids) for ids in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], device: torch.device | str = "cpu", add_special_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and left-pad prompts -> input_ids (B, P), attention_mask (B, P).  The tokenizer is not modified."""
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return left_pad(encoded, _pad_id(tokenizer), device)


def _pad_id(tokenizer: Any) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad_id)


def decode_responses(tokenizer: Any, output: GenerationOutput, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row's response tokens (EOS and padding dropped with ``skip_special_tokens``)."""
    ids = output.response_ids.tolist()
    lengths = output.lengths.tolist()
    return [
        tokenizer.decode(row[:n], skip_special_tokens=skip_special_tokens) for row, n in zip(ids, lengths)
    ]
