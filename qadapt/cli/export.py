"""``qadapt export CKPT OUT --format ...``: what to ship from a trained checkpoint.

* ``merged-16bit``: the adapter merged exactly into de-quantized weights: a plain transformers folder
  (``AutoModelForCausalLM.from_pretrained(OUT)`` loads it, no qadapt needed);
* ``same-format``: the adapter merged into the quantized weights, re-quantized in the same backend and options: the
  backend's own folder format (``qadapt.load(OUT, backend=...)``, and transformers for its native formats);
* ``adapter``: the adapter alone, as PEFT saves it (``PeftModel.from_pretrained(base, OUT)``), with qadapt's
  provenance file.

The tokenizer goes along where the checkpoint has one. OUT is written in a temporary folder beside it and moved into
place, so a refusal (a merge above ``--max-error``) leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from . import print_json
from .merge import calibration_ids

FORMATS = ("merged-16bit", "same-format", "adapter")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def add_parser(commands) -> None:
    verb = commands.add_parser("export", help="write what to ship from a checkpoint (merged 16-bit, same format, or "
                               "the adapter)", description=__doc__.split("\n\n")[0])
    verb.add_argument("checkpoint", help="a folder written by qadapt.save (with an adapter)")
    verb.add_argument("out", help="the folder to write")
    verb.add_argument("--format", required=True, choices=FORMATS)
    verb.add_argument("--max-error", type=float, help="same-format: refuse if the merged model's output error is above this")
    verb.add_argument("--calibration", metavar="FILE", help="text to measure the merge on (see qadapt merge --help)")
    verb.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    verb.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import qadapt
    from qadapt.checkpoint import read_manifest
    from qadapt.checkpoint.files import move_into_place
    from qadapt.errors import CheckpointError

    manifest = read_manifest(args.checkpoint)  # verified before anything is loaded
    if not manifest.get("adapter"):
        raise CheckpointError(f"export {args.checkpoint!r}", "the checkpoint holds no adapter (it was saved merged, or "
                              "without one)", "Its base/ folder is what it ships: copy it")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.overwrite:
        raise CheckpointError(f"export to {args.out!r}", "the path exists and is not empty; qadapt does not overwrite "
                              "files unasked", "Choose a new folder, or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(args.out)}.", suffix=".export", dir=parent)
    result = {"format": args.format, "out": args.out}
    try:
        written = os.path.join(staging, "out")
        if args.format == "adapter":
            shutil.copytree(os.path.join(args.checkpoint, "adapter"), written)
        else:
            model = qadapt.load(args.checkpoint)
            strategy = "dequantize" if args.format == "merged-16bit" else "requantize"
            report = qadapt.merge(model, strategy, max_error=args.max_error,
                                  calibration=calibration_ids(args.calibration, args.checkpoint))
            result["merge"] = report.to_dict()
            qadapt.save(model, os.path.join(staging, "merged"))
            os.replace(os.path.join(staging, "merged", "base"), written)
        _copy_tokenizer(args.checkpoint, written)
        move_into_place(written, args.out, overwrite=args.overwrite, asked=f"export to {args.out!r}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.json:
        print_json(result)
    else:
        if "merge" in result:
            print(f"merged ({result['merge']['strategy']}): output error {result['merge']['output_error']:.3g}")
        print(f"exported {args.format} -> {args.out}")
    return 0


def _copy_tokenizer(checkpoint: str, out: str) -> None:
    for folder in (checkpoint, os.path.join(checkpoint, "base")):
        for name in TOKENIZER_FILES:
            source = os.path.join(folder, name)
            if os.path.isfile(source) and not os.path.exists(os.path.join(out, name)):
                shutil.copy2(source, os.path.join(out, name))
