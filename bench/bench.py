"""`make bench`: Frisket against diffusers on the same machine, in one run.

Builds (once, cached) a mid-size random SD-1-style model, 128/256/256 channels, and renders
the same job at 256×256 with diffusers and with `frisket-server render`, then prints seconds
per denoising step for each and the ratio. Usage: bench.py FRISKET_SERVER_BINARY CACHE_DIR
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from clip_vocab import write_vocab  # noqa: E402

STEPS, SIZE, SEED, GUIDANCE = 6, 256, 7, 7.5
PROMPT = "a watercolour lighthouse on a cliff at dusk"


def build_model(folder: Path, cache: Path) -> None:
    if (folder / "model_index.json").exists():
        return
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=1,
        latent_channels=4,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=4, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    write_vocab(folder / "tokenizer", cache / "downloads")
    tok = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"))
    tok.model_max_length = 77
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def diffusers_step_times(folder: Path) -> list:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
         generator=torch.Generator().manual_seed(SEED), output_type="np", callback_on_step_end=on_step)
    return [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]


def frisket_step_times(binary: str, folder: Path) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        subprocess.run([binary, "render", "--model", str(folder), "--prompt", PROMPT, "--steps", str(STEPS),
                        "--guidance", str(GUIDANCE), "--seed", str(SEED), "--width", str(SIZE), "--height", str(SIZE),
                        "--scheduler", "ddim", "--out", str(Path(tmp) / "out.png"), "--quiet",
                        "--timings", str(timings)], check=True)
        return json.loads(timings.read_text())["step_seconds"][1:]


def main(binary: str, cache: Path) -> None:
    folder = cache / "bench-model-128-256-256"
    build_model(folder, cache)
    print(f"mid-size SD1-style UNet (128/256/256), {SIZE}x{SIZE}, CFG batch 2, {STEPS} DDIM steps, "
          f"{torch.get_num_threads()} threads; first step excluded (warm-up)")
    with torch.no_grad():
        theirs = statistics.median(diffusers_step_times(folder))
    ours = statistics.median(frisket_step_times(binary, folder))
    print(f"diffusers {theirs:.3f} s/step")
    print(f"frisket   {ours:.3f} s/step")
    print(f"ratio frisket/diffusers {ours / theirs:.3f} (goal <= 0.9)")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
