"""Tokenizers: the MiniLM tokenizer from its asset, or a tiny WordPiece trained locally for tests."""

from __future__ import annotations

import csv
import os
import threading
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VOCAB = 2000
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LOCK = threading.Lock()


def _tiny_corpus() -> list[str]:
    from common.assets import ensure

    with open(ensure("tweets"), encoding="latin-1", newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def _train_tiny(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=TINY_VOCAB, special_tokens=_SPECIAL, show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of backbone ``name`` (``minilm`` or ``tiny``), offline."""
    if name == "tiny":
        from common.assets import cache_root

        path = cache_root() / "tiny-tokenizer" / f"wordpiece-{TINY_VOCAB}.json"
        with _LOCK:
            if not path.is_file():
                _train_tiny(path)
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    from transformers import AutoTokenizer

    from common.assets import asset_path

    return AutoTokenizer.from_pretrained(str(asset_path("minilm")))
