"""Hugging Face decoder families from tiny configs (random weights, never a download): Llama
(RMSNorm, rotary positions, gated MLP, grouped-query attention) with a peft LoRA adapter, Qwen2,
Mistral (sliding-window attention), Phi-3, Gemma (a padded token embedding tied to the LM head)
and OPT (a position embedding subclass called with the attention mask, a padded tied embedding),
with sdpa attention, padding and shifted labels; T5 and BART with their decoder inputs from the
labels; a LoRA model set up for checkpointed training.

The RMSNorm and rotary embeddings of the Llama-like models and rotary embeddings compute in float32 whatever the model's dtype,
so their float64 references agree to float32 rounding only (rtol 1e-6); OPT and BART to 1e-8.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import SIZES, VOCAB, close, padded_batch
from seq_models import sequence_fisher

import fim_linops as fl

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=1, **SIZES)
        model = transformers.LlamaForCausalLM(cfg)
    elif name == "gemma":
        cfg = transformers.GemmaConfig(num_key_value_heads=1, head_dim=4, pad_token_id=0, **SIZES)
        model = transformers.GemmaForCausalLM(cfg)
        assert model.model.embed_tokens.padding_idx == 0
        assert model.lm_head.weight is model.model.embed_tokens.weight
    elif name == "qwen2":  # biases on q, k, v
        cfg = transformers.Qwen2Config(num_key_value_heads=1, **SIZES)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif name == "mistral":  # a sliding window shorter than the sequences
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=3, **SIZES)
        model = transformers.MistralForCausalLM(cfg)
    elif name == "phi3":  # fused qkv and gate_up projections
        cfg = transformers.Phi3Config(num_key_value_heads=1, pad_token_id=0, **SIZES)
        model = transformers.Phi3ForCausalLM(cfg)
    else:
        cfg = transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            ffn_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=8,
            pad_token_id=0,
        )
        model = transformers.OPTForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize(
    ("name", "rtol"),
    [
        ("llama", 1e-6),
        ("qwen2", 1e-6),
        ("mistral", 1e-6),
        ("phi3", 1e-6),
        ("gemma", 1e-6),
        ("opt", 1e-8),
    ],
)
def test_decoder_fisher_and_products_match_the_reference(name, rtol):
    model, batch = _model(name), padded_batch()
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(model, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    lik = fl.Categorical(shift_labels=True)
    close(fl.fisher(model, [batch], lik, structure="diag").diagonal(), ref.diagonal(), rtol)
    v = torch.randn(ref.shape[0], 2, generator=torch.Generator().manual_seed(1))
    implicit = fl.fisher(model, [batch], lik, structure="implicit")
    close(implicit @ v[:, :1], ref @ v[:, :1], rtol)  # forward-mode dual numbers
    close(implicit @ v, ref @ v, rtol)  # jvp under vmap
    # KFAC builds with every layer (RMSNorm, rotary attention, the padded tied embedding) and
    # its exact blocks (embeddings, norms) hold the reference's diagonal there
    kfac = fl.fisher(model, [batch], lik, structure="kfac")
    assert kfac.shape == ref.shape
    assert torch.isfinite(kfac @ v).all()


def test_llama_lora_adapters_match_the_reference():
    peft = pytest.importorskip("peft")
    model, batch = _model("llama"), padded_batch()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all("lora_" in n for n in names)
    for n, p in lora.named_parameters():
        if "lora_B" in n:  # zero at initialisation, which would leave lora_A without gradients
            torch.nn.init.normal_(p)
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(lora, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    assert ref.shape[0] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    lik = fl.Categorical(shift_labels=True)
    for structure in ("dense", "block_diag"):
        F = fl.fisher(lora, [batch], lik, structure=structure)
        close(F.to_dense(), _blocks(ref, lora, structure), 1e-6)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(2))
    close(fl.fisher(lora, [batch], lik, structure="implicit") @ v, ref @ v, 1e-6)


def _blocks(ref: torch.Tensor, model: torch.nn.Module, structure: str) -> torch.Tensor:
    """``ref`` itself (dense) or its diagonal blocks, one per trainable parameter (block_diag)."""
    if structure == "dense":
        return ref
    out, start = torch.zeros_like(ref), 0
    for p in (p for p in model.parameters() if p.requires_grad):
        s = slice(start, start + p.numel())
        out[s, s] = ref[s, s]
        start += p.numel()
    return out


def _seq2seq(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "t5":
        cfg = transformers.T5Config(
            vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
            decoder_start_token_id=0,
        )  # fmt: skip
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.BartConfig(
            vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
            decoder_ffn_dim=16, max_position_embeddings=32,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(cfg)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize(("name", "rtol"), [("t5", 1e-6), ("bart", 1e-8)])
def test_encoder_decoder_batches_get_their_decoder_inputs_from_the_labels(name, rtol):
    """An encoder-decoder model called without labels has no decoder input: the batch's labels
    give it, shifted right as the model itself does (teacher forcing), and score the outputs."""
    model, batch = _seq2seq(name), padded_batch()
    labels = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    labels[1, -1] = -100
    batch["labels"] = labels
    x = {k: v for k, v in batch.items() if k != "labels"}
    x["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    assert x["decoder_input_ids"].shape == labels.shape
    ref = sequence_fisher(model, x, "categorical", labels != -100)
    close(fl.fisher(model, [batch], structure="diag").diagonal(), ref.diagonal(), rtol)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1))
    close(fl.fisher(model, [batch], structure="implicit") @ v, ref @ v, rtol)
    # given decoder inputs are used as they are
    F = fl.fisher(model, [{**batch, "decoder_input_ids": x["decoder_input_ids"]}], structure="diag")
    close(F.diagonal(), ref.diagonal(), rtol)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_training_setup_gives_the_fisher_and_is_left_as_found(reentrant):
    """A model set up for checkpointed LoRA training (train mode, gradient checkpointing, and the
    input-embedding hook that calls requires_grad_): the Fisher as without checkpointing, and
    the checkpointing flags and hooks left on."""
    peft = pytest.importorskip("peft")
    model, batch = _model("llama"), padded_batch()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    x = {k: v for k, v in batch.items() if k != "labels"}
    ref = sequence_fisher(lora, x, "categorical", batch["labels"][:, 1:] != -100, shift=True)
    lora.train()  # dropout is 0 in these configs: the same function as in eval mode
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert flags
    hooks = dict(model.get_input_embeddings()._forward_hooks)
    lik = fl.Categorical(shift_labels=True)
    close(fl.fisher(lora, [batch], lik, structure="diag").diagonal(), ref.diagonal(), 1e-6)
    F = fl.fisher(lora, [batch], lik, structure="block_diag")
    close(F.to_dense(), _blocks(ref, lora, "block_diag"), 1e-6)
    v = torch.randn(ref.shape[0], 2, generator=torch.Generator().manual_seed(2))
    implicit = fl.fisher(lora, [batch], lik, structure="implicit")
    close(implicit @ v[:, :1], ref @ v[:, :1], 1e-6)
    close(implicit @ v, ref @ v, 1e-6)
    assert all(m.gradient_checkpointing is True for m in flags)
    assert dict(model.get_input_embeddings()._forward_hooks) == hooks
    assert lora.training


def test_whisper_shifts_its_labels_as_its_own_forward_does():
    """An encoder-decoder without ``prepare_decoder_input_ids_from_labels`` (Whisper): the
    decoder inputs are the labels shifted right behind the start token, the same as the model
    makes when called with labels (same logits), and the Fisher equals the reference."""
    from fim_linops.data import decoder_inputs

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=4, d_model=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_source_positions=8, max_target_positions=16, pad_token_id=0,
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    assert not hasattr(model, "prepare_decoder_input_ids_from_labels")
    features = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    labels[1, -1] = -100
    x = decoder_inputs(model, {"input_features": features}, labels)
    with torch.no_grad():
        close(model(**x).logits, model(input_features=features, labels=labels).logits, 1e-12)
    ref = sequence_fisher(model, x, "categorical", labels != -100)
    batch = {"input_features": features, "labels": labels}
    close(fl.fisher(model, [batch], structure="diag").diagonal(), ref.diagonal(), 1e-8)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(1))
    close(fl.fisher(model, [batch], structure="implicit") @ v, ref @ v, 1e-8)
