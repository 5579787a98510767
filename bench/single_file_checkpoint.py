"""Writes a full-size single-file checkpoint with random fp16 weights in the original
layout (SD 1.5: ~2.1 GB; SDXL base: ~6.9 GB; do not commit them) for measuring load time
and peak memory:

    bench/single_file_checkpoint.py sd15 /tmp/sd15-random.safetensors
    bench/single_file_checkpoint.py sdxl /tmp/sdxl-random.safetensors
    bench/single_file_checkpoint.py sd15 /tmp/sd15-random.ckpt   # torch.save, A1111 layout
    FRISKET_FULL_CHECKPOINT=/tmp/sdxl-random.safetensors \
        cargo test --release -p frisket-engine --test single_file -- --ignored --nocapture

The architectures are the published ones (bench/gpu_check.py builds the same), built on the
meta device; each tensor is drawn directly in fp16, so writing needs little more than the
file.
"""

import sys
from pathlib import Path

import torch
from gpu_check import clip_big_g, clip_l, sd15_unet, sdxl_unet, vae
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from ref_single_file import (  # noqa: E402
    clip_to_original,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)


def main(family: str, path: Path) -> None:
    with torch.device("meta"):
        if family == "sd15":
            shapes = {
                **unet_to_original(sd15_unet()),
                **vae_to_original(vae(512, 0.18215, False)),
                **clip_to_original(clip_l(), "cond_stage_model.transformer."),
            }
        elif family == "sdxl":
            shapes = {
                **unet_to_original(sdxl_unet()),
                **vae_to_original(vae(1024, 0.13025, True)),
                **clip_to_original(clip_l(), "conditioner.embedders.0.transformer."),
                **open_clip_to_original(clip_big_g(), "conditioner.embedders.1.model."),
            }
        else:
            sys.exit(f"unknown family {family!r}: sd15 or sdxl")
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).half() for k, v in shapes.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        save_file(state, path)
    print(f"{len(state)} tensors, {path.stat().st_size / 1e9:.2f} GB written to {path}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
