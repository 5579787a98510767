"""`make bench`: Frisket against diffusers on the same machine, in one run.

Builds (once, cached) a mid-size random SD-1-style model, 128/256/256 channels, and renders
the same job at 256×256 with diffusers and with `frisket-server render`, then prints seconds
per denoising step for each and the ratio. Then the service's streaming overhead: the same
job through `frisket-server serve` + `frisket generate` with a preview and the latent every
step, against `render`, and the time to the first preview against one step (for the prompt
of the job before, as the goal measures it, and for a new prompt, which the server must encode).
Last, Grad-SAM: per manipulated step, the attribution time of fast mode (256 px) and of
exact mode (64 px: one backward pass per latent element) against a plain step at the same
size, and a whole `--preset paper` job against plain img2img with the same steps. Then the
SDXL-layout mid-size model against diffusers; full-size random SD 1.5 at 512² against
diffusers, where the channel counts make Frisket's choice of convolution kernels count (and
with every convolution forced direct); and switching LoRA sets between jobs on that model
(rank-32 LoRAs on every attention projection) against loading it.
The machine (CPU, extensions, sgemm rate) comes first, then the per-shape table of 3×3
convolution kernels (oneDNN direct against Winograd, engine/examples/conv_bench.rs), and
each engine's step rate is printed in GFLOP/s beside that ceiling.
Usage: bench.py FRISKET_SERVER_BINARY FRISKET_CLIENT_BINARY CONV_BENCH_BINARY CACHE_DIR
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from clip_vocab import write_vocab  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from gpu_check import build_sd15  # noqa: E402

STEPS, SIZE, SEED, GUIDANCE = 6, 256, 7, 7.5
# Rounds of diffusers then Frisket, alternated so that background load hits both alike.
ROUNDS = 3
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
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=4,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    write_vocab(folder / "tokenizer", cache / "downloads")
    tok = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"))
    tok.model_max_length = 77
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def build_sdxl_model(folder: Path, cache: Path) -> None:
    """A mid-size model in SDXL's layout: no attention in the first block, transformer depth
    per block, two text encoders (CLIP-L width and OpenCLIP-bigG width, 4 layers each) whose
    penultimate states make the 2048-wide context, and the size/crop conditioning."""
    if (folder / "model_index.json").exists():
        return
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        block_out_channels=(128, 256, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        layers_per_block=2,
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=0.13025,
        force_upcast=True,
    )

    def text_config(hidden: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=4,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=hidden,
            bos_token_id=49406,
            eos_token_id=49407,
        )

    tokenizers = []
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_vocab(folder / sub, cache / "downloads")
        tok = CLIPTokenizer(str(folder / sub / "vocab.json"), str(folder / sub / "merges.txt"), pad_token=pad)
        tok.model_max_length = 77
        tokenizers.append(tok)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config(768, 12, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(text_config(1280, 20, "gelu")),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
    )
    pipe.save_pretrained(folder)


def diffusers_step_times(folder: Path, pipeline=StableDiffusionPipeline, size=SIZE, steps=STEPS) -> list:
    pipe = pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    start = time.perf_counter()
    pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        width=size,
        height=size,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        callback_on_step_end=on_step,
    )
    return [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]


def frisket_step_times(binary: str, folder: Path, forced: dict | None = None, size=SIZE, steps=STEPS) -> list:
    """`render`'s step times, the first (warm-up) left out."""
    return frisket_timings(binary, folder, forced, size, steps)["step_seconds"][1:]


def frisket_timings(binary: str, folder: Path, forced: dict | None = None, size=SIZE, steps=STEPS) -> dict:
    """`render --timings` of the bench job; `forced` holds kernel overrides such as
    {"FRISKET_CPU_LINEAR": "mkl"} (None: the machine's choices, which the timings'
    `cpu_linear` and `cpu_conv` name)."""
    env = dict(os.environ) | (forced or {})
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        subprocess.run(
            [
                binary,
                "render",
                "--model",
                str(folder),
                "--prompt",
                PROMPT,
                "--steps",
                str(steps),
                "--guidance",
                str(GUIDANCE),
                "--seed",
                str(SEED),
                "--width",
                str(size),
                "--height",
                str(size),
                "--scheduler",
                "ddim",
                "--out",
                str(Path(tmp) / "out.png"),
                "--quiet",
                "--timings",
                str(timings),
            ],
            check=True,
            env=env,
        )
        return json.loads(timings.read_text())


def streamed_job(args: list) -> tuple:
    """Runs one `frisket generate --json`: (stamps of its Step events, Started → first Preview)."""
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    started, first_preview, step_stamps = None, None, []
    for line in client.stdout:
        now, event = time.perf_counter(), json.loads(line)["event"]
        if event == "started":
            started = now
        elif event == "step":
            step_stamps.append(now)
        elif event == "preview" and first_preview is None:
            first_preview = now
    assert client.wait() == 0
    return step_stamps, first_preview - started


def streamed_step_times(server_bin: str, client_bin: str, folder: Path) -> tuple:
    """Per-step wall times seen by a client receiving a preview and the latent every step,
    the time from Started to the first preview, and that time again for a job whose prompt
    the server has not encoded before (the server caches recent prompts' encodings, and the
    first job, which loads the model, has the same prompt)."""
    # The server lists the cache's model folders (a symlink out of --models is refused).
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [server_bin, "serve", "--models", str(folder.parent), "--listen", "127.0.0.1:0", "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            line = server.stdout.readline()
            url = "http://" + line.strip().rsplit(" ", 1)[-1]
            args = [
                client_bin,
                "generate",
                "--server",
                url,
                "--model",
                folder.name,
                "--prompt",
                PROMPT,
                "--seed",
                str(SEED),
                "--guidance",
                str(GUIDANCE),
                "--width",
                str(SIZE),
                "--height",
                str(SIZE),
                "--scheduler",
                "ddim",
                "--out",
                str(Path(tmp) / "out.png"),
                "--json",
            ]
            subprocess.run(args + ["--steps", "1"], check=True, stdout=subprocess.DEVNULL)  # loads the model
            stream = ["--steps", str(STEPS), "--preview-every", "1", "--latents-every", "1"]
            step_stamps, first_preview = streamed_job(args + stream)
            new_prompt = [a if a != PROMPT else PROMPT + ", seen from the sea" for a in args]
            _, first_preview_new_prompt = streamed_job(new_prompt + stream)
        finally:
            server.terminate()
            server.wait()
    steps = [b - a for a, b in zip(step_stamps, step_stamps[1:])]
    return steps, first_preview, first_preview_new_prompt


def reference_png(path: Path, size: int) -> None:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.4 * np.sin(7 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(9 * (x + y))], -1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)


def render_timings(binary: str, folder: Path, args: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        subprocess.run(
            [
                binary,
                "render",
                "--model",
                str(folder),
                "--prompt",
                PROMPT,
                "--seed",
                str(SEED),
                "--out",
                str(Path(tmp) / "out.png"),
                "--quiet",
                "--timings",
                str(timings),
            ]
            + args,
            check=True,
        )
        return json.loads(timings.read_text())


def explain_bench(binary: str, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ref256, ref64 = Path(tmp) / "ref256.png", Path(tmp) / "ref64.png"
        reference_png(ref256, SIZE)
        reference_png(ref64, 64)
        paper = ["--steps", "50", "--guidance", "8", "--strength", "0.9", "--scheduler", "ddpm"]
        plain = render_timings(binary, folder, ["--reference", str(ref256)] + paper)
        fast = render_timings(
            binary, folder, ["--reference", str(ref256), "--preset", "paper", "--subject", "lighthouse"]
        )
        small = [
            "--reference",
            str(ref64),
            "--steps",
            "10",
            "--strength",
            "0.9",
            "--scheduler",
            "ddim",
            "--subject",
            "lighthouse",
            "--manipulate-at",
            "780",
        ]
        exact = render_timings(binary, folder, small + ["--explain", "exact"])
        fast64 = render_timings(binary, folder, small + ["--explain", "fast"])
    plain_step = statistics.median(plain["step_seconds"][1:])
    fast_attr = statistics.median(e["seconds"] for e in fast["explain_seconds"])
    manipulated = [fast["step_seconds"][e["step"]] for e in fast["explain_seconds"]]
    print(
        f"Grad-SAM fast (last layer, {SIZE}px): attribution {fast_attr:.3f} s per manipulated step = "
        f"{fast_attr / plain_step:.2f}x a plain step ({plain_step:.3f} s); whole manipulated step "
        f"{statistics.median(manipulated) / plain_step:.2f}x (goal: fast <= 3x)"
    )
    small_step = statistics.median(exact["step_seconds"][2:])
    exact_attr = exact["explain_seconds"][0]["seconds"]
    fast64_attr = fast64["explain_seconds"][0]["seconds"]
    print(
        f"Grad-SAM exact (last layer, 64px, 256 latent elements): {exact_attr:.3f} s = "
        f"{exact_attr / small_step:.1f}x a plain step ({small_step:.3f} s); "
        f"fast at 64px {fast64_attr / small_step:.2f}x"
    )
    print(
        f"--preset paper job (45 steps, 3 manipulations) {fast['total_seconds']:.2f} s vs plain img2img "
        f"{plain['total_seconds']:.2f} s: {fast['total_seconds'] / plain['total_seconds']:.3f}x"
    )


def cfg_step_gflop(folder: Path) -> float:
    """GFLOP of one classifier-free-guidance UNet call (batch 2) at the bench size."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    latent = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.zeros(2, 6)}
    return machine.flops(unet, latent, torch.tensor([500, 500]), context, **extra) / 1e9


def alternate(theirs_round, ours_round, rounds=ROUNDS) -> tuple:
    """`rounds` rounds of diffusers' step times (`theirs_round()`) then Frisket's
    (`ours_round()`), alternated so that background load hits both alike: the pooled medians
    (theirs, ours) and each round's ratio of medians."""
    theirs, ours, ratios = [], [], []
    for _ in range(rounds):
        with torch.no_grad():
            their_round = theirs_round()
        our_round = ours_round()
        theirs, ours = theirs + their_round, ours + our_round
        ratios.append(statistics.median(our_round) / statistics.median(their_round))
    return statistics.median(theirs), statistics.median(ours), ratios


def round_spread(ratios: list) -> str:
    """The ratios of each alternation round (medians of that round's steps): how much the
    machine's background load moved the figure during the run."""
    return f"per round {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)}"


def print_rates(theirs: float, ours: float, gflop: float, ceiling: float) -> None:
    for name, seconds in (("diffusers", theirs), ("frisket  ", ours)):
        rate = gflop / seconds
        print(
            f"{name} {seconds:.3f} s/step, {rate:.1f} GFLOP/s "
            f"({gflop:.1f} GFLOP per CFG step; {100 * rate / ceiling:.0f} % of sgemm {ceiling} GFLOP/s)"
        )


def main(server_bin: str, client_bin: str, conv_bench_bin: str, cache: Path) -> None:
    ceiling = machine.describe()["sgemm_gflops"]
    # The per-shape table behind Frisket's choice of convolution kernels on this machine.
    subprocess.run([conv_bench_bin], check=True)
    folder = cache / "bench-model-128-256-256"
    build_model(folder, cache)
    gflop = cfg_step_gflop(folder)
    print(
        f"mid-size SD1-style UNet (128/256/256), {SIZE}x{SIZE}, CFG batch 2, {STEPS} DDIM steps, "
        f"{torch.get_num_threads()} threads; medians, first step excluded (warm-up)"
    )
    # Frisket runs with the machine's choice of kernels and, in the same rounds, with each
    # linear-layer choice forced and with every convolution direct (no Winograd).
    chosen = set()
    forced = {
        ("FRISKET_CPU_LINEAR", "onednn"): [],
        ("FRISKET_CPU_LINEAR", "mkl"): [],
        ("FRISKET_CPU_CONV", "direct"): [],
    }

    def ours_round() -> list:
        timing = frisket_timings(server_bin, folder)
        chosen.add(f"linear {timing['cpu_linear']}, 3x3 convolutions {timing['cpu_conv']}")
        for (name, value), times in forced.items():
            times += frisket_step_times(server_bin, folder, {name: value})
        return timing["step_seconds"][1:]

    theirs, ours, rounds = alternate(lambda: diffusers_step_times(folder), ours_round)
    print_rates(theirs, ours, gflop, ceiling)
    print(f"ratio frisket/diffusers {ours / theirs:.3f} (goal <= 0.9); {round_spread(rounds)}")
    print(f"Frisket's float32 kernels on this machine: {'; '.join(sorted(chosen))}; forced:")
    for (name, value), times in forced.items():
        print(f"  {name}={value}: ratio frisket/diffusers {statistics.median(times) / theirs:.3f}")

    streamed, first_preview, first_preview_new_prompt = streamed_step_times(server_bin, client_bin, folder)
    plain = statistics.median(frisket_step_times(server_bin, folder))
    streamed = statistics.median(streamed)
    print(
        f"service, preview+latent every step: {streamed:.3f} s/step, render {plain:.3f} s/step, "
        f"ratio {streamed / plain:.3f} (goal <= 1.05)"
    )
    print(
        f"time to first preview {first_preview:.3f} s, one step {plain:.3f} s, "
        f"ratio {first_preview / plain:.3f} (goal <= 1.2)"
    )
    print(
        f"  with a prompt not encoded before: {first_preview_new_prompt:.3f} s, "
        f"ratio {first_preview_new_prompt / plain:.3f}"
    )
    explain_bench(server_bin, folder)
    sdxl_bench(server_bin, cache, ceiling)
    full_size_bench(server_bin, cache)
    lora_switch_bench(server_bin, client_bin, cache)


def sdxl_bench(server_bin: str, cache: Path, ceiling: float) -> None:
    folder = cache / "bench-sdxl-128-256-256"
    build_sdxl_model(folder, cache)
    gflop = cfg_step_gflop(folder)
    theirs, ours, rounds = alternate(
        lambda: diffusers_step_times(folder, StableDiffusionXLPipeline), lambda: frisket_step_times(server_bin, folder)
    )
    print(f"mid-size SDXL-layout UNet (128/256/256, depth 1/2/2, context 2048), {SIZE}x{SIZE}, {STEPS} DDIM steps")
    print_rates(theirs, ours, gflop, ceiling)
    print(f"ratio frisket/diffusers {ours / theirs:.3f} (goal <= 0.9); {round_spread(rounds)}")


FULL_SIZE, FULL_STEPS, FULL_ROUNDS = 512, 3, 2


def full_size_bench(server_bin: str, cache: Path) -> None:
    """Full-size SD 1.5 (random weights) at its native 512², where the 3×3 convolutions have
    the channel counts (320 to 2560) at which Frisket's kernel choice matters: Frisket with
    the machine's choice and with every convolution direct, against diffusers."""
    folder = cache / "bench-sd15-full"
    if not (folder / "model_index.json").exists():
        build_sd15(folder, cache)
    direct = []

    def ours_round() -> list:
        direct.extend(frisket_step_times(server_bin, folder, {"FRISKET_CPU_CONV": "direct"}, FULL_SIZE, FULL_STEPS))
        return frisket_step_times(server_bin, folder, None, FULL_SIZE, FULL_STEPS)

    theirs, ours, ratios = alternate(
        lambda: diffusers_step_times(folder, StableDiffusionPipeline, FULL_SIZE, FULL_STEPS), ours_round, FULL_ROUNDS
    )
    print(
        f"full-size SD 1.5 UNet (random weights, float32), {FULL_SIZE}x{FULL_SIZE}, CFG batch 2, "
        f"{FULL_STEPS} steps (first excluded), {FULL_ROUNDS} rounds: diffusers {theirs:.2f} s/step, "
        f"frisket {ours:.2f} s/step; ratio frisket/diffusers {ours / theirs:.3f}; {round_spread(ratios)}"
    )
    direct = statistics.median(direct)
    print(f"  FRISKET_CPU_CONV=direct: {direct:.2f} s/step, ratio {direct / theirs:.3f}")


def write_kohya_lora(unet: UNet2DConditionModel, path: Path, rank: int, seed: int) -> int:
    """A kohya-layout LoRA (fp16 down/up, alpha = rank) on every linear projection inside
    the UNet's attention blocks; returns how many modules it changes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            state[f"{key}.lora_down.weight"] = down.half()
            state[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=g) * 0.01).half()
            state[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    save_file(state, path)
    return len(state) // 3


def lora_switch_bench(server_bin: str, client_bin: str, cache: Path) -> None:
    folder = cache / "bench-sd15-full"
    if not (folder / "model_index.json").is_file():
        build_sd15(folder, cache)
    loras = cache / "bench-sd15-loras"
    if not (loras / "b.safetensors").is_file():
        loras.mkdir(exist_ok=True)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        for i, name in enumerate(["a", "b"]):
            write_kohya_lora(unet, loras / f"{name}.safetensors", 32, i)
        del unet
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [server_bin, "serve", "--models", str(cache), "--loras", str(loras), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            url = "http://" + server.stdout.readline().strip().rsplit(" ", 1)[-1]
            base = [client_bin, "generate", "--server", url, "--model", folder.name, "--prompt", PROMPT]
            base += ["--steps", "1", "--width", "64", "--height", "64", "--out", str(Path(tmp) / "o.png"), "--json"]
            timings = []
            for loras_of_job in [[], ["a"], ["b"], ["a", "b:0.5"], ["a"], []]:
                args = base + [x for name in loras_of_job for x in ("--lora", name)]
                out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
                result = next(json.loads(line) for line in out.splitlines() if '"event":"result"' in line)
                timings.append((loras_of_job, result["timings"]))
        finally:
            server.terminate()
            server.wait()
    load = timings[0][1]["model_load_seconds"]
    from safetensors import safe_open

    with safe_open(loras / "a.safetensors", "pt") as f:
        modules = sum(k.endswith(".alpha") for k in f.keys())
    print(f"LoRA switching on a full-size random SD 1.5 (rank 32, {modules} modules): model load {load:.2f} s")
    for (before, _), (after, t) in zip(timings, timings[1:]):
        print(
            f"  {'+'.join(before) or 'none'} -> {'+'.join(after) or 'none'}: {t['lora_seconds']:.2f} s "
            f"({t['lora_seconds'] / load:.3f}x the load; reload {t['model_load_seconds']:.2f} s)"
        )
    switch = statistics.median(t["lora_seconds"] for _, t in timings[2:5])
    plain, extra = side_path_step_seconds(folder, loras / "a.safetensors")
    print(
        f"  the alternative, a side path (the LoRA applied unmerged, a hook on each module; PyTorch): "
        f"+{extra:.3f} s per 512² CFG UNet call of {plain:.2f} s ({100 * extra / plain:.1f} %); "
        f"merging ({switch:.2f} s per switch) costs less than the side path once a job set runs "
        f"{switch / extra:.1f} steps"
    )


def side_path_step_seconds(folder: Path, lora_file: Path) -> tuple:
    """Seconds of one UNet call at 512² with CFG (batch 2), and the seconds a kohya LoRA
    applied as a side path (x·downᵀ·upᵀ·alpha/rank added to each module's output) adds to
    it, timed inside the hooks (the whole call's run-to-run noise is larger than that)."""
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32).eval()
    lora = {k: v.float() for k, v in load_file(lora_file).items()}
    latents, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)

    def timed() -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            with torch.no_grad():
                unet(latents, 500, encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
        return min(times)

    plain = timed()
    spent = [0.0]
    hooks = []
    for name, module in unet.named_modules():
        key = "lora_unet_" + name.replace(".", "_")
        if f"{key}.lora_down.weight" in lora:
            down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
            scale = lora[f"{key}.alpha"].item() / down.shape[0]

            def side(_m, inputs, output, down=down, up=up, scale=scale):
                start = time.perf_counter()
                output = output + (inputs[0] @ down.T) @ up.T * scale
                spent[0] += time.perf_counter() - start
                return output

            hooks.append(module.register_forward_hook(side))
    timed()  # two calls
    for h in hooks:
        h.remove()
    return plain, spent[0] / 2


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
