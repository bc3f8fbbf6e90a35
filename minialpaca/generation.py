"""Decoding with a KV cache: prefill the prompts once, then one token per step; greedy or sampled.

A batch of prompts of different lengths is left-padded so every row's last prompt token sits in the same
slot and the new tokens of all rows go in together. Padding must be invisible: pad slots get segment id 0
and real tokens segment id 1, so the model's segment mask (recorded per cache slot) keeps text from ever
attending to padding, and each row's rotary positions start at 0 at its first real token. Then a row's
tokens are exactly what it would get alone (up to float rounding of a different matmul shape).

The returned tokens stop *before* the end-of-sequence token: EOS is a signal, not text, and an answer
written out for AlpacaEval must not contain it. A row that stopped early is shorter than max_new_tokens.
"""
from typing import Callable, List, Optional, Sequence

import torch

from . import packing
from .model import Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and to the nucleus of top_p probability."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens above it already hold top_p of the mass; the top token always stays.
        outside = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model: Transformer, tokens, positions=None, segment_ids=None) -> torch.Tensor:
    """Run the whole prompt batch (B, T) through the model, filling the cache; logits of its last slot (B, V)."""
    return model(tokens, 0, positions, segment_ids, last_only=True)[:, -1]


def decode_step(model: Transformer, token, start_pos: int, position, segment_ids=None) -> torch.Tensor:
    """One new token per row (B, 1) at cache slot start_pos -> next-token logits (B, V)."""
    return model(token, start_pos, position, segment_ids)[:, -1]


_compiled_decode_step = None


def compiled_decode_step():
    """decode_step under torch.compile, built once. dynamic=True because the cache slot (and so the key
    length) changes every step; without it each step would compile a new graph."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, dynamic=True)
    return _compiled_decode_step


def check_request(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  temperature: float, top_p: float, top_k: Optional[int]) -> None:
    """Raise ValueError with one sentence for a request that cannot run, before any work starts."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt; got an empty list")
    vocab = model.args.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; it needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.rope_cos.shape[0]  # rotary table: 2 * max_seq_len positions
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"{longest + max_new_tokens} positions, more than the model's {limit} (2 * max_seq_len)"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")


def left_pad(prompts: Sequence[Sequence[int]], device):
    """tokens, positions, segment ids, each (B, T): prompts right-aligned, pads (id 0, segment 0) on the left,
    rotary positions counting from 0 at each row's first real token. positions and segments are None when
    no row is padded: plain causal attention is then exactly right (and faster)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    T = int(lengths.max())
    tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
    if bool((lengths == T).all()):
        return tokens, None, None
    slot = torch.arange(T, device=device)[None, :]  # (1, T)
    n_pads = (T - lengths)[:, None]  # (B, 1)
    positions = (slot - n_pads).clamp(min=0)  # (B, T)
    segments = (slot >= n_pads).long()  # (B, T)
    return tokens, positions, segments


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    compile: bool = False,
) -> List[List[int]]:
    """The new token ids for each prompt (lists of token ids), EOS excluded.

    Greedy when temperature == 0; else sampled with top_k / top_p, reproducibly when `seed` is given.
    A row stops at eos_id (not included) or after max_new_tokens; the loop ends when every row has.
    on_token(row, token_id) is called for each token as it is made, for streaming.
    compile=True runs the one-token step under torch.compile (worth it on a GPU; the first call compiles).
    While it runs, each layer's projections are stacked into fewer, wider matrices (packing.py).
    """
    check_request(model, prompts, max_new_tokens, temperature, top_p, top_k)
    B = len(prompts)
    out: List[List[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    device = model.tok_embeddings.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    step_fn = compiled_decode_step() if compile else decode_step

    tokens, positions, segments = left_pad(prompts, device)
    T = tokens.shape[1]
    # Each row's next rotary position: its own length, whatever padding sits to its left.
    next_pos = torch.tensor([[len(p)] for p in prompts], device=device)  # (B, 1)
    step_segments = None if segments is None else torch.ones(B, 1, dtype=torch.long, device=device)
    done = [False] * B

    model.setup_cache(B, T + max_new_tokens)
    try:
        packing.pack(model)
        logits = prefill(model, tokens, positions, segments)  # (B, V)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, top_k, generator)  # (B,)
            for row, t in enumerate(token.tolist()):  # the one host sync per step
                if done[row]:
                    continue
                if t == eos_id:
                    done[row] = True
                    continue
                out[row].append(t)
                if on_token is not None:
                    on_token(row, t)
            if all(done) or step == max_new_tokens - 1:
                break
            # Finished rows keep decoding (their tokens are dropped): the batch keeps one shape.
            logits = step_fn(model, token[:, None], T + step, next_pos, step_segments)
            next_pos += 1
    finally:
        packing.unpack(model)
        model.clear_cache()
    return out
