"""Base language models: the embedded Gemma 3 270M, a tiny test model, or a local HF directory.

The tiny model has Gemma 3's architecture (same module names, so LoRA
targets and merge code are exercised exactly as on the real model) but a few
thousand parameters and a byte-level BPE tokenizer trained in-process on the
task templates, so the test suite needs no files and no network.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel, PreTrainedTokenizerFast

from common.tasks import LAMP2_TAGS, TASKS

TINY_SPEC = "tiny"


def _tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task templates: any text encodes, prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [spec.template for spec in TASKS.values()] + list(LAMP2_TAGS) + [" 1 2 3 4 5 [1] [2]"]
    corpus += ["The movie is a story about a man and a woman who love the film. Review: great, bad, fine."]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised Gemma-3-shaped causal LM and its tokenizer, deterministic by seed."""
    tokenizer = _tiny_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    model.eval()
    return model, tokenizer
