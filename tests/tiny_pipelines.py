"""Tiny pipelines of every kind genfast serves, built from configs so tests run in seconds on a CPU.

Same classes as the real thing (SD-1.x-shaped, SDXL-shaped with added conditioning, img2img,
inpaint, ControlNet, DiT, PixArt-alpha), random weights, 32x32 images. The tokenizer is genfast-mini's.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from genfast.models import ASSETS

KINDS = ("sd", "sdxl", "img2img", "inpaint", "controlnet", "dit", "pixart")
SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpm++2m": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
    "heun": lambda cfg: HeunDiscreteScheduler.from_config(cfg),
}


def tokenizer():
    return CLIPTokenizer.from_pretrained(ASSETS / "genfast-mini" / "tokenizer")


def _text_encoder(tok, hidden=16, projection=False):
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=hidden, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae():
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()


def _unet(in_channels=4, cross_attention_dim=16, **extra):
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, **extra,
    ).eval()


def _scheduler():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _sd_parts(in_channels=4):
    tok = tokenizer()
    return dict(vae=_vae(), text_encoder=_text_encoder(tok), tokenizer=tok, unet=_unet(in_channels),
                scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "sd":
        pipe = StableDiffusionPipeline(**_sd_parts())
    elif kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**_sd_parts())
    elif kind == "inpaint":
        pipe = StableDiffusionInpaintPipeline(**_sd_parts(in_channels=9))
    elif kind == "controlnet":
        parts = _sd_parts()
        controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(8, 8)).eval()
        with torch.no_grad():  # a ControlNet starts as a no-op (zero convs); make it matter
            for p in controlnet.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    elif kind == "sdxl":
        tok = tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(tok), text_encoder_2=_text_encoder(tok, projection=True),
            tokenizer=tok, tokenizer_2=tok, scheduler=_scheduler(),
            unet=_unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=6 * 8 + 16),
        )
    elif kind == "dit":
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            sample_size=16, patch_size=2, norm_num_groups=8,
        ).eval()
        pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=_scheduler(),
                           id2label={0: "circle", 1: "square"})
    elif kind == "pixart":
        tok = tokenizer()  # PixArt ships a T5 tokenizer; any tokenizer with the same call works here
        text = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                       num_heads=2)).eval()
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            sample_size=16, patch_size=2, norm_num_groups=8, cross_attention_dim=16, caption_channels=16,
        ).eval()
        pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer,
                                   scheduler=_scheduler())
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(kind: str, steps: int = 8, seed: int = 0, batch: int = 1) -> dict:
    """Call arguments for a pipeline of `kind`, with a fresh seeded generator each time."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "dit":
        return dict(class_labels=[1 - i % 2 for i in range(batch)], num_inference_steps=steps,
                    guidance_scale=4.0, generator=gen, output_type="np")
    args = dict(prompt=["a red circle on the left"] * batch, num_inference_steps=steps, guidance_scale=5.0,
                generator=gen, output_type="np", height=32, width=32)
    if kind == "pixart":
        args.update(max_sequence_length=32, clean_caption=False, use_resolution_binning=False)
    g = torch.Generator().manual_seed(123)
    image = torch.rand(batch, 3, 32, 32, generator=g)
    if kind == "img2img":
        args.update(image=image, strength=0.75)
        del args["height"], args["width"]
    elif kind == "inpaint":
        mask = torch.zeros(batch, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1.0
        args.update(image=image, mask_image=mask, strength=1.0)
    elif kind == "controlnet":
        args.update(image=image)
    return args
