"""Frisket editor-plugin core: everything the Krita and GIMP plugins share that needs
neither Krita nor GIMP.

Python 3.8+ (the oldest Python bundled with Krita 5), standard library only (Krita's
bundled Python has no pip packages; GIMP 3's Python may be minimal too). The plugins talk
to a Frisket server only through the bundled `frisket` command-line client in its
JSON-lines mode (client/README.md, "JSON lines (--json), format version 1"); this package
builds the client's arguments, parses its output, converts selections to protected-region
masks and names the layers.

The canonical folder is plugins/common/frisket_core/. `make plugin-krita` copies it into
the Krita package as frisket/frisket_core/ and `make plugin-gimp` next to the GIMP plug-in;
in a source checkout each plugin finds it here (plugins/krita/frisket/_core.py,
plugins/gimp/frisket-gimp/frisket_gimp_job.py). Callers use the names below as
`frisket_core.X`; the modules:

  * options:  GenerateOptions, validate(), the generate/models/tokenize/cancel arguments
  * events:   the client's JSON lines: LineBuffer (bytes -> JSON objects), JobState
              (events -> state), the one-line commands' answers
  * errors:   FrisketError and friends; describe_error(), describe_exit()
  * client:   find_client(); JobRun, prepare_job(), and run_job(), a blocking runner for
              hosts without an event loop (GIMP, tests)
  * masks:    selection -> mask: protect_mask_from_selection()
  * pixels:   BGRA/RGBA <-> RGB byte layouts
  * image_io: PNG and .npy read/write (8-bit grey/RGB/RGBA PNG, float32 .npy) in the
              standard library, for where no editor is present: inside Krita and GIMP the
              editor's own PNG codec writes the job's files (prepare_job's write_png)
  * naming:   result_layer_name(), group_layer_name(), artifact_layer_name()
"""

from .client import (
    CLIENT_ENV,
    JobRun,
    client_candidates,
    client_executable_names,
    find_client,
    prepare_job,
    run_job,
)
from .errors import ClientNotFound, FrisketError, ProtocolError, describe_error, describe_exit
from .events import (
    PROTOCOL_VERSION,
    JobState,
    LineBuffer,
    check_version,
    parse_models,
    parse_single_line,
    parse_tokens,
    subject_candidates,
)
from .image_io import decode_png, encode_png, npy_to_grey, png_size, read_npy, read_png, write_png
from .masks import SELECTION_MODES, mask_coverage, protect_mask_from_selection
from .naming import (
    PREVIEW_LAYER_NAME,
    RESULT_PREFIX,
    artifact_layer_name,
    group_layer_name,
    result_layer_name,
    short_prompt,
)
from .options import (
    DEFAULT_SERVER,
    EXPLAIN_MODES,
    SERVER_ENV,
    GenerateOptions,
    build_cancel_args,
    build_generate_args,
    build_models_args,
    build_tokenize_args,
    default_server,
    new_job_id,
    unique,
    validate,
)
from .pixels import bgra_to_rgb, rgb_to_bgra, rgba_to_rgb

__all__ = [
    "CLIENT_ENV",
    "DEFAULT_SERVER",
    "EXPLAIN_MODES",
    "PREVIEW_LAYER_NAME",
    "PROTOCOL_VERSION",
    "RESULT_PREFIX",
    "SELECTION_MODES",
    "SERVER_ENV",
    "ClientNotFound",
    "FrisketError",
    "GenerateOptions",
    "JobRun",
    "JobState",
    "LineBuffer",
    "ProtocolError",
    "artifact_layer_name",
    "bgra_to_rgb",
    "build_cancel_args",
    "build_generate_args",
    "build_models_args",
    "build_tokenize_args",
    "check_version",
    "client_candidates",
    "client_executable_names",
    "decode_png",
    "default_server",
    "describe_error",
    "describe_exit",
    "encode_png",
    "find_client",
    "group_layer_name",
    "mask_coverage",
    "new_job_id",
    "npy_to_grey",
    "parse_models",
    "parse_single_line",
    "parse_tokens",
    "png_size",
    "prepare_job",
    "protect_mask_from_selection",
    "read_npy",
    "read_png",
    "result_layer_name",
    "rgb_to_bgra",
    "rgba_to_rgb",
    "run_job",
    "short_prompt",
    "subject_candidates",
    "unique",
    "validate",
    "write_png",
]
