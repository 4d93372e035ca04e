"""The checkpoint tokenizer: ids from the files, added tokens, decoding, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny
from tokenizers import Tokenizer as Backend

from vl3cli.errors import TokenizerError
from vl3cli.tokenizer import Tokenizer


def test_encode_decode_match_the_tokenizers_library(hf_checkpoint):
    ours = Tokenizer.from_dir(hf_checkpoint)
    backend = Backend.from_str(tiny.tokenizer_json())
    text = "<|im_start|>user\nWhat happens after the cat jumps?<|im_end|>"
    ids = ours.encode(text)
    assert ids == backend.encode(text, add_special_tokens=False).ids
    assert ids[0] == tiny.token_id("<|im_start|>") and ids[-1] == tiny.token_id("<|im_end|>")
    assert ours.decode(ids) == "user\nWhat happens after the cat jumps?"
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_added_tokens_json_adds_missing_tokens(hf_checkpoint, tmp_path):
    folder = shutil.copytree(hf_checkpoint, tmp_path / "c")
    base = Tokenizer.from_dir(folder).vocab_size
    (folder / "added_tokens.json").write_text(json.dumps({"<extra_a>": base, "<extra_b>": base + 1, "<image>": 5}))
    tok = Tokenizer.from_dir(folder)
    assert tok.token_to_id("<extra_a>") == base and tok.token_to_id("<extra_b>") == base + 1
    assert tok.encode("x<extra_b>")[-1] == base + 1
    assert tok.token_to_id("<image>") == tiny.token_id("<image>")  # already present: unchanged


def test_added_token_at_an_impossible_id(hf_checkpoint, tmp_path):
    folder = shutil.copytree(hf_checkpoint, tmp_path / "c")
    (folder / "added_tokens.json").write_text(json.dumps({"<far>": 100000}))
    with pytest.raises(TokenizerError, match="'<far>' wants id 100000"):
        Tokenizer.from_dir(folder)


def test_missing_and_broken_tokenizer(hf_checkpoint, tmp_path):
    folder = shutil.copytree(hf_checkpoint, tmp_path / "c")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer.json"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.from_dir(folder)
