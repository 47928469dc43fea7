"""``qadapt plan MODEL_DIR``: the predicted per-rank peak memory of training a LoRA adapter on the model in MODEL_DIR
(its config.json only is read), with a backend, on one GPU or sharded across several (:mod:`qadapt.memory_model`)."""

from __future__ import annotations

from . import parse_options, print_json


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict per-rank peak training memory for a model folder")
    plan.add_argument("model", help="a transformers model folder (only config.json is read)")
    plan.add_argument("--backend", help="the quantization backend (default: full precision)")
    plan.add_argument("-o", "--option", action="append", metavar="NAME=VALUE",
                      help="a backend option, e.g. -o bits=4 (repeatable)")
    plan.add_argument("--gpus", type=int, default=1, help="ranks sharing the model (default 1)")
    plan.add_argument("--engine", choices=("none", "fsdp2", "zero3"),
                      help="sharding engine (default: fsdp2 with --gpus > 1, else none)")
    plan.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    plan.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    plan.add_argument("--lora-r", type=int, default=16)
    plan.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    plan.add_argument("--offload", action="store_true", help="CPU offload of shards and optimizer (FSDP2)")
    plan.add_argument("--prepare", choices=("fast", "lean"), help="qadapt.prepare's mode (default: PEFT's layers)")
    plan.add_argument("--mlp-recompute-layers", type=int, default=0, metavar="N",
                      help="with --prepare: N MLPs recompute gate and up (prepare's mlp='recompute', mlp_layers=N)")
    plan.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..memory_model import GiB, predict

    engine = args.engine or ("fsdp2" if args.gpus > 1 else "none")
    plan = predict(args.model, args.backend, parse_options(args.option), batch=args.batch, seq=args.seq,
                   world_size=args.gpus, engine=engine, checkpointing=args.checkpointing, offload=args.offload,
                   lora_r=args.lora_r, prepare=args.prepare, mlp_recompute_layers=args.mlp_recompute_layers)
    if args.json:
        print_json({**plan.to_dict(), "gib": plan.gib()})
        return 0
    settings = plan.settings
    options = "".join(f" {k}={v}" for k, v in settings["options"].items())
    print(f"{args.model}: backend {settings['backend']}{options}, LoRA r={settings['lora_r']}, batch "
          f"{settings['batch']} x {settings['seq']}, {settings['world_size']} rank(s), engine {settings['engine']}"
          f"{', checkpointing' if settings['checkpointing'] else ''}{', CPU offload' if settings['offload'] else ''}"
          + (f", prepare {settings['prepare']!r}" if settings["prepare"] else "")
          + (f" ({settings['mlp_recompute_layers']} MLPs recomputing)" if settings["mlp_recompute_layers"] else ""))
    for key, value in plan.gib().items():
        if key not in ("peak", "host"):
            print(f"  {key:<24} {value:8.2f} GiB")
    print(f"  {'peak per rank':<24} {plan.peak / GiB:8.2f} GiB on the device"
          + (f", {plan.host / GiB:.2f} GiB in host memory" if plan.host else ""))
    refusal = _refusal(args.backend, settings["options"], engine)
    if refusal:
        print(f"note: a prediction only; qadapt.distributed.shard refuses this ({refusal})")
    return 0


def _refusal(backend, options, engine) -> str | None:
    """The capability table's reason when LoRA cannot be trained sharded by ``engine`` on ``backend``."""
    from ..capabilities import ENGINES
    from ..plugins import get_backend

    if backend is None or engine == "none":
        return None
    quant = get_backend(backend)
    support = quant.capabilities(quant.validate_options(options))[("lora", ENGINES[engine])]
    return None if support else support.reason
