"""Run a function in several gloo processes (torch.multiprocessing spawn) and collect what each rank returned.

A rank that fails is reported with its traceback instead of leaving the others waiting in a collective: they are
ended a few seconds later. Only the processes started here are ever ended.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, function, args, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                      TOKENIZERS_PARALLELISM="false")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        outcome = {"ok": True, "out": function(rank, world, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"}
    with open(f"{results}.{rank}", "w") as handle:
        json.dump(outcome, handle, default=str)
    if outcome["ok"]:
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(1)


def spawn(function, world: int = 2, *args, timeout: float = 300) -> list:
    """``function(rank, world, *args)`` in ``world`` processes; returns each rank's return value (JSON-able), or
    raises ``AssertionError`` with the failing ranks' tracebacks."""
    import torch.multiprocessing as mp

    handle, results = tempfile.mkstemp(prefix="qadapt-ranks-")
    os.close(handle)
    context = mp.start_processes(_entry, args=(world, _free_port(), function, args, results), nprocs=world,
                                 join=False, start_method="spawn")
    started, failed_at = time.monotonic(), None
    while any(process.is_alive() for process in context.processes):
        if failed_at is None and any(process.exitcode not in (None, 0) for process in context.processes):
            failed_at = time.monotonic()
        if time.monotonic() - started > timeout or (failed_at is not None and time.monotonic() - failed_at > 10):
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            break
        time.sleep(0.2)
    for process in context.processes:
        process.join(timeout=10)
    outcomes = []
    for rank in range(world):
        try:
            with open(f"{results}.{rank}") as file:
                outcomes.append(json.load(file))
            os.unlink(f"{results}.{rank}")
        except (OSError, ValueError):
            outcomes.append({"ok": False, "error": "no result (killed after a timeout or another rank's failure)"})
    os.unlink(results)
    failures = [f"rank {rank}: {o['error']}" for rank, o in enumerate(outcomes) if not o["ok"]]
    assert not failures, "\n".join(failures)
    return [o["out"] for o in outcomes]
