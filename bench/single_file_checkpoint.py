"""Writes a full-size SD 1.5-architecture single-file checkpoint with random fp16 weights
(original layout, ~2 GB; do not commit it) for measuring load time and peak memory:

    bench/single_file_checkpoint.py /tmp/sd15-random.safetensors
    FRISKET_FULL_CHECKPOINT=/tmp/sd15-random.safetensors \
        cargo test --release -p frisket-engine --test single_file -- --ignored --nocapture

The shapes come from diffusers' and transformers' default SD 1.5 configs, built on the meta
device; each tensor is drawn directly in fp16, so writing needs little more than the file.
"""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from ref_single_file import clip_to_original, unet_to_original, vae_to_original  # noqa: E402


def main(path: Path) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                hidden_act="quick_gelu",
                projection_dim=768,
            )
        )
    shapes = {
        **unet_to_original(unet),
        **vae_to_original(vae),
        **clip_to_original(text, "cond_stage_model.transformer."),
    }
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).half() for k, v in shapes.items()}
    save_file(state, path)
    print(f"{len(state)} tensors, {path.stat().st_size / 1e9:.2f} GB written to {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
