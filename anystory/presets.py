"""Presets: `tiny` (SDXL-shaped, a few channels, runs on a CPU in well under a second) and `sdxl`
(the paper's shapes). Configs only; `components.py` turns them into modules."""

from __future__ import annotations

from anystory.config import AnyStoryConfig, QFormerConfig, RouterConfig

# SDXL base 1.0 UNet: 70 transformer blocks (down 4 + 20, mid 10, up 30 + 6).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],  # diffusers' legacy name: these are head counts
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SDXL_TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
# OpenCLIP ViT-H/14 in transformers layout (as IP-Adapter's image_encoder): 257 tokens of 1280.
VIT_H_14 = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
    patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)


def sdxl() -> AnyStoryConfig:
    return AnyStoryConfig(
        preset="sdxl",
        unet=dict(SDXL_UNET),
        vae=dict(SDXL_VAE),
        text_encoder=dict(SDXL_TEXT_ENCODER),
        text_encoder_2=dict(SDXL_TEXT_ENCODER_2),
        image_encoder=dict(VIT_H_14),
        subject_qformer=QFormerConfig(input_dim=1280, output_dim=2048, num_queries=64),
        routing_qformer=QFormerConfig(input_dim=1280, output_dim=2048, num_queries=1),
        router=RouterConfig(routing_dim=2048),
        clip_image_size=224,
        ref_size=512,
        resolution=1024,
    )


def tiny() -> AnyStoryConfig:
    # Two text encoders of width 32 -> cross-attention width 64; pooled 32; 6 time ids x 8.
    # Transformer blocks at two resolutions (11 in all), as SDXL has them at two.
    text = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    )
    return AnyStoryConfig(
        preset="tiny",
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[32, 64, 64],
            layers_per_block=1,
            transformer_layers_per_block=[1, 1, 2],
            attention_head_dim=[2, 2, 4],
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=16,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[32, 64, 64],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=0.5,
        ),
        text_encoder=dict(text),
        text_encoder_2=dict(text, hidden_act="gelu"),
        image_encoder=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            patch_size=8, image_size=32, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
        subject_qformer=QFormerConfig(
            input_dim=32, output_dim=64, num_queries=8, width=32, depth=2, heads=2, head_dim=16, ff_mult=2
        ),
        routing_qformer=QFormerConfig(
            input_dim=32, output_dim=32, num_queries=1, width=32, depth=2, heads=2, head_dim=16, ff_mult=2
        ),
        router=RouterConfig(routing_dim=32, width=64, heads=4),  # 16 wide: mIoU 0.22 vs 0.26 (toy chain)
        clip_image_size=32,
        ref_size=64,
        resolution=64,
    )


PRESETS = {"tiny": tiny, "sdxl": sdxl}


def get_preset(name: str) -> AnyStoryConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
