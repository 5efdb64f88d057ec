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


# -- BERT (sequence and token classification) and ViT from tiny configs ---------------------------
def _bert_config(num_labels: int = 3):
    return transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
    )


def _padded_ids(n: int = 3, t: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # padding at the end of sequences 0 and 2
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _head_kfac(model, x, mask) -> torch.Tensor:
    """Float64 reference of KFAC ("expand") on the classifier head, in the public order (W, b).

    The head maps inputs h (N, T, H) to the logits, so the gradients w.r.t. its output are the
    per-position roots S of H: A = sum_{n,t} [h;1][h;1]^T / (N T), G = sum_{n,t kept} H_nt / N.
    """
    seen = {}
    hook = model.classifier.register_forward_hook(lambda m, a, o: seen.update(h=a[0], f=o))
    with torch.no_grad():
        model(**x)
    hook.remove()
    h, f = seen["h"].double(), seen["f"].double()
    h, f = h.reshape(h.shape[0], -1, h.shape[-1]), f.reshape(f.shape[0], -1, f.shape[-1])
    n, t, c = f.shape
    m = torch.ones(n, t, dtype=f.dtype) if mask is None else mask.to(f.dtype)
    p = torch.softmax(f, -1)
    hess = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # (N, T, C, C)
    g = torch.einsum("nt,ntcd->cd", m, hess) / n
    a1 = torch.cat([h, torch.ones(n, t, 1, dtype=h.dtype)], -1).reshape(n * t, -1)
    a = a1.T @ a1 / (n * t)
    k = torch.kron(g, a)  # index o*(H+1) + i over [W | b]
    hdim = h.shape[-1]
    order = [o * (hdim + 1) + i for o in range(c) for i in range(hdim)]
    order += [o * (hdim + 1) + hdim for o in range(c)]  # public order: W row-major, then b
    return k[order][:, order]


def _check_model(model, batch, lik, mask) -> None:
    """diag, an implicit (exact) product and KFAC on the head against float64 references."""
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(model, x, "categorical", mask)
    F = fl.fisher(model, [batch], lik, structure="diag")
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-8, atol=1e-10)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0))
    F = fl.fisher(model, [batch], lik, structure="implicit")
    torch.testing.assert_close(F @ v, ref @ v, rtol=1e-8, atol=1e-10)
    head = list(model.classifier.parameters())
    F = fl.fisher(model, [batch], lik, structure="kfac", params=head)
    torch.testing.assert_close(F.to_dense(), _head_kfac(model, x, mask), rtol=1e-8, atol=1e-10)


def test_bert_sequence_classification_with_padding_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config()).eval()
    ids, mask = _padded_ids()
    labels = torch.tensor([0, 2, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    _check_model(model, batch, fl.Categorical(), None)  # (N, C) logits: one term per sequence
    # the attention mask is used: without it the Fisher differs
    F = fl.fisher(model, [batch], structure="diag").diagonal()
    G = fl.fisher(model, [{"input_ids": ids, "labels": labels}], structure="diag").diagonal()
    assert (F - G).abs().max() > 1e-6 * F.abs().max()


def test_bert_token_classification_with_ignored_labels_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(_bert_config()).eval()
    ids, mask = _padded_ids()
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
    labels = labels.masked_fill(mask == 0, -100)
    labels[1, 0] = -100  # a [CLS]-like position not scored
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    _check_model(model, batch, fl.Categorical(), labels != -100)


def test_mapping_batch_without_labels_keeps_the_attention_mask_positions() -> None:
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(_bert_config()).eval()
    ids, mask = _padded_ids()
    batch = {"input_ids": ids, "attention_mask": mask}
    ref = sequence_fisher(model, batch, "categorical", mask == 1)
    F = fl.fisher(model, [batch], structure="diag")
    torch.testing.assert_close(F.diagonal(), ref.diagonal(), rtol=1e-8, atol=1e-10)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0))
    F = fl.fisher(model, [batch], structure="implicit")
    torch.testing.assert_close(F @ v, ref @ v, rtol=1e-8, atol=1e-10)


def test_vit_image_classification_matches_the_reference() -> None:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=2,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    pixels = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = {"pixel_values": pixels, "labels": torch.tensor([2, 0, 1])}
    _check_model(model, batch, fl.Categorical(), None)
