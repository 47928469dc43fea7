"""``qadapt merge CKPT OUT``: merge a checkpoint's adapter into its base, measured, and save the merged checkpoint."""

from __future__ import annotations

from . import print_json, read_calibration


def add_parser(commands) -> None:
    verb = commands.add_parser("merge", help="merge a checkpoint's adapter into its base (measured) and save it",
                               description="Load the qadapt checkpoint CKPT, merge its adapter (measured against the "
                               "unmerged model) and save the merged checkpoint in OUT. A merge above --max-error is "
                               "refused and nothing is written.")
    verb.add_argument("checkpoint", help="a folder written by qadapt.save (with an adapter)")
    verb.add_argument("out", help="the merged checkpoint folder to write")
    verb.add_argument("--strategy", choices=("requantize", "dequantize"), default="requantize",
                      help="requantize: the same backend and format; dequantize: a full-precision model")
    verb.add_argument("--max-error", type=float, help="refuse if the merged model's relative output error is above this")
    verb.add_argument("--policy", help="the re-quantization policy, for backends that offer one (fresh, grid, best)")
    verb.add_argument("--calibration", metavar="FILE",
                      help="text like the training data to measure on (paragraphs separated by blank lines); "
                           "without it a random batch is used, which overstates the error")
    verb.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    verb.add_argument("--json", action="store_true", help="print the merge report as JSON")


def calibration_ids(path, checkpoint, rows: int = 8, length: int = 128):
    """A batch of token ids (up to ``rows`` x ``length``) from the text file, tokenized with the checkpoint's
    tokenizer as one stream (no padding needed)."""
    import torch

    from ..errors import InvalidOptionError

    texts, tokenizer = read_calibration(path, _tokenizer_folder(checkpoint))
    if texts is None:
        return None
    stream = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    length = min(length, stream.numel())
    if length < 8:
        raise InvalidOptionError(f"--calibration {path!r}", f"it holds only {stream.numel()} tokens",
                                 "Pass a few paragraphs of text")
    count = min(rows, stream.numel() // length)
    return torch.stack([stream[i * length:(i + 1) * length] for i in range(count)])


def _tokenizer_folder(checkpoint):
    import os

    for candidate in (checkpoint, os.path.join(checkpoint, "base")):
        if any(os.path.exists(os.path.join(candidate, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return candidate
    return checkpoint


def run(args) -> int:
    import qadapt

    model = qadapt.load(args.checkpoint)
    report = qadapt.merge(model, args.strategy, max_error=args.max_error, policy=args.policy,
                          calibration=calibration_ids(args.calibration, args.checkpoint))
    path = qadapt.save(model, args.out, overwrite=args.overwrite)
    if args.json:
        print_json({"checkpoint": path, "report": report.to_dict()})
    else:
        print(report)
        print(f"-> {path}")
    return 0
