"""check_clip.py CLIP_DIR IMAGES_DIR PROMPTS_FILE: loads a CLIPModel folder with transformers
(every weight used, none missing) and prints torchmetrics' CLIPScore of the images (sorted by
name) with their prompts (one a line) as JSON: {"score": s, "pairs": [per-image scores]}."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

# The CLIPScore adapter the evaluator's parity fixture uses (one definition).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
from ref_eval import _Features  # noqa: E402

folder, images_dir, prompts_file = (Path(a) for a in sys.argv[1:4])
model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
if missing or info["unexpected_keys"] or info["mismatched_keys"]:
    sys.exit(f"{folder}: missing {missing}, unexpected {info['unexpected_keys']}, mismatched {info['mismatched_keys']}")
model = model.float().eval()
prompts = prompts_file.read_text().splitlines()
files = sorted(images_dir.glob("*.png"))
images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]


def score(imgs, texts):
    metric = CLIPScore(model_name_or_path=lambda: (_Features(model), CLIPProcessor.from_pretrained(folder)))
    metric.update(imgs, texts)
    return float(metric.compute())


print(json.dumps({"score": score(images, prompts), "pairs": [score([i], [p]) for i, p in zip(images, prompts)]}))
