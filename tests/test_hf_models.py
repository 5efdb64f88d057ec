"""Hugging Face models from tiny configs (random weights, never a download) as they come."""

from __future__ import annotations

import pytest
import torch
from seq_models import sequence_fisher

import fim_linops as fl

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_gpt2_causal_lm_with_shifted_labels_matches_the_reference() -> None:
    model, batch = _gpt2()
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(model, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    F = fl.fisher(model, [batch], fl.Categorical(shift_labels=True), structure="diag")
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-8, atol=1e-10)


def test_lora_adapters_by_name_cost_no_base_statistics() -> None:
    peft = pytest.importorskip("peft")
    model, batch = _gpt2()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    F = fl.fisher(lora, [batch], fl.Categorical(shift_labels=True), structure="diag")
    assert F.shape[0] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(lora, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-8, atol=1e-10)
