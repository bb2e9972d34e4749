"""Stand-in pipeline components that run offline: the identity VAE of pixel- and latent-space toys, and the tiny
text stack (word-level T5 and character-level CLIP tokenizers built in code, small random seeded text encoders) of
the toy pipelines and of the bundled `flux-shapes` and `wan-motion` models (which ship its weights as safetensors).

A bottom module: the family files' toy pipelines (``PipelineSpec.build_toy``) build from it, so it imports nothing
of invardiff but :mod:`invardiff.seeding` (``tests/test_import_layers.py``).
"""

from __future__ import annotations

import string

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .seeding import seeded


class IdentityVAE(ModelMixin, ConfigMixin):
    """A stand-in VAE for pixel- or latent-space toys: ``decode`` returns its input (scaling factor 1)."""

    @register_to_config
    def __init__(
        self,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        block_out_channels: tuple = (1,),
        latent_channels: int = 1,
    ):
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=latents) if return_dict else (latents,)


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


def tiny_t5(width: int) -> dict:
    """A tiny random T5 encoder of output ``width`` with a tokenizer built in code, as the ``text_encoder`` and
    ``tokenizer`` of a pipeline conditioned on T5 alone (Chroma, LTX-Video, Allegro)."""
    tokenizer = t5_tokenizer(words=[])
    return {"text_encoder": t5_encoder(len(tokenizer), width), "tokenizer": tokenizer}


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


def gemma_tokenizer():
    """A character-level Gemma tokenizer built in code (BPE with no merges), padding on the left as Gemma's."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for piece in _CHARACTERS + ["\u2581"]:  # Gemma's pre-tokenizer turns spaces into U+2581
        vocab.setdefault(piece, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_gemma3(width: int, layers: int = 2, seed: int = 0) -> dict:
    """A tiny random Gemma 3 text stack of hidden ``width`` (``layers`` decoder layers, so ``layers + 1`` hidden
    states) with a tokenizer built in code, as the ``text_encoder`` and ``tokenizer`` of ``LTX2Pipeline``."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tokenizer = gemma_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=max(width // 2, 4),
        sliding_window=8,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with seeded(seed):
        encoder = Gemma3TextModel(config)
    return {"text_encoder": encoder.eval().requires_grad_(False), "tokenizer": tokenizer}
