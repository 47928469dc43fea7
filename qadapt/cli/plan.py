"""``qadapt plan MODEL_DIR``: the predicted per-rank peak memory of training a LoRA adapter on the model in MODEL_DIR
(its config.json only is read), with a backend, on one GPU or sharded across several (:mod:`qadapt.memory_model`)."""

from __future__ import annotations

import json
import sys

from ..errors import QadaptError


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict per-rank peak training memory for a model folder")
    plan.add_argument("model", help="a transformers model folder (only config.json is read)")
    plan.add_argument("--backend", help="the quantization backend (default: full precision)")
    plan.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                      help="a backend option, e.g. --option bits=4 (repeatable)")
    plan.add_argument("--gpus", type=int, default=1, help="ranks sharing the model (default 1)")
    plan.add_argument("--engine", choices=("none", "fsdp2", "zero3"),
                      help="sharding engine (default: fsdp2 with --gpus > 1, else none)")
    plan.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    plan.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    plan.add_argument("--lora-r", type=int, default=16)
    plan.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    plan.add_argument("--offload", action="store_true", help="CPU offload of shards and optimizer (FSDP2)")
    plan.add_argument("--json", action="store_true")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def run(args) -> int:
    from ..memory_model import GiB, predict

    options = {}
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = _value(value)
    engine = args.engine or ("fsdp2" if args.gpus > 1 else "none")
    try:
        plan = predict(args.model, args.backend, options, batch=args.batch, seq=args.seq, world_size=args.gpus,
                       engine=engine, checkpointing=args.checkpointing, offload=args.offload, lora_r=args.lora_r)
    except QadaptError as exc:
        if args.json:
            json.dump(exc.to_dict(), sys.stdout, indent=2)
            print()
        else:
            print(f"qadapt plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({**plan.to_dict(), "gib": plan.gib()}, sys.stdout, indent=2)
        print()
        return 0
    settings = plan.settings
    print(f"{args.model}: backend {settings['backend']} {settings['options'] or ''}, LoRA r={settings['lora_r']}, "
          f"batch {settings['batch']} x {settings['seq']}, {settings['world_size']} rank(s), engine "
          f"{settings['engine']}{', checkpointing' if settings['checkpointing'] else ''}"
          f"{', CPU offload' if settings['offload'] else ''}")
    for key, value in plan.gib().items():
        if key not in ("peak", "host"):
            print(f"  {key:<24} {value:8.2f} GiB")
    print(f"  {'peak per rank':<24} {plan.peak / GiB:8.2f} GiB on the device"
          + (f", {plan.host / GiB:.2f} GiB in host memory" if plan.host else ""))
    return 0
