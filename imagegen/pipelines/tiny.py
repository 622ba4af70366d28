"""Tiny random-weight diffusers repositories, written to disk and loaded back like hub models.

No real FLUX or SDXL weights can be downloaded on the machines this project is built and tested
on. These tiny repos have the *same components and file layout* as the real ones (transformer or
UNet, VAE, two text encoders, two tokenizers, scheduler, ``model_index.json``), so rendering loads
them through the very same ``from_pretrained`` code path a hub model takes; only the numbers in
the weights are random. They are deterministic: every build from the same ``TINY_VERSION``
produces identical weights and vocabularies.

The tokenizers are real tokenizers built with the ``tokenizers`` library: a CLIP-style BPE
(lower-cased, ``</w>`` word ends) and a T5-style Unigram model, both derived from a small
embedded prompt corpus.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from imagegen.settings import get_settings

log = logging.getLogger(__name__)

#: bump when the architecture or the seeding below changes; a cached repo of another version is rebuilt
TINY_VERSION = 2
MARKER = "imagegen_tiny.json"
SEED = 20261125

#: sizes shared by the FLUX and SDXL tiny repos
TEXT_HIDDEN = 32
CLIP_MAX_LENGTH = 77

#: a small corpus of prompt-like text the tokenizers are built from
CORPUS = """
a photo of a woman at a cafe at night, warm light, bokeh
portrait of a man in a studio, soft lighting, 85mm lens, sharp focus
close-up of a smiling face, freckles, green eyes, red hair
full body shot of a character walking in the rain, neon city street
an illustration in watercolor style, pastel colors, children's book
cinematic still, dramatic shadows, film grain, 35mm
the character sitting on a bench in a park, autumn leaves, golden hour
side profile, looking left, studio backdrop, high key lighting
three quarter view, laughing, outdoor market, daylight
anime style, cel shading, clean lines, vibrant colors
oil painting of a knight, renaissance style, museum lighting
a selfie on a beach at sunset, wind in the hair, candid
black and white photograph, high contrast, street photography
wearing a leather jacket, sunglasses, motorbike, desert road
reading a book in a library, glasses, cozy sweater, lamp light
a chef cooking in a busy kitchen, steam, stainless steel
astronaut in a spacesuit, helmet, stars, earth in the background
low quality, blurry, deformed, extra fingers, watermark, text
"""


def _corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.strip().splitlines() if line.strip()]


def _learn_bpe_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts, ties broken by the pair itself.

    The ``tokenizers`` trainer breaks ties between equally frequent pairs differently from run to
    run; a tiny model must be identical on every build, so the (small) learning loop is done here
    and the result handed to a ``tokenizers`` BPE model.
    """
    segmented = {tuple(word[:-1]) + (word[-1] + "</w>",): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols, count in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        segmented = merged
    return merges


def _build_clip_tokenizer():
    """A CLIP-style byte-pair tokenizer (lower-cased, ``</w>`` word ends) learned from the corpus."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    splitter = pre_tokenizers.Whitespace()
    words = Counter(piece for line in _corpus_lines() for piece, _ in splitter.pre_tokenize_str(line.lower()))
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-") | {c for w in words for c in w})
    merges = _learn_bpe_merges(words, num_merges=300)
    symbols = sorted(set(alphabet) | {c + "</w>" for c in alphabet})
    vocab: dict[str, int] = {}
    for token in [*specials, *symbols, *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _build_t5_tokenizer():
    """A T5-style Unigram tokenizer whose pieces and scores come from corpus frequencies."""
    from transformers import T5Tokenizer

    words = Counter(w for line in _corpus_lines() for w in line.lower().replace(",", " ,").split())
    chars = Counter(c for line in _corpus_lines() for c in line.lower() if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", math.log(0.05))]
    for word, count in sorted(words.items()):
        pieces.append(("▁" + word, math.log(count / total)))
    for char, count in sorted(chars.items()):
        pieces.append((char, math.log(count / total) - 5.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _seeded(build: Callable[[], torch.nn.Module], offset: int) -> torch.nn.Module:
    """Build a module with a fixed seed, so every build draws the same weights."""
    torch.manual_seed(SEED + offset)
    return build().eval()


def _clip_text_model(vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_vae(shift_factor: float | None, scaling_factor: float, latent_channels: int):
    from diffusers import AutoencoderKL

    kwargs = {"shift_factor": shift_factor} if shift_factor is not None else {}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
        **kwargs,
    )


def build_flux_pipeline():
    """A FluxPipeline with FLUX.1's component layout at toy sizes (width 64: 2 heads of 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _build_clip_tokenizer()
    tokenizer_2 = _build_t5_tokenizer()
    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=3,
            num_single_layers=5,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            pooled_projection_dim=TEXT_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),
        ),
        0,
    )
    vae = _seeded(lambda: _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, latent_channels=4), 1)
    text_encoder = _seeded(lambda: _clip_text_model(len(tokenizer), with_projection=False), 2)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=TEXT_HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = _seeded(lambda: T5EncoderModel(t5_config), 3)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_sdxl_pipeline():
    """A StableDiffusionXLPipeline with SDXL's component layout at toy sizes."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _build_clip_tokenizer()
    addition_time_embed_dim = 8
    unet = _seeded(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            transformer_layers_per_block=(1, 2),
            # 6 micro-conditioning numbers + the pooled projection of text_encoder_2
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + TEXT_HIDDEN,
            cross_attention_dim=2 * TEXT_HIDDEN,  # both text encoders' hidden states, concatenated
            norm_num_groups=8,
        ),
        10,
    )
    vae = _seeded(lambda: _tiny_vae(shift_factor=None, scaling_factor=0.13025, latent_channels=4), 11)
    text_encoder = _seeded(lambda: _clip_text_model(len(tokenizer), with_projection=False), 12)
    text_encoder_2 = _seeded(lambda: _clip_text_model(len(tokenizer), with_projection=True), 13)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


BUILDERS: dict[str, Callable[[], object]] = {"flux": build_flux_pipeline, "sdxl": build_sdxl_pipeline}


def tiny_repo_dir(name: str, model_cache: Path | None = None) -> Path:
    return (model_cache or get_settings().model_cache) / "tiny" / name


def is_current(path: Path) -> bool:
    marker = path / MARKER
    if not marker.exists() or not (path / "model_index.json").exists():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def ensure_tiny_repo(name: str, model_cache: Path | None = None, force: bool = False) -> Path:
    """Write the tiny repo ``name`` (``flux`` / ``sdxl``) to the model cache unless it is there.

    The repo is written into a temporary sibling directory and renamed into place, so a killed
    build never leaves a half-written repo that would later fail to load.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny model '{name}'; known: {', '.join(sorted(BUILDERS))}")
    target = tiny_repo_dir(name, model_cache)
    if is_current(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building tiny %s repo in %s", name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        pipeline = BUILDERS[name]()
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps({"version": TINY_VERSION, "seed": SEED, "family": name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
