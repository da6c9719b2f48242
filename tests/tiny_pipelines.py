"""Tiny pipelines of every kind genfast serves, built from configs so tests run in seconds on a CPU.

Same classes as the real thing (SD-1.x-shaped, SDXL-shaped with added conditioning, img2img,
inpaint, ControlNet, DiT, PixArt-alpha), random weights, 32x32 images. The tokenizer is genfast-mini's.

NEW_KINDS are the transformer and video families (SD3/SD3.5, Flux with and without true CFG, Sana,
AuraFlow, HunyuanDiT, LTX, Wan 2.1 and 2.2 (two experts), CogVideoX, Mochi, HunyuanVideo,
AnimateDiff). Every pipeline takes
genfast-mini's CLIP tokenizer in place of its T5/Gemma/Llama/BERT one: diffusers only calls it
(padding="max_length", truncation), and each text encoder's vocabulary is sized to it. Nothing is
downloaded.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HeunDiscreteScheduler,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    MotionAdapter,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    LlamaConfig,
    LlamaModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from genfast.models import ASSETS

KINDS = ("sd", "sdxl", "img2img", "inpaint", "controlnet", "dit", "pixart")
NEW_KINDS = ("sd3", "sd35", "flux", "flux_truecfg", "sana", "auraflow", "hunyuandit", "ltx", "wan", "wan22",
             "cogvideox", "mochi", "hunyuanvideo", "animatediff")
ALL_KINDS = KINDS + NEW_KINDS
VIDEO_KINDS = ("ltx", "wan", "wan22", "cogvideox", "mochi", "hunyuanvideo", "animatediff")
# Kinds whose pipeline calls the denoiser twice per step, once inside cache_context("cond") and once
# inside cache_context("uncond") (true CFG). The others batch cond and uncond into one call (LTX,
# CogVideoX and Mochi inside cache_context("cond_uncond"), the rest with no context); plain "flux"
# is guidance-distilled (guidance is an embedding) and makes one unbatched call.
TWO_PASS = {kind: kind in ("flux_truecfg", "wan", "wan22", "hunyuanvideo") for kind in ALL_KINDS}
SCHEDULERS = {
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "dpm++2m": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2),
    "heun": lambda cfg: HeunDiscreteScheduler.from_config(cfg),
}


def tokenizer():
    return CLIPTokenizer.from_pretrained(ASSETS / "genfast-mini" / "tokenizer")


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _text_encoder(tok, hidden=16, projection=False, positions=32):
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=positions, projection_dim=hidden, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(**extra):
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32, **extra,
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
    elif kind in NEW_KINDS:
        pipe = _BUILDERS[kind.removesuffix("_truecfg")]()
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {ALL_KINDS}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(kind: str, steps: int = 8, seed: int = 0, batch: int = 1) -> dict:
    """Call arguments for a pipeline of `kind`, with a fresh seeded generator each time."""
    gen = torch.Generator().manual_seed(seed)
    if kind in NEW_KINDS:
        return _new_inputs(kind, steps, gen, batch)
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


# --- transformer and video families -------------------------------------------------------------
# Sizes are about the smallest each model's constructor and pipeline accept (one 8-step call takes
# well under a second); every transformer has four repeated blocks (2 dual-stream + 2 single-stream
# in Flux, AuraFlow and HunyuanVideo) so a span of blocks can be reused.


def _wake(model, scale=0.05):
    """Add noise to every all-zero tensor: zero-initialised output projections and adaLN
    modulations would otherwise make a random-weight denoiser a constant, and a test of reuse blind."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _t5(tok, d_model=32, cls=T5EncoderModel, config=T5Config):
    return cls(config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)).eval()


def _flow():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _sd3(sd35=False):
    tok = tokenizer()
    extra = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, **extra,
    )
    return StableDiffusion3Pipeline(
        transformer=_wake(transformer), scheduler=_flow(), vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_text_encoder(tok, projection=True), tokenizer=tok,
        text_encoder_2=_text_encoder(tok, projection=True), tokenizer_2=tok, text_encoder_3=_t5(tok), tokenizer_3=tok,
    )


def _flux():
    tok = tokenizer()
    transformer = FluxTransformer2DModel(  # in_channels: 4 latent channels packed 2x2
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256)
    return FluxPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=_text_encoder(tok), tokenizer=tok, text_encoder_2=_t5(tok), tokenizer_2=tok,
                        transformer=_wake(transformer))


def _sana():
    tok = tokenizer()
    text = Gemma2Model(Gemma2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=32, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate",
        downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=2,
    )
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=_wake(transformer), scheduler=scheduler)


def _auraflow():
    tok = tokenizer()
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pos_embed_max_size=64,
    )
    with torch.no_grad():  # random weights give adaLN gates near 0.03, so the blocks barely mattered
        transformer.time_step_proj.linear_2.weight.mul_(8.0)
        transformer.time_step_proj.linear_2.bias.mul_(8.0)
    return AuraFlowPipeline(tokenizer=tok, text_encoder=_t5(tok, cls=UMT5EncoderModel, config=UMT5Config),
                            vae=_vae(), transformer=_wake(transformer), scheduler=_flow())


def _vae8():
    """An AutoencoderKL with the real 8x downsampling, for pipelines that hard-code it."""
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=64,
    ).eval()


def _hunyuandit():
    tok = tokenizer()
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=80, pad_token_id=tok.pad_token_id),
                     add_pooling_layer=False).eval()
    transformer = HunyuanDiT2DModel(  # text lengths are the pipeline's fixed 77 (BERT) and 256 (T5) tokens
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, hidden_size=16, num_layers=4,
        mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=32, pooled_projection_dim=16,
        sample_size=8, text_len=77, text_len_t5=256,
    )
    return HunyuanDiTPipeline(vae=_vae8(), text_encoder=bert, tokenizer=tok, transformer=_wake(transformer),
                              scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.03, clip_sample=False, steps_offset=1),
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                              text_encoder_2=_t5(tok), tokenizer_2=tok)


def _ltx():
    tok = tokenizer()
    vae = AutoencoderKLLTXVideo(  # 4x spatial, 4x temporal compression
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=4, caption_channels=32,
    )
    return LTXPipeline(scheduler=_flow(), vae=vae, text_encoder=_t5(tok), tokenizer=tok, transformer=_wake(transformer))


def _wan(two_experts=False):
    """two_experts: Wan 2.2's layout, `transformer_2` takes the steps below half the noise."""
    tok = tokenizer()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32,
    )
    expert = None
    if two_experts:
        expert = _wake(WanTransformer3DModel.from_config(transformer.config))
    return WanPipeline(tokenizer=tok, text_encoder=_t5(tok, cls=UMT5EncoderModel, config=UMT5Config),
                       vae=vae.eval(), scheduler=_flow(), transformer=_wake(transformer), transformer_2=expert,
                       boundary_ratio=0.5 if two_experts else None)


def _cogvideox():
    tok = tokenizer()
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=4, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    )
    return CogVideoXPipeline(tokenizer=tok, text_encoder=_t5(tok), vae=vae, transformer=_wake(transformer),
                             scheduler=CogVideoXDDIMScheduler(  # CogVideoX-2b's schedule
                                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                                 snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False))


def _mochi():
    tok = tokenizer()
    vae = AutoencoderKLMochi(  # 12 latent channels: the pipeline hard-codes them when un-normalising
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=4, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=4, max_sequence_length=16,
    )
    return MochiPipeline(scheduler=_flow(), vae=vae, text_encoder=_t5(tok), tokenizer=tok,
                         transformer=_wake(transformer))


def _hunyuanvideo():
    tok = tokenizer()
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(2, 2, 4),
    )
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=_wake(transformer), vae=vae,
                                scheduler=_flow(), text_encoder_2=_text_encoder(tok, positions=77), tokenizer_2=tok)


def _animatediff():
    tok = tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8).eval()
    pipe = AnimateDiffPipeline(vae=_vae(), text_encoder=_text_encoder(tok), tokenizer=tok, unet=unet,
                               motion_adapter=adapter, scheduler=_scheduler())
    _wake(pipe.unet)  # the motion modules' output projections start at zero
    return pipe


_BUILDERS = {
    "sd3": _sd3, "sd35": lambda: _sd3(sd35=True), "flux": _flux, "sana": _sana, "auraflow": _auraflow,
    "hunyuandit": _hunyuandit, "ltx": _ltx, "wan": _wan, "wan22": lambda: _wan(two_experts=True), "cogvideox": _cogvideox, "mochi": _mochi,
    "hunyuanvideo": _hunyuanvideo, "animatediff": _animatediff,
}


def _new_inputs(kind, steps, gen, batch):
    args = dict(prompt=["a red circle on the left"] * batch, num_inference_steps=steps, guidance_scale=5.0,
                generator=gen, output_type="np", height=32, width=32)
    if kind in ("sd3", "sd35", "flux", "flux_truecfg", "auraflow"):
        args.update(max_sequence_length=16)
    if kind == "flux_truecfg":
        args.update(negative_prompt=["blurry"] * batch, true_cfg_scale=4.0)
    elif kind == "sana":
        args.update(max_sequence_length=16, complex_human_instruction=None, use_resolution_binning=False)
    elif kind == "hunyuandit":
        args.update(height=64, width=64, use_resolution_binning=False)
    elif kind == "ltx":
        args.update(num_frames=9, max_sequence_length=16)
    elif kind in ("wan", "wan22", "cogvideox"):  # their VAEs downsample 8x
        args.update(height=64, width=64, num_frames=9, max_sequence_length=16)
    elif kind == "mochi":
        args.update(height=64, width=64, num_frames=7, max_sequence_length=16)
    elif kind == "hunyuanvideo":
        args.update(height=32, width=32, num_frames=5, max_sequence_length=16, negative_prompt=["blurry"] * batch,
                    true_cfg_scale=4.0)
    elif kind == "animatediff":
        args.update(num_frames=4)
    return args


def wake_gates(model, *patterns: str, std: float = 0.1):
    """Draw N(0, std) into every parameter whose name holds one of `patterns` (default: the adaLN-Zero
    gates), so a freshly initialised block changes its input and a test can see what it does."""
    patterns = patterns or ("adaLN",)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(pattern in name for pattern in patterns):
                p.normal_(std=std)
    return model


def tiny_tokenizer(**config):
    """A MultiScaleVQModel of `config`, seed 0, eval mode, its codebook drawn on the latents' scale (N(0, 0.5))
    so every scale picks varied rows."""
    from genfast.generators import MultiScaleVQModel

    torch.manual_seed(0)
    vq = MultiScaleVQModel(**config).eval()
    with torch.no_grad():
        vq.embedding.weight.normal_(0, 0.5)
    return vq
