"""Tiny character-level models and tokenizers for the demo's assets and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

# The shipped tokenizers' chat template: the messages' contents, concatenated. The tiny demo
# models know only their task alphabet (no role tokens), so a "messages" row
# [{"role": "user", "content": "3+8-4="}] renders to the raw prompt "3+8-4=".
CHAR_CHAT_TEMPLATE = "{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"


def build_char_tokenizer(alphabet: str, save_dir: Optional[str | Path] = None):
    """A character-level Hugging Face tokenizer (`tokenizers` WordLevel model): one token per
    character of `alphabet` plus <pad>, <eos>, <unk>, with `CHAR_CHAT_TEMPLATE`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
        # transformers 5 names the class it saved "TokenizersBackend", which transformers 4
        # cannot load; under the name both know, both load the same fast tokenizer.
        config_file = Path(save_dir) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tokenizer


def tiny_llama(
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    *,
    seed: int,
    pad_id: int,
    eos_id: int,
    max_positions: int = 64,
):
    """A small LlamaForCausalLM with untied, bias-free head (the demo and test models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
