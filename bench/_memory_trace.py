"""What is alive on the GPU at the peak of one training step, by the line that allocated it.

Used by ``bench/peers.py --trace-memory``: torch's allocator history (``torch.cuda.memory._record_memory_history``)
is recorded over one step, its alloc/free events are replayed to find the moment of the peak, and the blocks alive
then are summed by the first frame of the stack that is not inside torch (where a tensor kept for the backward was
made, or where the backward's transient was asked for). Blocks allocated before the step are one line.
"""

from __future__ import annotations

import collections

_TORCH_INTERNALS = ("site-packages/torch/", "<frozen", "/contextlib.py", "/functools.py")


def start() -> None:
    import torch

    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")


def stop_and_summarize(top: int = 25) -> dict:
    """Stop recording; the live set at the peak of the recorded events: ``{"peak_gib", "before_gib", "places"}``."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    # what was allocated before recording began: the live blocks at the end whose allocation the trace never saw
    traced = {e["addr"] for e in events if e["action"] == "alloc"}
    before = sum(block["size"] for segment in snapshot["segments"] for block in segment["blocks"]
                 if block["state"] == "active_allocated" and block["address"] not in traced)
    live, total, peak, peak_index = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, peak_index = total, index
    live = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    places = collections.Counter()
    for event in live.values():
        places[_place(event.get("frames", []))] += event["size"]
    return {"before_gib": before / 2**30, "peak_gib": (before + peak) / 2**30,
            "places": [(f"{size / 2**30:.3f} GiB", place) for place, size in places.most_common(top)]}


def _place(frames) -> str:
    outside = [f for f in frames if f["filename"].endswith(".py") and not any(part in f["filename"] for part in _TORCH_INTERNALS)]
    if not outside:
        return frames[0]["name"] if frames else "?"
    first = outside[0]
    return f"{first['filename'].split('site-packages/')[-1].split('/work/')[-1]}:{first['line']} {first['name']}"
