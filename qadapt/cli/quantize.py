"""``qadapt quantize MODEL_DIR OUT --backend NAME``: quantize a full-precision folder and save it as a checkpoint."""

from __future__ import annotations

from . import check_backend_names, parse_options, print_json, read_calibration


def add_parser(commands) -> None:
    verb = commands.add_parser("quantize", help="quantize a model folder with a backend and save it",
                               description="Quantize a full-precision transformers folder (or load one already "
                               "quantized) with BACKEND and save it as a qadapt checkpoint in OUT.")
    verb.add_argument("model_dir", help="a local transformers folder (qadapt never downloads)")
    verb.add_argument("out", help="the checkpoint folder to write (must not exist or be empty)")
    verb.add_argument("--backend", required=True, help="the backend (qadapt backends lists them)")
    verb.add_argument("-o", "--option", action="append", metavar="NAME=VALUE",
                      help="a backend option, repeatable: -o bits=4 -o quant_type=nf4 (qadapt backends --json lists them)")
    verb.add_argument("--calibration", metavar="FILE",
                      help="text like the training data, paragraphs separated by blank lines (for backends that "
                           "need calibration: gptq, awq)")
    verb.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    verb.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import time

    import qadapt

    check_backend_names([args.backend])
    options = parse_options(args.option)
    texts, tokenizer = read_calibration(args.calibration, args.model_dir)
    started = time.monotonic()
    model = qadapt.load(args.model_dir, backend=args.backend, calibration=texts, tokenizer=tokenizer, **options)
    seconds = time.monotonic() - started
    path = qadapt.save(model, args.out, overwrite=args.overwrite)
    from ..memory import storage_bytes
    from ..record import get_record

    record = get_record(model)
    result = {"checkpoint": path, "backend": record.backend, "options": record.options, "seconds": round(seconds, 1),
              "weight_bytes": storage_bytes(model)}
    if args.json:
        print_json(result)
    else:
        print(f"quantized {args.model_dir} with {record.backend} in {seconds:.1f} s -> {path}")
        print(f"options: {', '.join(f'{k}={v}' for k, v in record.options.items())}")
        print(f"weights: {result['weight_bytes'] / 2**20:.1f} MiB")
    return 0
