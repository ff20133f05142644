"""A GGUF causal LM (SmolLM2 from its PyPI wheel) converted once into a cached float32 safetensors model.

Loading from GGUF dequantizes every tensor (~16 s for SmolLM2-135M); fedpers converts once into
``<gguf folder>/converted/`` and loads that afterwards. The conversion is verified: the loss of a fixed
probe text must be the same from the GGUF model and from the reloaded safetensors model, and the
manifest records the GGUF's sha256 so a different file is never served from a stale cache. transformers
refuses ``save_pretrained`` on a GGUF-loaded model, so the weights go through a model built from the
(de-quantized) config. Writes are atomic (a temporary folder renamed into place under a lock).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common.assets import sha256_file
from common.errors import AssetError

PROBE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
MANIFEST = "fedpers-manifest.json"
TOLERANCE = 1e-4  # |loss before − loss after|: float32 round trip, expected to be exactly 0


def probe_loss(model: Any, tokenizer: Any, text: str = PROBE) -> float:
    """Mean next-token loss of ``text`` (the conversion's fingerprint)."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def converted_dir(gguf: Path) -> Path:
    """Where the converted model of ``gguf`` lives."""
    return gguf.parent / "converted" / gguf.stem


def convert_gguf(gguf: str | Path) -> Path:
    """The folder of the verified safetensors conversion of ``gguf`` (converting it on first use)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise AssetError(f"GGUF file {gguf} does not exist: run `fedpers assets fetch smollm2`")
    out = converted_dir(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sha = sha256_file(gguf)
        manifest = out / MANIFEST
        if manifest.is_file():
            meta = json.loads(manifest.read_text())
            if meta.get("gguf_sha256") == sha:
                return out
            shutil.rmtree(out)  # converted from another file: convert again
        _convert(gguf, out, sha)
    return out


def _convert(gguf: Path, out: Path, sha: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    before = probe_loss(loaded, tokenizer)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        after = probe_loss(reloaded, AutoTokenizer.from_pretrained(str(tmp)))
        if not (math.isfinite(before) and abs(before - after) <= TOLERANCE):
            raise AssetError(
                f"GGUF conversion of {gguf.name} does not round-trip: probe loss {before:.6f} from the "
                f"GGUF, {after:.6f} from the converted model"
            )
        meta = {
            "gguf": gguf.name,
            "gguf_sha256": sha,
            "probe": PROBE,
            "probe_loss_gguf": before,
            "probe_loss_converted": after,
            "parameters": sum(p.numel() for p in reloaded.parameters()),
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
