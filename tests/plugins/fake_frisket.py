#!/usr/bin/env python3
"""A stand-in for the `frisket` client that speaks JSON-lines format v1 exactly as
client/README.md documents it, including the events today's server does not send yet
(Grad-SAM `mask` / `heatmap`, the protected-region mask, PSNR). The plugin tests use it as a
contract test of the plugins' side: event handling, layers, the protected region kept bit
for bit. The real-server tests (test_krita.py, test_gimp_core.py) check the same things
end to end.

generate: the result keeps every protected pixel (non-zero in --protect) and inverts the
others; previews, masks and heatmaps are small grey images at "latent size" (1/4).
Also: models, tokenize, cancel (always found), info.
"""

import argparse
import json
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "plugins", "common"))
import frisket_core as core  # noqa: E402


def emit(obj):
    keys = ["v", "event", "job_id"]
    ordered = {k: obj[k] for k in keys if k in obj}
    ordered.update({k: v for k, v in obj.items() if k not in keys})
    sys.stdout.write(json.dumps(ordered, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def write_npy(path, shape, values):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % (tuple(shape),)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack("<%df" % len(values), *values))


def generate(a):
    job = a.job_id or "fake-job-1"
    if not a.reference:
        emit(
            {
                "v": 1,
                "event": "error",
                "job_id": job,
                "code": "INVALID_ARGUMENT",
                "message": "the fake client needs --reference",
                "exit_code": 1,
            }
        )
        return 1
    w, h, ch, ref = core.read_png(a.reference)
    rgb = ref if ch == 3 else core.rgba_to_rgb(ref, w, h) if ch == 4 else bytes(v for v in ref for _ in range(3))
    mask = bytes(w * h)
    if a.protect:
        mw, mh, mc, mask = core.read_png(a.protect)
        if (mw, mh) != (w, h):
            emit(
                {
                    "v": 1,
                    "event": "error",
                    "job_id": job,
                    "code": "INVALID_ARGUMENT",
                    "message": "protected_mask is %dx%d but reference_image is %dx%d" % (mw, mh, w, h),
                    "exit_code": 1,
                }
            )
            return 1
        mask = mask[::mc]
    steps = a.steps or 20
    run = max(1, int(round(steps * (a.strength if a.strength is not None else 0.8))))
    seed = a.seed if a.seed is not None else 1234
    lw, lh = max(1, w // 4), max(1, h // 4)
    dump = a.dump_dir
    if dump:
        os.makedirs(dump, exist_ok=True)
    timesteps = [float(999 - i * (999 // run)) for i in range(run)]
    emit({"v": 1, "event": "queued", "job_id": job, "position": 0})
    emit(
        {
            "v": 1,
            "event": "started",
            "job_id": job,
            "total_steps": run,
            "timesteps": timesteps,
            "seed": seed,
            "width": w,
            "height": h,
        }
    )
    explain = a.explain in ("fast", "exact")
    for k, t in enumerate(timesteps):
        time.sleep(0.02)
        emit(
            {
                "v": 1,
                "event": "step",
                "job_id": job,
                "index": k,
                "total": run,
                "timestep": t,
                "elapsed_seconds": 0.02 * (k + 1),
            }
        )
        if (
            a.preview_every is not None
            and dump
            and (a.preview_every == 0 or (k + 1) % a.preview_every == 0 or k == run - 1)
        ):
            p = os.path.join(dump, "preview_%d.png" % k)
            core.write_png(p, lw, lh, 3, bytes(((x * 9 + k * 40) & 255) for x in range(lw * lh * 3)))
            emit(
                {
                    "v": 1,
                    "event": "preview",
                    "job_id": job,
                    "step": k,
                    "timestep": t,
                    "mime_type": "image/png",
                    "width": lw,
                    "height": lh,
                    "path": p,
                }
            )
        if explain and dump and k == 0:
            for kind, stem in (("manipulation", "mask_%d" % k), ("protected", "protected_mask_%d" % k)):
                vals = [float((x + y) % 2) for y in range(lh) for x in range(lw)]
                png = os.path.join(dump, stem + ".png")
                npy = os.path.join(dump, stem + ".npy")
                core.write_png(png, lw, lh, 1, bytes(int(v * 255) for v in vals))
                write_npy(npy, [1, 1, lh, lw], vals)
                emit(
                    {
                        "v": 1,
                        "event": "mask",
                        "job_id": job,
                        "step": k,
                        "timestep": t,
                        "kind": kind,
                        "shape": [1, 1, lh, lw],
                        "reference_fraction": 0.5,
                        "path": png,
                        "npy": npy,
                    }
                )
            for i, word in enumerate(a.subject or ["circle"]):
                index = 3 + i
                stem = "heatmap_%d_tok%d" % (k, index)
                vals = [float(x * y) for y in range(lh) for x in range(lw)]
                npy = os.path.join(dump, stem + ".npy")
                write_npy(npy, [4, lh, lw], vals * 4)
                event = {
                    "v": 1,
                    "event": "heatmap",
                    "job_id": job,
                    "step": k,
                    "timestep": t,
                    "token_index": index,
                    "token": word + "</w>",
                    "shape": [4, lh, lw],
                    "npy": npy,
                }
                if i == 0:  # the first with a PNG, the others .npy only (the plugin must cope)
                    png = os.path.join(dump, stem + ".png")
                    core.write_png(png, lw, lh, 3, bytes((x * 5) & 255 for x in range(lw * lh * 3)))
                    event["path"] = png
                    mask_png = os.path.join(dump, stem + "_mask.png")
                    core.write_png(
                        mask_png, w, h, 1, bytes(255 if x < w // 2 else 0 for _y in range(h) for x in range(w))
                    )
                    event["subject_mask"] = mask_png
                emit(event)
    out = bytearray(rgb)
    for i in range(w * h):
        if not mask[i]:
            for c in range(3):
                out[3 * i + c] = 255 - out[3 * i + c]
    core.write_png(a.out, w, h, 3, bytes(out))
    result = {
        "v": 1,
        "event": "result",
        "job_id": job,
        "seed": seed,
        "mime_type": "image/png",
        "width": w,
        "height": h,
        "path": a.out,
        "settings": {
            "model": a.model,
            "prompt": a.prompt,
            "negative_prompt": a.negative_prompt or "",
            "seed": seed,
            "steps": steps,
            "guidance": 7.5,
            "scheduler": "ddim",
            "width": w,
            "height": h,
            "img2img": True,
            "strength": a.strength or 0.8,
        },
        "timings": {
            "queued_seconds": 0.0,
            "total_seconds": 0.02 * run,
            "seconds_per_step": 0.02,
            "decode_seconds": 0.0,
        },
    }
    if a.protect:
        result["psnr_protected"] = "inf"
        result["psnr_outside"] = 5.0
    if dump:
        rp = os.path.join(dump, "result.png")
        core.write_png(rp, w, h, 3, bytes(out))
        cm = os.path.join(dump, "change_map.png")
        core.write_png(cm, w, h, 1, bytes(0 if m else 255 for m in mask))
        with open(os.path.join(dump, "manifest.json"), "w") as f:
            json.dump([], f)
        result.update(dump_path=rp, change_map=cm, manifest=os.path.join(dump, "manifest.json"))
    emit(result)
    return 0


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="http://127.0.0.1:50051")
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    g = sub.add_parser("generate")
    for name in (
        "--server",
        "--model",
        "--prompt",
        "--negative-prompt",
        "--reference",
        "--protect",
        "--out",
        "--dump-dir",
        "--job-id",
        "--explain",
        "--scheduler",
        "--layers",
    ):
        g.add_argument(name)
    for name in ("--seed", "--steps", "--preview-every", "--width", "--height"):
        g.add_argument(name, type=int)
    for name in ("--strength", "--guidance"):
        g.add_argument(name, type=float)
    g.add_argument("--subject", action="append")
    for flag in ("--json", "--masks", "--heatmaps"):
        g.add_argument(flag, action="store_true")
    c = sub.add_parser("cancel")
    c.add_argument("job_id")
    c.add_argument("--json", action="store_true")
    c.add_argument("--server")
    m = sub.add_parser("models")
    m.add_argument("--json", action="store_true")
    m.add_argument("--server")
    t = sub.add_parser("tokenize")
    t.add_argument("prompt")
    t.add_argument("--model")
    t.add_argument("--json", action="store_true")
    t.add_argument("--server")
    a = p.parse_args(argv)
    if a.cmd == "generate":
        return generate(a)
    if a.cmd == "cancel":
        emit({"v": 1, "job_id": a.job_id, "found": True})
        return 0
    if a.cmd == "models":
        emit(
            {
                "v": 1,
                "models": [
                    {
                        "name": "fake",
                        "architecture": "sd1",
                        "native_width": 64,
                        "native_height": 64,
                        "size_multiple": 4,
                        "prediction_type": "epsilon",
                        "schedulers": ["ddim"],
                        "img2img": True,
                        "explain": True,
                        "protected_regions": True,
                    }
                ],
            }
        )
        return 0
    if a.cmd == "tokenize":
        words = a.prompt.split()
        tokens = [{"index": 0, "id": 49406, "text": "<|startoftext|>", "word": "", "word_index": None}]
        tokens += [
            {"index": i + 1, "id": 1000 + i, "text": w + "</w>", "word": w, "word_index": i}
            for i, w in enumerate(words)
        ]
        emit({"v": 1, "tokens": tokens, "truncated": False})
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
