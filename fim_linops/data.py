"""Data handling: one (x, y) batch, an iterable of batches or a DataLoader -> validated batches on
the target device and dtype."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from fim_linops.tensor_batches import fast_batches


class EmptyData(ValueError):
    """The data held no batch with an example (a ValueError: the message says what to pass)."""


def _looks_like_one_batch(data: Any) -> bool:
    """An (x, y) pair: y a tensor with a leading dim, x a tensor/dict/tuple of tensors of that size."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    x, y = data
    if not isinstance(y, Tensor) and isinstance(x, Tensor) and hasattr(y, "__len__"):
        try:  # labels as a numpy array or a list, next to a tensor input
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            return False
    if not isinstance(y, Tensor) or y.ndim == 0:
        return False
    if isinstance(x, (tuple, list)) and not all(isinstance(t, Tensor) for t in x):
        return False
    if not isinstance(x, (Tensor, Mapping, tuple, list)):
        return False
    try:
        return batch_size(x) == y.shape[0]
    except (TypeError, ValueError):
        return False


def _is_mapping_batch(data: Any) -> bool:
    """One mapping batch ({"input_ids": ..., "attention_mask": ..., "labels": ...})."""
    return isinstance(data, Mapping) and any(isinstance(v, Tensor) for v in data.values())


def split_mapping(batch: Mapping, model: Any = None) -> tuple[dict, Any]:
    """A mapping batch -> (the model's keyword inputs: every key but "labels", the labels or
    None). Without labels, the engine keeps the positions where ``attention_mask`` is non-zero.
    With labels, an encoder-decoder ``model`` also gets its decoder inputs
    (:func:`decoder_inputs`)."""
    x = {k: v for k, v in batch.items() if k != "labels"}
    if not x:
        raise ValueError("a mapping batch needs model inputs besides 'labels'")
    labels = batch.get("labels")
    return decoder_inputs(model, x, labels), labels


def decoder_inputs(model: Any, x: dict, labels: Any) -> dict:
    """``x`` with the ``decoder_input_ids`` an encoder-decoder Hugging Face model (T5, BART,
    Marian, Pegasus, ...) makes from ``labels`` when it is called with them: the labels shifted
    right behind the decoder start token (teacher forcing), by the model's own
    ``prepare_decoder_input_ids_from_labels``, or, for an encoder-decoder config without it
    (Whisper), as Hugging Face's ``shift_tokens_right``. The Fisher calls the model without the labels
    (the likelihood scores them), so without this the decoder would have no input. ``x`` as it
    is for other models, or when it has decoder inputs already."""
    if model is None or not isinstance(labels, Tensor):
        return x
    if "decoder_input_ids" in x or "decoder_inputs_embeds" in x:
        return x
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return {**x, "decoder_input_ids": prepare(labels=labels)}
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if not getattr(config, "is_encoder_decoder", False) or start is None or pad is None:
        return x
    # Whisper and the others that shift inside their forward: [start, labels[:, :-1]], with
    # ignored labels (-100) read as padding, as Hugging Face's shift_tokens_right does
    ids = labels.new_full(labels.shape, int(pad))
    ids[:, 1:] = labels[:, :-1]
    ids[:, 0] = int(start)
    return {**x, "decoder_input_ids": ids.masked_fill(ids == -100, int(pad))}


def move(x: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively in tuples/lists/dicts) to the device; cast floating ones to dtype."""
    if isinstance(x, Tensor):
        if x.is_floating_point() and dtype is not None:
            return x.to(device=device, dtype=dtype)
        return x.to(device=device) if device is not None else x
    if isinstance(x, Mapping):
        return {k: move(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(move(v, device, dtype) for v in x)
    return x


def slice_examples(x: Any, lo: int, hi: int) -> Any:
    """Examples lo:hi of a model input (every tensor of a tensor / tuple / dict input)."""
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) else t, x)


#: examples of the probe of ``Engine(..., probe=...)`` (engine/checks.py): a call shared by all
#: examples has first dim 1 for any N, which only a forward of two or more examples can show
PROBE_EXAMPLES = 2


def first_examples(x: Any) -> Any:
    """The first :data:`PROBE_EXAMPLES` examples of a model input (fewer if it has fewer), for
    the structural checks of ``Engine(..., probe=...)`` (engine/checks.py) where the caller holds
    the inputs."""
    return slice_examples(x, 0, PROBE_EXAMPLES)


def batch_size(x: Any) -> int:
    """Number of examples in an input (the leading dim of its first tensor)."""
    if isinstance(x, Tensor):
        if x.ndim == 0:
            raise ValueError("model inputs must have a leading batch dimension, got a 0-d tensor")
        return x.shape[0]
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor):
                return batch_size(v)
    if isinstance(x, (tuple, list)):
        for v in x:
            if isinstance(v, Tensor):
                return batch_size(v)
    raise TypeError(
        f"model inputs must be a tensor or a tuple/list/dict of tensors, got {type(x).__name__}"
    )


def call_model(model: torch.nn.Module, x: Any) -> Tensor:
    """model(x) for a tensor input, model(**x) for a dict input (its keys are the forward's
    keyword arguments, as a Hugging Face model takes ``input_ids``, ``attention_mask``), and
    model(*x) for a tuple/list input (positional arguments)."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def check_finite(t: Tensor, what: str, index: int) -> None:
    """Raise if a floating tensor holds NaN or inf (one device sync per batch). A NaN or inf
    entry makes the sum non-finite, so a finite sum clears the tensor with one reduction; only a
    non-finite sum (possibly an overflow of finite entries) is checked entry by entry."""
    if (
        t.is_floating_point()
        and not math.isfinite(float(t.sum()))
        and not bool(torch.isfinite(t).all())
    ):
        raise ValueError(
            f"{what} of batch {index} contains NaN or inf; clean the data or the model"
        )


def _check_finite_any(x: Any, what: str, index: int) -> None:
    if isinstance(x, Tensor):
        check_finite(x, what, index)
    elif isinstance(x, Mapping):
        for v in x.values():
            _check_finite_any(v, what, index)
    elif isinstance(x, (tuple, list)):
        for v in x:
            _check_finite_any(v, what, index)


def _check_pair_sizes(data: Any) -> None:
    """Raise for what is meant as one (x, y) batch but whose x and y disagree on the number of
    examples (else it would be taken for a list of two batches, and the error would be about
    its first element)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return
    x, y = data
    if not isinstance(x, (Tensor, Mapping)) or not isinstance(y, Tensor):
        return
    try:
        n = batch_size(x)
    except (TypeError, ValueError):
        return
    if y.ndim == 0:
        raise ValueError(
            f"data is an (x, y) pair whose y is a 0-d tensor; y needs one label per example: a "
            f"leading dim of x's size {n}"
        )
    if n == y.shape[0]:
        return
    first = x if isinstance(x, Tensor) else next(v for v in x.values() if isinstance(v, Tensor))
    where = "x" if isinstance(x, Tensor) else f"x[{next(k for k in x if x[k] is first)!r}]"
    raise ValueError(
        f"data is an (x, y) pair whose x has {n} examples ({where} of shape "
        f"{tuple(first.shape)}) but y has {y.shape[0]} (shape {tuple(y.shape)}); x and y need "
        "the same leading size (one label per example)"
    )


def iter_batches(
    data: Any,
    device: torch.device | None,
    dtype: torch.dtype | None,
    need_targets: bool = True,
    model: Any = None,
) -> Iterator[tuple[Any, Tensor | None]]:
    """Yield (x, y) batches moved to device/dtype, validated. ``data`` is one (x, y) batch, an
    iterable of (x, y) batches (a DataLoader), or, when ``need_targets`` is False, also x alone.
    ``model``: the model the batches are for (mapping batches of encoder-decoder models get their
    decoder inputs from the labels, :func:`decoder_inputs`)."""
    if data is None:
        raise ValueError(
            "data is None; pass a DataLoader, an iterable of (x, y) batches or one (x, y) batch"
        )
    if isinstance(data, Tensor):
        if need_targets:
            raise TypeError(
                "data is a single tensor; pass (x, y) batches (e.g. a DataLoader over a "
                "TensorDataset(x, y)) or one (x, y) tuple"
            )
        batches: Iterable = [(data, None)]
    elif _looks_like_one_batch(data) or _is_mapping_batch(data):
        batches = [data]
    elif need_targets:
        _check_pair_sizes(data)
        batches = fast_batches(data)
    else:
        batches = fast_batches(data)  # a DataLoader over a TensorDataset: no per-example collation
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(
            f"data must be a DataLoader, an iterable of (x, y) batches or one (x, y) batch, got "
            f"{type(data).__name__}"
        ) from None
    count = 0
    x: Any
    y: Any
    for index, batch in enumerate(iterator):
        if isinstance(batch, Mapping):  # Hugging Face: the model takes every key but the labels
            x, y = split_mapping(batch, model)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        elif isinstance(batch, (tuple, list)) and len(batch) == 1 and not need_targets:
            x, y = batch[0], None
        elif isinstance(batch, Tensor) and not need_targets:
            x, y = batch, None
        else:
            raise TypeError(
                f"batch {index} is a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + "; each batch must be an (x, y) pair (x a tensor or tuple/dict of tensors)"
            )
        x = move(x, device, dtype)
        n = batch_size(x)
        if n == 0:
            continue
        _check_finite_any(x, "the input", index)
        if y is not None:
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
            y = y.to(device) if device is not None else y
            if y.ndim == 0 or y.shape[0] != n:
                raise ValueError(
                    f"batch {index}: targets have shape {tuple(y.shape)} but the input has {n} "
                    "examples; y needs a leading dim of the same size"
                )
        count += 1
        yield x, y
    if count == 0:
        if iterator is batches:  # a generator or iterator: iter() returns itself, one pass only
            raise EmptyData(
                f"data is empty: the {type(data).__name__} yielded no batch. It is a one-shot "
                "iterator, and this computation passes over the data more than once (ekfac, "
                "kron_sum, per-layer mixes, fl.compare, ...) or it was consumed before: pass a "
                "list of batches or a DataLoader, which can be iterated again"
            )
        raise EmptyData("data is empty: no (x, y) batch with at least one example was found")
