"""GGUF → cached safetensors: the same model before and after caching, converted once, never stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import AssetError
from common.gguf_convert import MANIFEST, convert_gguf, probe_loss

TEXTS = ["To be, or not to be", "the quick brown fox jumps over the lazy dog"]


def _losses(model: torch.nn.Module, tokenizer: object) -> list[float]:
    return [probe_loss(model, tokenizer, t) for t in TEXTS]


def test_conversion_round_trips_the_model_and_tokenizer(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(gguf)
    meta = json.loads((out / MANIFEST).read_text())
    assert meta["probe_loss_gguf"] == meta["probe_loss_converted"]
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)
    cached = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    cached_tok = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:  # same tokens, same loss on texts the check never saw
        assert direct_tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    assert _losses(direct.eval(), direct_tok) == pytest.approx(_losses(cached.eval(), cached_tok), abs=1e-6)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_conversion_happens_once_and_a_changed_gguf_is_converted_again(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(gguf)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert convert_gguf(gguf) == out and (out / MANIFEST).stat().st_mtime_ns == stamp
    write_tiny_gguf(gguf, seed=1)  # another file at the same path: the cache must not serve the old one
    convert_gguf(gguf)
    meta = json.loads((out / MANIFEST).read_text())
    assert (out / MANIFEST).stat().st_mtime_ns != stamp and meta["gguf_sha256"] != ""


def test_missing_gguf_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="fedpers assets fetch smollm2"):
        convert_gguf(tmp_path / "nope.gguf")
