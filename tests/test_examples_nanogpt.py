"""fim_linops.examples.nanogpt: the char transformer is causal, the dataset shifts by one, the
shipped text is package data, and the Fisher machinery takes the model as it comes."""

from __future__ import annotations

import pytest
import torch

import fim_linops as fl
from fim_linops.examples.nanogpt import CharVocab, GPTConfig, NanoGPT, char_dataset, load_text


def test_shipped_text_and_dataset() -> None:
    text = load_text()
    assert 5_000 < len(text) < 20_000
    x, y, vocab = char_dataset(16, stride=8)
    assert x.shape == y.shape and x.shape[1] == 16 and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next character
    assert torch.equal(x[1, :8], x[0, 8:])  # stride 8
    assert vocab.decode(x[0]) + vocab.decode(y[0, -1:]) == text[:17]
    assert len(vocab) == len(set(text)) and vocab.stoi[vocab.chars[3]] == 3


def test_dataset_errors() -> None:
    with pytest.raises(ValueError, match="block_size"):
        char_dataset(10, text="short")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        char_dataset(2, text="abcd", vocab=CharVocab("abc"))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=10, n_head=4)


@pytest.mark.parametrize("flash", [False, True])
def test_model_is_causal_and_tied(flash: bool) -> None:
    torch.manual_seed(0)
    model = NanoGPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, flash=flash)
    assert model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, 11, (3, 8))
    out = model(ids)
    assert out.shape == (3, 8, 11)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    out2 = model(changed)
    torch.testing.assert_close(out2[:, :5], out[:, :5])
    assert not torch.allclose(out2[:, 5:], out[:, 5:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert model.generate(ids[:, :2], 4).shape == (3, 6)


def test_fisher_diag_matches_dense_on_nanogpt() -> None:
    torch.manual_seed(0)
    x, y, vocab = char_dataset(6, text="to be or not to be, that is the question")
    model = NanoGPT(vocab_size=len(vocab), block_size=6, n_layer=1, n_head=2, n_embd=8)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    dense = fl.fisher(model, data, likelihood="categorical", structure="dense").to_dense()
    diag = fl.fisher(model, data, likelihood="categorical", structure="diag").to_dense()
    torch.testing.assert_close(diag.diagonal(), dense.diagonal(), rtol=1e-4, atol=1e-7)
