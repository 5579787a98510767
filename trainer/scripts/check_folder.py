"""check_folder.py MODEL_DIR: loads a trainer-written folder with diffusers/transformers and
compares each component's key set and shapes with what diffusers' own model of that config
has (missing or unexpected keys would be silently random/ignored there)."""

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def strip(key):
    """A text-encoder key without the `text_model.` prefix (transformers 5 drops it; SD files keep it)."""
    return key[len("text_model.") :] if key.startswith("text_model.") else key


d = Path(sys.argv[1])
ok = True
for name, cls, file in [
    ("vae", AutoencoderKL, "diffusion_pytorch_model.safetensors"),
    ("unet", UNet2DConditionModel, "diffusion_pytorch_model.safetensors"),
    ("text_encoder", None, "model.safetensors"),
]:
    if cls is None:
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(d / name))
    else:
        model = cls.from_config(cls.load_config(d / name))
    want = {strip(k): tuple(v.shape) for k, v in model.state_dict().items()}
    have = {strip(k): tuple(v.shape) for k, v in load_file(d / name / file).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    # transformers registers position_ids as a (non-persistent in new versions) buffer
    missing = [k for k in missing if not k.endswith("position_ids")]
    print(
        f"{name}: {len(have)} tensors; missing {missing[:5]} ({len(missing)}), "
        f"unexpected {extra[:5]} ({len(extra)}), shape mismatches {shape[:5]}"
    )
    ok &= not missing and not extra and not shape
tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
print("tokenizer", len(tok), tok.model_max_length, tok("a red circle on the left on a white background").input_ids)
pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, torch_dtype=torch.float32)
img = pipe(
    "a red circle on the left on a white background", height=64, width=64, num_inference_steps=2, output_type="np"
).images
print("diffusers pipeline ran:", img.shape)
print("OK" if ok else "KEY MISMATCH")
