"""The bundled tiny text stack of `flux-shapes`: word-level T5 and character-level CLIP tokenizers built in code,
and small frozen text encoders (random, seeded, shipped as safetensors) so that ``pipe(prompt=...)`` works offline.
"""

from __future__ import annotations

import string

from .seeding import seeded


_CHARACTERS = list(string.ascii_lowercase + string.digits + " .,!?'-")


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARACTERS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def t5_tokenizer(words: list[str]):
    """Whole words of ``words`` are single pieces; anything else falls back to characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, 0.0) for word in words]
    pieces += [(char, -5.0) for char in _CHARACTERS] + [("\u2581" + char, -5.0) for char in _CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def text_encoders(clip_vocab: int, t5_vocab: int, width: int, seed: int = 0, t5_width: int | None = None):
    """Random CLIP (hidden ``width``: the pooled projection) and T5 (``t5_width``, default ``width``) encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t5_width = t5_width or width
    with seeded(seed):  # the caller's global random state is left as it was
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=clip_vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        t5 = _t5(t5_vocab, t5_width)
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


def t5_encoder(vocab: int, width: int, seed: int = 0):
    """A random T5 encoder of hidden ``width`` alone (Chroma's text encoder), for the T5 tokenizer above."""
    with seeded(seed):
        t5 = _t5(vocab, width)
    return t5.eval().requires_grad_(False)


def _t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=width // 2, num_layers=2, num_heads=2)
    )


def umt5_encoder(vocab: int, width: int, seed: int = 0):
    """A random UMT5 encoder of hidden ``width`` (Wan's text encoder family), for the T5 tokenizer above."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=width // 2, num_layers=2, num_heads=2)
    with seeded(seed):
        encoder = UMT5EncoderModel(config)
    return encoder.eval().requires_grad_(False)
