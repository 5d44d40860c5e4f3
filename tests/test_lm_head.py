"""A model patched by ``add_weighted_lm_head`` copies and serialises as a patched model of itself.

``copy.deepcopy`` (TRL-style reference models), ``pickle`` and ``torch.save`` must neither run the original's
modules from the copy nor drop the patch (a loaded model that silently returns ``loss=None``).
"""
from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce import reference_linear_cross_entropy
from fused_wce.trl_integration.trainer.lm_head import WeightedLossInputs, add_weighted_lm_head


def _model(tokenizer):
    return tiny_model("llama", tokenizer, seed=1, tie_word_embeddings=False)


def _batch(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=generator)
    target = input_ids[:, 1:].clone()
    target[0, :4] = -100
    weight = (torch.rand(target.shape, generator=generator) + 0.25) * (target != -100)
    return input_ids, WeightedLossInputs(target, weight, weight.sum() * 1.5)


def _reference_loss(plain_model, input_ids, inputs: WeightedLossInputs) -> torch.Tensor:
    """Float64 loss from an unpatched model's hidden states and head (the logits materialised)."""
    with torch.no_grad():
        hidden = plain_model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    return reference_linear_cross_entropy(hidden.flatten(0, 1), plain_model.lm_head.weight, inputs.target.flatten(),
                                          inputs.weight.flatten(), normalizer=inputs.normalizer)


def test_deepcopy_runs_its_own_weights(tokenizer):
    model = _model(tokenizer)
    add_weighted_lm_head(model)
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    plain = _model(tokenizer)  # unpatched, loaded with the copy's changed weights
    plain.load_state_dict(twin.state_dict())
    input_ids, inputs = _batch(model.config.vocab_size)

    logits = twin(input_ids=input_ids).logits
    torch.testing.assert_close(logits, plain(input_ids=input_ids).logits, rtol=0, atol=0)
    assert not torch.allclose(logits, model(input_ids=input_ids).logits)
    generated = twin.generate(input_ids[:1], attention_mask=torch.ones_like(input_ids[:1]), max_new_tokens=8,
                              do_sample=False)
    expected = plain.generate(input_ids[:1], attention_mask=torch.ones_like(input_ids[:1]), max_new_tokens=8,
                              do_sample=False)
    assert torch.equal(generated, expected)

    loss = twin(input_ids=input_ids, fused_wce_loss=inputs).loss
    reference = _reference_loss(plain, input_ids, inputs)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert abs(model(input_ids=input_ids, fused_wce_loss=inputs).loss.item() - reference.item()) > 1e-3
    loss.backward()
    assert twin.lm_head.weight.grad is not None and twin.model.embed_tokens.weight.grad is not None
    assert all(parameter.grad is None for parameter in model.parameters())


def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _torch_saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("round_trip", [_pickled, _torch_saved], ids=["pickle", "torch_save"])
def test_serialised_model_keeps_the_patch(tokenizer, round_trip):
    model = _model(tokenizer)
    add_weighted_lm_head(model, label_smoothing=0.1)
    input_ids, inputs = _batch(model.config.vocab_size, seed=3)
    loaded = round_trip(model)

    loss = loaded(input_ids=input_ids, fused_wce_loss=inputs).loss
    assert loss is not None
    assert torch.equal(loss, model(input_ids=input_ids, fused_wce_loss=inputs).loss)  # label smoothing kept too
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        loaded.lm_head.weight.mul_(1.5)
    assert not torch.equal(loaded(input_ids=input_ids, fused_wce_loss=inputs).loss, loss)
    assert torch.equal(model(input_ids=input_ids, fused_wce_loss=inputs).loss, loss)


def test_patching_twice_replaces_the_options(tokenizer):
    model = _model(tokenizer)
    input_ids, inputs = _batch(model.config.vocab_size, seed=4)
    add_weighted_lm_head(model, label_smoothing=0.2)
    add_weighted_lm_head(model)
    reference = _model(tokenizer)
    add_weighted_lm_head(reference)
    assert torch.equal(model(input_ids=input_ids, fused_wce_loss=inputs).loss,
                       reference(input_ids=input_ids, fused_wce_loss=inputs).loss)
    # Trainer picks dataset columns and generate checks keywords by the forward's signature
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
