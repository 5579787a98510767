"""`make gpu-check`: Frisket against diffusers on a CUDA GPU, full-size models, in one run.

Builds (once, cached) random-weight models in the full SD 1.5 and SDXL base architectures,
fp16 diffusers folders, then renders the same txt2img job with diffusers and with
`frisket-server render --device cuda:0` (SD 1.5 at 512², SDXL at 1024²) and prints, per
model: seconds per step (medians, first step excluded), the speed ratio, peak GPU memory of
each engine (the card's memory in use, from nvidia-smi, so diffusers' figure includes this
process's CUDA context as Frisket's includes its own), and the difference between the two
images (max and mean, in 1/255). Then step-level batching on the GPU: `frisket-load`
against `frisket-server serve --device cuda:0 --max-batch 8` on the SD 1.5 model at 512²,
with 1, 2, 4 and 8 concurrent clients, so the worker steps batches of that many jobs:
images/s, seconds per step of a job (its job time over its steps), the batch sizes the
server logged, and images/s against one client (goal: ≥ 1.25× at 4).
Random weights make images of noise-like texture; equal images still show equal arithmetic.
Usage: gpu_check.py FRISKET_SERVER_BINARY FRISKET_LOAD_BINARY CACHE_DIR [OUT_JSON]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from clip_vocab import write_vocab  # noqa: E402

STEPS, SEED, GUIDANCE = 20, 11, 7.0
PROMPT = "a watercolour lighthouse on a cliff at dusk"
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)


def clip_l(projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def clip_big_g():
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )


def vae(sample_size: int, scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def tokenizer(folder: Path, cache: Path, pad: str) -> CLIPTokenizer:
    write_vocab(folder, cache / "downloads")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad)
    tok.model_max_length = 77
    return tok


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sdxl_unet() -> UNet2DConditionModel:
    """The SDXL base UNet (stable-diffusion-xl-base-1.0's config)."""
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        layers_per_block=2,
    )


def build_sd15(folder: Path, cache: Path) -> None:
    torch.manual_seed(0)
    unet = sd15_unet()
    pipe = StableDiffusionPipeline(
        vae=vae(512, 0.18215, False),
        text_encoder=clip_l(),
        tokenizer=tokenizer(folder / "_tok", cache, "<|endoftext|>"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder)


def build_sdxl(folder: Path, cache: Path) -> None:
    torch.manual_seed(0)
    unet = sdxl_unet()
    pipe = StableDiffusionXLPipeline(
        vae=vae(1024, 0.13025, True),
        text_encoder=clip_l(),
        text_encoder_2=clip_big_g(),
        tokenizer=tokenizer(folder / "_tok", cache, "<|endoftext|>"),
        tokenizer_2=tokenizer(folder / "_tok2", cache, "!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.to(torch.float16).save_pretrained(folder)


class GpuMemoryPoll:
    """Peak memory used on GPU 0 while a child process runs, from nvidia-smi every 50 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            ).stdout
            if out.strip():
                self.peak = max(self.peak, int(out.split()[0]))
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def diffusers_run(folder: Path, xl: bool, size: int, out: Path) -> dict:
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    with GpuMemoryPoll() as poll:
        start = time.perf_counter()
        image = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=size,
            height=size,
            generator=torch.Generator().manual_seed(SEED),
            callback_on_step_end=on_step,
        ).images[0]
    image.save(out)
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]
    del pipe
    torch.cuda.empty_cache()
    return {"s_per_step": statistics.median(steps), "peak_mib": poll.peak}


def frisket_run(binary: str, folder: Path, size: int, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        args = [binary, "render", "--model", str(folder), "--device", "cuda:0", "--prompt", PROMPT]
        args += ["--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", str(SEED), "--scheduler", "euler"]
        args += ["--width", str(size), "--height", str(size), "--out", str(out), "--quiet", "--timings", str(timings)]
        with GpuMemoryPoll() as poll:
            subprocess.run(args, check=True)
        steps = json.loads(timings.read_text())["step_seconds"][1:]
    return {"s_per_step": statistics.median(steps), "peak_mib": poll.peak}


BATCH_CLIENTS = (1, 2, 4, 8)
BATCH_JOBS_PER_CLIENT = 2


def batch_run(server_bin: str, load_bin: str, models: Path, out: Path, device="cuda:0", size=512) -> dict:
    """frisket-load's runs of the sd15 model at each client count, read from its --out JSON."""
    flags = f"--device {device} --max-batch 8 --queue-capacity 16 --max-jobs-per-connection 16"
    args = [load_bin, "--models", str(models), "--model", "sd15", "--prompt", PROMPT]
    args += ["--steps", str(STEPS), "--size", str(size), "--jobs", str(BATCH_JOBS_PER_CLIENT)]
    args += ["--concurrency", ",".join(map(str, BATCH_CLIENTS)), "--setting", f"gpu-batch={flags}", "--out", str(out)]
    env = {
        **os.environ,
        "FRISKET_SERVER_BIN": server_bin,
        "FRISKET_TEST_RUST_LOG": "info,frisket_server::service::worker=debug",
    }
    subprocess.run(args, check=True, env=env)
    runs = {r["result"]["concurrency"]: r["result"] for r in json.loads(out.read_text())["runs"]}
    single = runs[1]["jobs_per_second"]
    return {
        str(c): {
            "images_per_s": r["jobs_per_second"],
            "against_one_client": r["jobs_per_second"] / single if single else None,
            "s_per_step_p50": r["job_seconds"]["p50"] / STEPS if r["job_seconds"]["p50"] else None,
            "batch_sizes": r["batch_sizes"],
            "codes": r["codes"],
        }
        for c, r in sorted(runs.items())
    }


def compare(a: Path, b: Path) -> dict:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    d = np.abs(x - y)
    return {"max_diff_255": float(d.max()), "mean_diff_255": float(d.mean())}


def main(server_bin: str, load_bin: str, cache: Path, out_json: Path | None) -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}; fp16; {STEPS} steps")
    report = {"gpu": props.name, "torch": torch.__version__, "steps": STEPS, "models": {}}
    # One folder of fp16 models, so frisket-server serve can list them (--models).
    models = cache / "gpu-check-models"
    for name, build, xl, size in (("sd15", build_sd15, False, 512), ("sdxl", build_sdxl, True, 1024)):
        folder = models / name
        if not (folder / "model_index.json").exists():
            build(folder, cache)
        with tempfile.TemporaryDirectory() as tmp:
            theirs_png, ours_png = Path(tmp) / "diffusers.png", Path(tmp) / "frisket.png"
            theirs = diffusers_run(folder, xl, size, theirs_png)
            ours = frisket_run(server_bin, folder, size, ours_png)
            diff = compare(ours_png, theirs_png)
        speed = theirs["s_per_step"] / ours["s_per_step"]
        report["models"][name] = {"size": size, "diffusers": theirs, "frisket": ours, "image": diff, "speed": speed}
        print(
            f"{name} {size}²: diffusers {theirs['s_per_step']:.4f} s/step (peak {theirs['peak_mib']} MiB), "
            f"frisket {ours['s_per_step']:.4f} s/step (peak {ours['peak_mib']} MiB); "
            f"frisket speed {speed:.2f}x diffusers (goal >= 1.0); image max "
            f"{diff['max_diff_255']:.0f}/255, mean {diff['mean_diff_255']:.2f}/255"
        )
    with tempfile.TemporaryDirectory() as tmp:
        report["batching_sd15_512"] = batch_run(server_bin, load_bin, models, Path(tmp) / "load.json")
    for c, r in report["batching_sd15_512"].items():
        print(
            f"sd15 512² fp16, {c} client(s) at --max-batch 8: {r['images_per_s']:.3f} images/s "
            f"({r['against_one_client']:.2f}x one client; goal >= 1.25 at 4), "
            f"{r['s_per_step_p50']:.4f} s/step per job, batch sizes {r['batch_sizes']}, codes {r['codes']}"
        )
    if out_json:
        out_json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None)
