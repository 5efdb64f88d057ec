r"""A nanoGPT-style character-level transformer and a character dataset over shipped text.

The model follows Karpathy's nanoGPT (``model.py``) without dropout: token and position
embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention from one ``c_attn``
``nn.Linear`` giving Q, K and V, then an ``nn.Linear`` output projection; an MLP
``Linear(d, 4d) -> GELU -> Linear(4d, d)``), a final LayerNorm and an LM head (tied to the token
embedding when ``tie_weights``). Input (N, T) integer token ids with T <= ``block_size``, output
(N, T, V) logits; position t sees tokens 0..t only.

:func:`char_dataset` cuts the text shipped in :mod:`fim_linops.assets` (or any string) into
windows: inputs[n, t] = ids[s_n + t], labels[n, t] = ids[s_n + t + 1] (the next character), so
``fl.Categorical()`` (no ``shift_labels``) scores the logits at t against the character at t + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TEXT_RESOURCE = "tiny_text.txt"


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`NanoGPT` (defaults: the benchmark's 4 x 128 model with 4 heads).

    ``flash``: attention by ``F.scaled_dot_product_attention(is_causal=True)`` (nanoGPT's fast
    path) instead of the written-out softmax(Q K^T / sqrt(e) + causal mask) V.
    """

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True
    tie_weights: bool = True
    flash: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; (N, T, d) -> (N, T, d)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.flash = config.flash
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        # n: sequence, h: head, t/s: query/key position, e: feature within a head (d = h * e)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (n, h, t, s)
            causal: Tensor = self.causal[:t, :t]  # type: ignore[index]
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = att @ v  # (n, h, t, e)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d), applied at every position."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT-style language model: (N, T) token ids -> (N, T, vocab_size) next-token logits.

    Weights are initialised as in nanoGPT (normal, std 0.02; residual output projections std
    0.02 / sqrt(2 n_layer); zero biases) from the global torch generator: seed it first.
    """

    def __init__(self, config: GPTConfig | None = None, **sizes: int | bool) -> None:
        super().__init__()
        if config is None:
            config = GPTConfig(**sizes)  # type: ignore[arg-type]
        elif sizes:
            raise TypeError("NanoGPT: pass either a GPTConfig or keyword sizes, not both")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"NanoGPT takes (N, T) token ids, got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"NanoGPT: sequence length {t} exceeds block_size {self.config.block_size}"
            )
        # position ids (N, T), examples first like the token ids (nanoGPT passes a shared (T,)
        # row; fim_linops takes that too, through torch.func and with a warning)
        pos = torch.arange(t, device=idx.device).expand(idx.shape[0], t)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0) -> Tensor:
        """Sample ``max_new_tokens`` tokens after the (N, T0) prompt ``idx``; (N, T0 + new)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1), num_samples=1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


@dataclass(frozen=True)
class CharVocab:
    """Character <-> id mapping: id i is ``chars[i]`` (sorted distinct characters)."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> Tensor:
        """(len(text),) int64 ids; a character outside the vocabulary raises ValueError."""
        stoi = self.stoi
        missing = sorted(set(text) - stoi.keys())
        if missing:
            raise ValueError(f"CharVocab.encode: characters not in the vocabulary: {missing!r}")
        return torch.tensor([stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        """The string of a 1-D tensor (or list) of ids."""
        return "".join(self.chars[int(i)] for i in ids)


def load_text() -> str:
    """The public-domain text shipped as ``fim_linops/assets/tiny_text.txt`` (about 11 KB)."""
    return files("fim_linops.assets").joinpath(TEXT_RESOURCE).read_text(encoding="utf-8")


def char_dataset(
    block_size: int = 64,
    *,
    stride: int | None = None,
    text: str | None = None,
    vocab: CharVocab | None = None,
) -> tuple[Tensor, Tensor, CharVocab]:
    """Next-character windows of ``text`` (default: :func:`load_text`).

    Returns ``(inputs, labels, vocab)``: int64 (N, block_size) tensors with
    inputs[n, t] = ids[n * stride + t] and labels[n, t] = ids[n * stride + t + 1], N the number of
    windows that fit; ``stride`` defaults to ``block_size`` (windows that do not overlap).
    ``vocab`` defaults to the sorted distinct characters of the text.
    """
    text = load_text() if text is None else text
    stride = block_size if stride is None else stride
    if block_size < 1 or stride < 1:
        raise ValueError("char_dataset: block_size and stride must be positive integers")
    vocab = CharVocab.from_text(text) if vocab is None else vocab
    ids = vocab.encode(text)
    if ids.numel() < block_size + 1:
        raise ValueError(
            f"char_dataset: the text has {ids.numel()} characters, fewer than block_size + 1"
        )
    windows = ids.unfold(0, block_size + 1, stride)  # (N, block_size + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), vocab


__all__ = [
    "GPTConfig",
    "NanoGPT",
    "CharVocab",
    "load_text",
    "char_dataset",
]
