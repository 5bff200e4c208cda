"""Tokenizers: a dependency-free byte tokenizer, and local Hugging Face tokenizers behind the same helpers.

The data pipeline only needs three things from a tokenizer: ids for a piece of text (with or without a
leading BOS), the EOS id and the pad id. :func:`encode` and :func:`special_ids` give those for both kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from zo2.config.data import DataConfig
from zo2.errors import DataError

#: Files one of which a Hugging Face tokenizer folder holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b → b + 3; ``vocab_size`` = 259.

    Needs no files and no downloads, so tests and the tiny shipped corpus work anywhere; any model whose
    vocabulary has at least 259 entries can be trained on it.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The ids of ``text``'s UTF-8 bytes, after a BOS id when ``add_bos``."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special ids are skipped and invalid UTF-8 is replaced."""
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def load_tokenizer(cfg: DataConfig, model_path: str | None = None) -> Any:
    """The tokenizer ``cfg.tokenizer`` names: the byte tokenizer (None), the model folder's ('model') or
    the one in a local folder. Hugging Face tokenizers without a pad token get pad = eos."""
    if cfg.tokenizer is None:
        return ByteTokenizer()
    if cfg.tokenizer == "model":
        if model_path is None:
            raise DataError("data.tokenizer = 'model' but no model folder was given to take the tokenizer "
                            "from. Set model.path, or set data.tokenizer to a tokenizer folder.")
        folder = model_path
    else:
        folder = cfg.tokenizer
    return load_hf_tokenizer(folder)


def load_hf_tokenizer(folder: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` offline, with clear errors and pad = eos when unset."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"Tokenizer folder {str(path)!r} does not exist. Set data.tokenizer to a local folder "
                        "holding tokenizer files (e.g. a model saved with save_pretrained), to 'model', or "
                        "unset it to use the built-in byte tokenizer.")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"Folder {str(path)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). "
                        "Point data.tokenizer at a folder saved with tokenizer.save_pretrained(), or unset it "
                        "to use the built-in byte tokenizer.")
    from transformers import AutoTokenizer  # heavy import, only when needed

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds
        raise DataError(f"Could not load the tokenizer in {str(path)!r}: {exc}. Check that the folder holds a "
                        "complete tokenizer saved with save_pretrained(), or unset data.tokenizer to use the "
                        "built-in byte tokenizer.") from exc
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def encode(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """``text``'s ids with either kind of tokenizer: no special tokens, except a BOS first when ``add_bos``
    and the tokenizer has one (so EOS-appending tokenizers do not append it here)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, add_bos=add_bos)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if add_bos and bos is not None else ids


def special_ids(tokenizer: Any) -> tuple[int, int | None]:
    """``(pad_id, eos_id)``; pad falls back to eos, then 0, for tokenizers that define neither."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    return int(pad), (int(eos) if eos is not None else None)
