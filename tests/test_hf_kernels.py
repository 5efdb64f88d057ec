"""Hugging Face kernels without a forward-mode derivative, from tiny configs (random weights,
never a download), against float64 references: Mixtral with its default grouped_mm experts and
Llama with flex attention (the engine's transformed forwards run their eager implementations),
and Qwen2-MoE (shared expert). The experts' 3-d parameters have no layer rule and the router sees
the tokens flattened (N*T, D): both go through torch.func.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import SIZES, close, padded_batch
from seq_models import sequence_fisher

import fim_linops as fl

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

KV_SIZES = {**SIZES, "num_key_value_heads": 1}


def _eager64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy with eager experts (grouped_mm takes no float64): the reference's model."""
    twin = copy.deepcopy(model).double()
    twin.config._experts_implementation = "eager"
    return twin


def test_mixtral_grouped_mm_products_and_jacobian_match_the_reference():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(num_local_experts=3, num_experts_per_tok=2, **KV_SIZES)
    model = transformers.MixtralForCausalLM(cfg).eval()  # float32: grouped_mm's dtypes
    assert model.config._experts_implementation == "grouped_mm"
    batch = padded_batch()
    x = {k: v for k, v in batch.items() if k != "labels"}
    kept = batch["labels"][:, 1:] != -100
    ref = sequence_fisher(_eager64(model), x, "categorical", kept, shift=True)
    lik = fl.Categorical(shift_labels=True)
    v = torch.randn(
        ref.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    implicit = fl.fisher(model, [batch], lik, structure="implicit")
    close(implicit @ v[:, :1].float(), ref @ v[:, :1], 1e-5)
    close(implicit @ v.float(), ref @ v, 1e-5)
    close(fl.fisher(model, [batch], lik, structure="diag").diagonal(), ref.diagonal(), 1e-5)
    jac = fl.jacobian(model, x)
    assert torch.isfinite(jac @ v[:, :1].float()).all()
    assert model.config._experts_implementation == "grouped_mm"  # put back


@pytest.mark.usefixtures("float64_default")
def test_qwen2_moe_with_a_shared_expert_matches_the_reference():
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        **KV_SIZES,
    )
    cfg._experts_implementation = "eager"
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    batch = padded_batch()
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(model, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    lik = fl.Categorical(shift_labels=True)
    close(fl.fisher(model, [batch], lik, structure="diag").diagonal(), ref.diagonal(), 1e-6)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1))
    close(fl.fisher(model, [batch], lik, structure="implicit") @ v, ref @ v, 1e-6)
    # KFAC: the experts' 3-d parameters have no Kronecker rule, so their blocks are exact
    kfac = fl.fisher(model, [batch], lik, structure="kfac")
    start, exact = 0, []
    for name, p in model.named_parameters():
        if ".experts." in name:
            exact.extend(range(start, start + p.numel()))
        start += p.numel()
    assert exact
    close(kfac.diagonal()[exact], ref.diagonal()[exact], 1e-6)


def test_flex_attention_products_use_the_eager_kernel_and_match_the_reference():
    """Flex attention has no forward-mode derivative (and no backward on CPU at all): the
    implicit product runs eager attention, and the model keeps its choice."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**KV_SIZES)).eval()
    model.config._attn_implementation = "flex_attention"
    batch = padded_batch()
    x = {k: v for k, v in batch.items() if k != "labels"}
    twin = copy.deepcopy(model).double()
    twin.config._attn_implementation = "eager"
    ref = sequence_fisher(twin, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    v = torch.randn(
        ref.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    implicit = fl.fisher(model, [batch], fl.Categorical(shift_labels=True), structure="implicit")
    close(implicit @ v[:, :1].float(), ref @ v[:, :1], 1e-5)
    close(implicit @ v.float(), ref @ v, 1e-5)
    assert model.config._attn_implementation == "flex_attention"


def test_kernels_and_checkpointing_are_put_back_when_the_forward_raises():
    """Inside the transformed forward the kernels are eager and checkpointing is off; an
    exception leaves the model's choices and flags as they were."""
    from fim_linops.engine.forward_mode import transformed_forward

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(num_local_experts=3, num_experts_per_tok=2, **KV_SIZES)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.config._attn_implementation = "flex_attention"
    model.gradient_checkpointing_enable()
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert flags
    with pytest.raises(RuntimeError, match="inside"), transformed_forward(model):
        assert model.config._attn_implementation == "eager"
        assert model.config._experts_implementation == "eager"
        assert not any(m.gradient_checkpointing for m in flags)
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "flex_attention"
    assert model.config._experts_implementation == "grouped_mm"
    assert all(m.gradient_checkpointing is True for m in flags)
