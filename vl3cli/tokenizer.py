"""The checkpoint's tokenizer, read with the `tokenizers` library (no transformers).

`tokenizer.json` is the tokenizer; tokens listed in `added_tokens.json` or in
`tokenizer_config.json`'s `added_tokens_decoder` that it lacks are added (as special tokens) at
the ids the checkpoint gives them. Special-token ids always come from these files.
"""

from __future__ import annotations

from pathlib import Path

from .config import read_json
from .errors import TokenizerError


class Tokenizer:
    def __init__(self, backend):
        # Text is text: a `<|im_end|>` or `<|image_pad|>` typed in a question is encoded as the
        # characters it is made of, never as the special token (no role or placeholder injection).
        # The chat's structure comes only from the ids prompt.py places.
        backend.encode_special_tokens = True
        self._tok = backend
        self._longest: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json (vl3 reads fast-tokenizer files only)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {file}: {exc}") from None
        extra: dict[str, int] = {}
        added = path / "added_tokens.json"
        if added.is_file():
            tokens = read_json(added, TokenizerError)
            if not all(type(i) is int and i >= 0 for i in tokens.values()):
                raise TokenizerError(f"{added}: every token must map to an id (an integer >= 0)")
            extra.update(tokens)
        config = path / "tokenizer_config.json"
        if config.is_file():
            decoder = read_json(config, TokenizerError).get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict) or not all(k.isascii() and k.isdigit() for k in decoder):
                raise TokenizerError(f"{config}: added_tokens_decoder must map token ids (\"151643\") to tokens")
            for token_id, entry in decoder.items():
                if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                    extra.setdefault(entry["content"], int(token_id))
        missing = sorted((i, t) for t, i in extra.items() if backend.token_to_id(t) is None)
        for token_id, token in missing:
            if token_id != backend.get_vocab_size(with_added_tokens=True):
                raise TokenizerError(
                    f"{path}: added token {token!r} wants id {token_id}, but the tokenizer's next id is "
                    f"{backend.get_vocab_size(with_added_tokens=True)}"
                )
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing is added, and special tokens written in it stay plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without encoding it: no token covers more characters
        than the vocabulary's longest token is long (a byte-level token's string has one character
        per byte, and a character is at least one byte). Lets a huge text be refused at once."""
        if self._longest is None:
            self._longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        return -(-len(text) // self._longest)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
