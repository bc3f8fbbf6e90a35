"""The LLaMA transformer, top to bottom.

Numerically the same function as Meta's reference (meta-llama/llama `model.py`): RMSNorm in fp32 then cast,
rotary embeddings on interleaved pairs (x[2i], x[2i+1]), SwiGLU feed-forward with Meta's hidden-size rule,
grouped-query attention, pre-norm residuals, an untied output layer and fp32 logits. Parameter names are
Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...), so every checkpoint format is
a renaming away.

Shapes: B batch, T new tokens, S key length (cache slots), H query heads, H_kv key/value heads, D head_dim.

The model knows nothing about files, processes or devices: loading lives in checkpoint.py, decoding in
generation.py, sharding in distributed.py. `kernels` picks the implementation of the hot ops:
"torch" (the plain code below, the reference), "triton" (the fused kernels in kernels/) or "auto"
(triton on CUDA tensors, torch elsewhere).
"""
import math
from dataclasses import dataclass, asdict, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL_CHOICES = ("torch", "triton", "auto")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.dim // self.n_heads % 2:
            problems.append(f"head_dim {self.dim // self.n_heads} is odd; rotary embeddings rotate pairs")
        if self.vocab_size <= 0:
            problems.append(f"vocab_size must be positive, got {self.vocab_size}")
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's SwiGLU size: 2/3 of 4*dim (so the three matrices cost what GELU's two did), optionally
        scaled, then rounded up to a multiple of `multiple_of` for efficient matmuls."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a params.json-like dict; unknown keys (e.g. Meta's `rope_freqs`) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.kernels, x):
            from kernels import rms_norm
            return rms_norm(x, self.weight, self.eps)
        # x / sqrt(mean(x^2) + eps) in fp32 for stability, cast back, *then* scaled: Meta's order (it
        # matters in bf16). F.rms_norm is that formula as one op, forward and backward.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_positions: int, theta: float, device=None):
    """cos and sin of every (position, frequency) pair: each (max_positions, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) by its angle, in fp32.

    x: (B, T, n, D); cos, sin: (B, T, 1, D/2). As Meta writes it: each pair is the complex number
    x[2i] + i x[2i+1], and rotating it is multiplying by cos + i sin. In eager PyTorch that is the fastest
    form too (one complex multiply instead of a dozen real ops and their backward). torch.compile's code
    generator has no complex numbers, so under it the same arithmetic is spelled out in real numbers.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, n, D/2, 2)
    if torch.compiler.is_compiling():
        x0, x1 = pairs.unbind(-1)
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return rotated.flatten(-2).type_as(x)  # (B, T, n, D)


class KVCache(nn.Module):
    """Keys and values of every position decoded so far, so each new token costs one step, not a re-run."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, T, D) at slots [start_pos, start_pos+T); return all slots so far (B, H_kv, S, D)."""
        T = k.shape[2]
        self.k.narrow(2, start_pos, T).copy_(k)
        self.v.narrow(2, start_pos, T).copy_(v)
        return self.k.narrow(2, 0, start_pos + T), self.v.narrow(2, 0, start_pos + T)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kernels: str = "torch"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.kernels = kernels
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None
        self.wqkv: Optional[torch.Tensor] = None  # wq, wk, wv stacked, while decoding (packing.py)

    def forward(self, x, cos, sin, start_pos=0, mask=None, segment_ids=None):
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = F.linear(x, self.wqkv).split([self.wq.out_features, self.wk.out_features,
                                                     self.wv.out_features], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        if use_triton(self.kernels, x):
            from kernels import apply_rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)

        if self.cache is not None:
            # Remember this step's keys and values; attention below sees every slot so far.
            k_all, v_all = self.cache.update(start_pos, k.transpose(1, 2), v.transpose(1, 2))  # (B, H_kv, S, D)
        if start_pos == 0 and use_triton(self.kernels, x):
            # Training or prefill: the new tokens are all the keys there are, so the fused kernel applies.
            from kernels import flash_attention
            out = flash_attention(q, k, v, causal=True, segment_ids=segment_ids)  # (B, T, H, D)
        else:
            q = q.transpose(1, 2)  # (B, H, T, D)
            if self.cache is not None:
                k, v = k_all, v_all
            else:
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D)
            # enable_gqa lets each group of H / H_kv query heads share one K/V head without copying it.
            # softmax runs in fp32 inside SDPA, as Meta's explicit `.float()` does.
            # Without a cache (training) the keys are the queries' own tokens: causal. With one, a lone new
            # token sees every cached key, a prefill is causal. (T is looked at only with a cache: under
            # torch.compile with dynamic shapes `T > 1` is symbolic, and SDPA takes a plain bool.)
            causal = mask is None and (self.cache is None or T > 1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
            )
            out = out.transpose(1, 2)  # (B, T, H, D)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: Optional[torch.Tensor] = None  # w1 and w3 stacked, while decoding (packing.py)

    def forward(self, x):
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)  # (B, T, hidden) each
        else:
            gate, up = self.w1(x), self.w3(x)  # (B, T, hidden)
        if use_triton(self.kernels, x):
            from kernels import swiglu
            return self.w2(swiglu(gate, up))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, kernels: str = "torch"):
        super().__init__()
        self.layer_id = layer_id
        self.kernels = kernels
        self.attention = Attention(args, kernels)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, kernels)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, kernels)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, kernels)

    def forward(self, x, cos, sin, start_pos=0, mask=None, segment_ids=None):
        # Pre-norm residual blocks: the residual stream x is never normalized in place.
        if use_triton(self.kernels, x):
            return self.forward_fused(x, cos, sin, start_pos, mask, segment_ids)
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask, segment_ids)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_fused(self, x, cos, sin, start_pos=0, mask=None, segment_ids=None):
        """forward with the residual add and the norm that reads its result in one kernel: one pass over
        the residual stream instead of two."""
        from kernels import add_rms_norm
        attn = self.attention(self.attention_norm(x), cos, sin, start_pos, mask, segment_ids)
        h, normed = add_rms_norm(attn, x, self.ffn_norm.weight, self.ffn_norm.eps)  # h = attn + x
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, kernels: str = "torch"):
        super().__init__()
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.args = args
        self.kernels = kernels
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args, kernels) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, kernels)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Rotary tables are derived, not learned: recomputed by reset_rope(), never saved. Like Meta, twice
        # max_seq_len so a prompt plus its answer may run a little past the training length.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.cache_segments: Optional[torch.Tensor] = None  # (B, S) segment id of each cached key
        self.init_weights()

    # ---- initialization, kept apart from construction so a model built on the meta device can be filled later
    def reset_rope(self, device=None):
        device = device if device is not None else self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.args.head_dim, 2 * self.args.max_seq_len, self.args.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, `.bfloat16()` cast every floating buffer; the rotary tables must stay fp32
        (Meta builds them in fp32: in bf16 every angle would be off by up to 1 part in 256), so after such a
        cast they are rebuilt in fp32 wherever they now are."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.reset_rope(self.rope_cos.device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None):
        """GPT-2 style init: N(0, 0.02), with the projections into the residual stream (wo, w2) scaled by
        1/sqrt(2 * n_layers) so the stream's variance does not grow with depth."""
        self.reset_rope()
        if self.tok_embeddings.weight.is_meta:
            return
        gen = torch.Generator(device=self.tok_embeddings.weight.device)
        gen.manual_seed(0 if seed is None else seed)
        std_out = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std_out if name.endswith(("wo.weight", "w2.weight")) else 0.02, generator=gen)

    # ---- KV cache for decoding
    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None):
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        if max_seq_len > self.rope_cos.shape[0]:
            raise ValueError(f"a cache of {max_seq_len} positions exceeds the model's {self.rope_cos.shape[0]}")
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype, device)
        self.cache_segments = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_segments = None

    def forward(self, tokens, start_pos: int = 0, positions=None, segment_ids=None, labels=None, last_only=False):
        """tokens (B, T) -> logits (B, T, vocab) in fp32; or, given labels, the summed training loss.

        start_pos:   with a KV cache, the cache slot of tokens[:, 0] (tokens so far). Causality is by slot.
        positions:   (B, T) rotary positions; default start_pos + arange(T). Packed rows restart them at
                     each example; left-padded decoding shifts them per row.
        segment_ids: (B, T) ints; a token attends only to earlier tokens of its own segment (packed
                     examples, or padding kept apart from text). With a cache they are remembered per slot.
        labels:      (B, T) target ids aligned with tokens, -100 where nothing is learned: the logits at t
                     predict labels[t + 1]. Returns the loss *summed* over targets, so the caller can
                     normalize by the target count of a whole global batch.
        last_only:   logits of the last position only (B, 1, vocab): all a prefill needs, and it skips the
                     vocab-wide output layer for every other position.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=tokens.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, T, 1, D/2)
        sin = self.rope_sin[positions].unsqueeze(2)
        mask = self.attention_mask(B, T, start_pos, segment_ids, tokens.device)

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask, segment_ids)
        if labels is not None:
            return self.loss(self.norm(h)[:, :-1], labels[:, 1:])
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (B, T, vocab)

    def loss(self, h, targets):
        """Summed next-token cross-entropy of hidden states h (B, T, dim) against targets (B, T).

        Fused with the output layer and computed a chunk of tokens at a time (kernels/cross_entropy.py), so
        the (B * T, vocab) logits never exist at once: with LLaMA's 32000-word vocabulary they would be the
        largest tensor of the whole step. The logits are fp32, as in the forward above."""
        from kernels.cross_entropy import linear_cross_entropy

        # Instruction tuning learns only the responses: positions without a target (the prompt, padding)
        # need no logits at all, so they skip the output layer: half of an Alpaca batch, often more.
        keep = targets != -100  # (B, T)
        return linear_cross_entropy(h[keep], self.output.weight, targets[keep], ignore_index=-100, reduction="sum",
                                    use_triton=use_triton(self.kernels, h))

    def attention_mask(self, B, T, start_pos, segment_ids, device):
        """The boolean mask (B, 1, T, S) of the keys each query may see, or None when plain causal
        attention (SDPA's is_causal) is exactly right. With a cache, every slot's segment is recorded so
        later tokens see only keys of their own segment (segment 0 when none are given)."""
        cached = self.cache_segments is not None
        if cached:
            if B != self.cache_segments.shape[0]:
                raise ValueError(f"a batch of {B} rows does not match the KV cache's {self.cache_segments.shape[0]}")
            new_slots = self.cache_segments.narrow(1, start_pos, T)  # (B, T)
            if segment_ids is None and (start_pos == 0 or T == 1):
                # A prefill is plain causal; a single new token may see every cached slot. Both only when
                # no segments were given, i.e. no padding is in the cache.
                new_slots.zero_()
                return None
            if segment_ids is None:
                segment_ids = torch.zeros(B, T, dtype=torch.long, device=device)
            new_slots.copy_(segment_ids)
            k_seg = self.cache_segments.narrow(1, 0, start_pos + T)  # (B, S)
        elif segment_ids is None:
            return None
        else:
            k_seg = segment_ids  # (B, S = T)
        S = k_seg.shape[1]
        q_slot = torch.arange(start_pos, start_pos + T, device=device)
        causal = torch.arange(S, device=device)[None, :] <= q_slot[:, None]  # (T, S)
        same_segment = segment_ids[:, :, None] == k_seg[:, None, :]  # (B, T, S)
        return (causal & same_segment).unsqueeze(1)  # (B, 1, T, S)
