"""Attention as PyTorch and Hugging Face run it: scaled_dot_product_attention (whose fused CPU
kernel has no forward-mode derivative), nn.MultiheadAttention and nn.TransformerEncoder (whose
eval-mode C++ fast path has none either). Every forward-mode path (implicit Fisher products,
fl.jacobian, the NTK, the low-rank Laplace predictive, FishLeg's Fisher-vector product) and the
per-example gradients under vmap against float64 references: per-example Jacobians by
torch.func.jacrev under the math kernel, F = 1/N sum_n J_n^T H_n J_n. Hugging Face BERT (with a
padding mask), GPT-2 and ViT from tiny configs with random weights (never a download), each with
attn_implementation="sdpa" and "eager"."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from reference import exact_fisher, output_hessians, per_example_jacobians
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fim_linops as fl
from fim_linops.engine.attention import math_attention
from fim_linops.fishleg import fisher_vector_product
from fim_linops.likelihoods import get_likelihood

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 references

N, C = 3, 3  # examples, classes


@contextmanager
def reference_math() -> Iterator[None]:
    """The references' own switch to the math kernel (independent of fim_linops')."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


# -- models ---------------------------------------------------------------------------------------
class Logits(nn.Module):
    """A Hugging Face model's ``.logits`` (N, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model(*args, **kwargs).logits


class Encoder(nn.Module):
    """nn.TransformerEncoder (batch_first, eval: its fast path) with a mean-pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ..."
            warnings.simplefilter("ignore", UserWarning)
            self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(8, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention (batch_first, no weights returned: scaled_dot_product_attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class CausalSDPA(nn.Module):
    """nanoGPT's attention: F.scaled_dot_product_attention(is_causal=True) on Linear q, k, v."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(h).split(8, -1))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head((h + self.proj(a.transpose(1, 2).flatten(2)))[:, -1])


def _bert(impl: str) -> tuple[nn.Module, Any]:
    tr = pytest.importorskip("transformers")
    cfg = tr.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=C,
        attn_implementation=impl,
    )
    ids = torch.randint(1, 20, (N, 5))
    mask = torch.ones(N, 5, dtype=torch.long)
    mask[1, 3:] = 0  # the second sequence is padded
    return Logits(tr.BertForSequenceClassification(cfg)), {"input_ids": ids, "attention_mask": mask}


def _gpt2(impl: str) -> tuple[nn.Module, Any]:
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(
        vocab_size=20,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=8,
        num_labels=C,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation=impl,
    )
    return Logits(tr.GPT2ForSequenceClassification(cfg)), torch.randint(1, 20, (N, 5))


def _vit(impl: str) -> tuple[nn.Module, Any]:
    tr = pytest.importorskip("transformers")
    cfg = tr.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=C,
        attn_implementation=impl,
    )
    return Logits(tr.ViTForImageClassification(cfg)), torch.randn(N, 1, 8, 8)


MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "bert-sdpa": lambda: _bert("sdpa"),
    "bert-eager": lambda: _bert("eager"),
    "gpt2-sdpa": lambda: _gpt2("sdpa"),
    "gpt2-eager": lambda: _gpt2("eager"),
    "vit-sdpa": lambda: _vit("sdpa"),
    "vit-eager": lambda: _vit("eager"),
    "transformer-encoder": lambda: (Encoder(), torch.randn(N, 5, 8)),
    "multihead-attention": lambda: (Attention(), torch.randn(N, 5, 8)),
    "causal-sdpa": lambda: (CausalSDPA(), torch.randint(0, 11, (N, 5))),
}


def build(name: str) -> tuple[nn.Module, Any, Tensor]:
    """A seeded float64 model in eval mode, its inputs and labels."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    return model.double().eval(), x, torch.randint(0, C, (N,))


def reference(model: nn.Module, x: Any) -> tuple[Tensor, Tensor]:
    """Per-example Jacobians (N*C, P) and the exact Fisher (P, P), under the math kernel; by
    plain autograd per example for Hugging Face's text models (their mask and padding code
    branches on the inputs' values, which vmap over the examples cannot)."""
    loop = isinstance(model, Logits) and "ViT" not in type(model.model).__name__
    with reference_math(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # transformers' config notes
        j = per_example_jacobians(model, x, loop=loop)
        return j.reshape(-1, j.shape[-1]), exact_fisher(model, x, "categorical", loop=loop)


def close(a: Tensor, b: Tensor) -> None:
    """Equal to 1e-10 relative to the reference's norm (entries that cancel to near zero carry
    the rounding of their larger terms)."""
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    assert float((a - b).norm()) <= 1e-10 * float(b.norm()), float((a - b).norm() / b.norm())


def numel(model: nn.Module) -> int:
    return fl.ParamLayout.from_model(model).numel


def fast_path_and_kernels() -> tuple[bool, ...]:
    """The global switches that fim_linops flips inside its forwards."""
    b = torch.backends.cuda
    return (
        torch.backends.mha.get_fastpath_enabled(),
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
    )


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_implicit_fisher_products_and_diagonal_equal_the_reference(name):
    model, x, y = build(name)
    _, F = reference(model, x)
    op = fl.fisher(model, (x, y), structure="implicit")
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(numel(model), generator=gen)
    V = torch.randn(numel(model), 3, generator=gen)
    close(op @ v, F @ v)  # one column: forward-mode dual numbers
    close(op @ V, F @ V)  # several: jvp under vmap
    close(op.diagonal(), F.diagonal())  # per-example gradients under vmap
    close(fl.quad(op, v), v @ F @ v)


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_and_ntk_equal_the_reference(name):
    model, x, _ = build(name)
    J, _ = reference(model, x)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(numel(model), 2, generator=gen)
    U = torch.randn(N * C, 2, generator=gen)
    jac = fl.jacobian(model, x)
    close(jac @ V, J @ V)
    close(jac.T @ U, J.T @ U)
    close(fl.ntk(model, x) @ U, J @ (J.T @ U))
    close(fl.ntk(model, x, structure="dense").to_dense(), J @ J.T)


@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2-sdpa", "transformer-encoder"])
def test_fishleg_fisher_vector_product_equals_the_reference(name):
    model, x, _ = build(name)
    _, F = reference(model, x)
    layout = fl.ParamLayout.from_model(model)
    w = torch.randn(layout.numel, generator=torch.Generator().manual_seed(3))
    fw = fisher_vector_product(model, get_likelihood("categorical"), x, layout.unflatten(w))
    close(layout.flatten(fw), F @ w)


@pytest.mark.parametrize("name", ["gpt2-sdpa", "multihead-attention"])
def test_lowrank_laplace_predictive_equals_j_sigma_jt(name):
    model, x, y = build(name)
    J, _ = reference(model, x)
    la = fl.laplace.Laplace(model, (x, y), "categorical", structure="lowrank", rank=4)
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    _, joint = la.predictive(x, joint=True)
    torch.testing.assert_close(joint, J @ sigma @ J.T, rtol=1e-7, atol=1e-10)


def test_references_agree_across_hugging_face_attention_implementations():
    """The same weights under "sdpa" and "eager" give the same Fisher (the reference is not
    blind to the attention implementation)."""
    sdpa, x, _ = build("gpt2-sdpa")
    eager, _, _ = build("gpt2-eager")
    eager.load_state_dict(sdpa.state_dict())
    close(reference(sdpa, x)[1], reference(eager, x)[1])
    lik = get_likelihood("categorical")
    with torch.no_grad():
        assert output_hessians(lik, sdpa(x)).shape == (N, C, C)


def test_switches_and_model_are_left_as_found():
    model, x, y = build("transformer-encoder")
    before = fast_path_and_kernels()
    op = fl.fisher(model, (x, y), structure="implicit")
    op @ torch.ones(numel(model))
    fl.jacobian(model, x) @ torch.ones(numel(model))
    assert fast_path_and_kernels() == before
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_math_attention_restores_the_switches_when_an_exception_flies():
    torch.backends.mha.set_fastpath_enabled(False)  # a user's own setting survives the block
    try:
        before = fast_path_and_kernels()
        with pytest.raises(RuntimeError, match="inside"), math_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
            raise RuntimeError("inside")
        assert fast_path_and_kernels() == before
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with math_attention():
        pass
    assert torch.backends.mha.get_fastpath_enabled()


def test_fast_path_and_fused_kernel_really_have_no_forward_mode():
    """The failure the math kernel works around (if torch adds these formulas, the switch is no
    longer needed; this test then says so)."""
    model, x, _ = build("transformer-encoder")
    p = dict(model.named_parameters())
    t = {k: torch.ones_like(v) for k, v in p.items()}

    def f(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, params, (x,))

    with torch.no_grad(), pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(f, (p,), (t,))
