"""``tolstoi_char_transformer``: a small decoder-only character transformer.

Not one of the paper's problems (Balles & Hennig 2018 predate it): a modern model on P4's
data (War and Peace, the same vocabulary and train/test split), for the within-batch
variance of a transformer. The architecture is GPT-2's in miniature:

- token embedding ``(V, d)`` plus a learned positional embedding, a bare ``nn.Parameter``
  of shape ``(context, d)``;
- ``layers`` pre-norm blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))``: causal multi-head
  self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`
  (``is_causal=True``) and a GELU MLP of width ``4 d``;
- a final LayerNorm and an output head *tied* to the token embedding (the same Parameter,
  applied with :func:`torch.nn.functional.linear`; no output bias).

No dropout, and no state carried between batches (each ``(B, T)`` window is a set of B
independent sequences; the model is not a ``CarriesState``). Init as GPT-2: weights and
embeddings normal with std 0.02 (the residual output projections 0.02 / sqrt(2 layers)),
zero biases, LayerNorm weight 1 and bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import TextData, synthetic_text

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``Linear(d, 3d)`` for q, k, v, one output."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, d)``; position t attends to positions ``<= t`` only."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, steps, width))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, d)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Decoder-only character model: token ids ``(B, T)`` to logits ``(B, T, V)``.

    ``T`` may be at most ``context`` (the positional embedding's length). The output head
    is the token embedding's weight (``self.embedding.weight``), used twice in one forward.
    """

    def __init__(self, vocab_size: int = 83, width: int = 128, layers: int = 4,
                 heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context = context
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.empty(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """GPT-2's init (see the module docstring)."""
        nn.init.normal_(self.embedding.weight, std=INIT_STD)
        nn.init.normal_(self.position, std=INIT_STD)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith("proj")
                std = INIT_STD / math.sqrt(2 * layers) if residual else INIT_STD
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of token ids ``(B, T)``, ``T <= context``."""
        if tokens.dim() != 2:
            raise ValueError(
                f"CharTransformer expects token ids of shape (B, T), got {tuple(tokens.shape)}")
        steps = tokens.shape[1]
        if steps > self.context:
            raise ValueError(f"a window of {steps} tokens exceeds the context of "
                             f"{self.context}; use windows of at most {self.context}.")
        x = self.embedding(tokens) + self.position[:steps]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_final(x), self.embedding.weight)  # tied output head


def synthetic_war_and_peace(seed: int) -> TextData:
    """Random text over P4's 83 symbols: four training windows and one test window of the
    default 32 x 64 batch (smoke runs; evaluation stays cheap)."""
    return synthetic_text(83, 4 * 32 * 64 + 1, 32 * 64 + 1, seed)
