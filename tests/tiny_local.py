"""A tiny model *and tokenizer* saved to a local directory, so ``--model DIR`` works offline in tests.

The tokenizer is a word-level one built from a fixed word list with the ``tokenizers`` library (no
download), wrapped in ``PreTrainedTokenizerFast``; the model is a tiny random Llama-style LM (from
``tiny_models``) whose vocabulary matches it, saved with ``save_pretrained``.
"""

import os

import torch

from tiny_models import VOCAB, tiny_model

WORDS = (
    "the cat dog sat ran on a mat under big small red blue tree house river bird sang sun moon "
    "day night old new boy girl saw ate fish bread milk green park by near and is was to of in "
    "what where who quickly slowly happy"
).split()
SPECIAL = ["[UNK]", "[PAD]", "[EOS]"]


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (unknown words map to [UNK])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def save_tiny(directory: str, family: str = "llama", seed: int = 0, **config_overrides) -> str:
    """Save a tiny fp32 model of ``family`` and the tiny tokenizer into ``directory``; return it."""
    os.makedirs(directory, exist_ok=True)
    model = tiny_model(family, dtype=torch.float32, attn_implementation="eager", seed=seed, **config_overrides)
    model.generation_config.eos_token_id = None  # the random model must not stop on a made-up token
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def sentence(n_words: int, offset: int = 0) -> str:
    """A deterministic text of ``n_words`` known words."""
    return " ".join(WORDS[(offset + 7 * i) % len(WORDS)] for i in range(n_words))
