"""Layer names."""

PREVIEW_LAYER_NAME = "[Frisket preview]"
RESULT_PREFIX = "[Frisket]"


def short_prompt(prompt, limit=60):
    text = " ".join((prompt or "").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def result_layer_name(prompt, seed):
    """`[Frisket] <prompt> (<seed>)`."""
    return "{} {} ({})".format(RESULT_PREFIX, short_prompt(prompt), seed)


def group_layer_name(prompt, seed):
    return "{} explain: {} ({})".format(RESULT_PREFIX, short_prompt(prompt, 40), seed)


def _t(e):
    t = e.get("timestep")
    if isinstance(t, (int, float)):
        return " t={:g}".format(t)
    return ""


def artifact_layer_name(kind, event):
    if kind == "mask":
        frac = event.get("reference_fraction")
        share = " ({:.0%} from the reference)".format(frac) if isinstance(frac, (int, float)) else ""
        return "mask step {}{}{}".format(event.get("step"), _t(event), share)
    if kind == "protected_mask":
        return "protected region step {}{}".format(event.get("step"), _t(event))
    if kind in ("heatmap", "subject_mask"):
        token = (event.get("token") or "").replace("</w>", "")
        what = "heatmap '{}'" if kind == "heatmap" else "where '{}' is"
        return (what + " (token {}) step {}{}").format(token, event.get("token_index"), event.get("step"), _t(event))
    if kind == "change_map":
        return "change map"
    return kind
