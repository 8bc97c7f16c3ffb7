"""Recording under torch.distributed: one reduction per interval, rank 0 writes, DDP leaves the accumulators alone.

Every rank runs a Recorder over its own replica. At an interval end each rank packs its layers'
statistics into two flat buffers (int64 counts, float64 sums); `reduce_interval` sums them over the
ranks with one all-reduce per buffer (nothing per step), and only rank 0 hands the result to the
writer: the other ranks get a `NullWriter` and write no file. What is reduced, and how:
- counts and sums (the leading `sum_ints` / `sum_floats` entries): summed, so the file equals that of
  one process that saw every rank's tokens;
- tensor scalars such as `train_loss` (the trailing `mean_floats` entries): averaged over the ranks;
- sampled traces (between the two): not reduced; the file keeps rank 0's sample (each rank may
  hold a different number of them, and token ids only mean something on their own rank).
Plain float scalars passed to `step()`/`log()` (e.g. `lr`) are rank 0's.

Failures are agreed on, so that no rank waits forever in a collective the others left: the writer's
opening (and resume point) is shared from rank 0 at start (`open_on_writer`), and rank 0's writer
failure rides along each interval's all-reduce as one int, which every rank reads at the next
interval end (one interval late, so that reading it never stalls a GPU) and then stops alike.

DDP with `broadcast_buffers=True` copies rank 0's buffers into every rank at each forward, which
would overwrite the other ranks' accumulators; `ignore_accumulators` takes them out of DDP's sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # what DDP reads at construction


def is_active() -> bool:
    """Whether a torch.distributed process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default process group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes the run file: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def reduce_interval(
    flat_ints: Tensor,
    flat_floats: Tensor,
    sum_ints: int | None = None,
    sum_floats: int | None = None,
    mean_floats: int = 0,
    writer_failed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sum the interval's counts and sums over the ranks and average its trailing tensor scalars.

    flat_ints[:sum_ints] and flat_floats[:sum_floats] are summed (default: the whole buffer);
    flat_floats[-mean_floats:] is averaged; the rest (traces) is left as this rank has it. One
    all-reduce per dtype; a no-op outside torch.distributed (the third result is then None). Every
    rank must call it at the same interval ends with the same layers and number of tensor scalars.
    The third result: a one-element tensor on the buffers' device, non-zero on every rank when any rank
    passed `writer_failed` (not read here: reading it would make the host wait for the device).
    """
    if not is_active():
        return flat_ints, flat_floats, None
    ranks = dist.get_world_size()
    sum_ints = flat_ints.numel() if sum_ints is None else sum_ints
    sum_floats = flat_floats.numel() if sum_floats is None else sum_floats
    if mean_floats < 0 or sum_floats + mean_floats > flat_floats.numel() or sum_ints > flat_ints.numel():
        raise ValueError(
            f"reduce_interval: {sum_ints} ints / {sum_floats}+{mean_floats} floats to reduce do not fit "
            f"buffers of {flat_ints.numel()} / {flat_floats.numel()}"
        )
    # Two int entries ride along: each rank's scalar count, so that a mismatch is caught (on every rank
    # alike) before the float all-reduce, which would otherwise fail or mix unrelated values, and the
    # writer-failure flag. Reading the count is a host sync, so it is checked on the CPU only; on CUDA
    # it stays on the device.
    ints = torch.cat([flat_ints[:sum_ints], flat_ints.new_tensor([mean_floats, int(writer_failed)])])
    dist.all_reduce(ints)
    if ints.device.type == "cpu" and int(ints[-2]) != mean_floats * ranks:
        raise RuntimeError(
            "ranks passed different tensor scalars to Recorder.step()/log() in one interval; pass the same "
            "names (e.g. loss) on every rank"
        )
    trailing = flat_floats[flat_floats.numel() - mean_floats :]
    floats = torch.cat([flat_floats[:sum_floats], trailing])
    dist.all_reduce(floats)
    floats[sum_floats:] /= ranks
    out_ints = torch.cat([ints[:sum_ints], flat_ints[sum_ints:]])
    out_floats = torch.cat([floats[:sum_floats], flat_floats[sum_floats : flat_floats.numel() - mean_floats], floats[sum_floats:]])
    return out_ints, out_floats, ints[-1:]


def open_on_writer(make: Callable[[], Any], describe: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run `make()` on the writer (rank 0, or the only process) and give every rank `describe` of its result.

    Returns (the made object on the writer, else None; the description, on every rank). Under
    torch.distributed rank 0 broadcasts its description or its error's message; the other ranks then
    raise RunFileError with that message, so a writer that cannot open its file stops every rank at
    start instead of leaving them waiting in the first all-reduce.
    """
    from routescope.store.format import RunFileError

    if not is_active():
        made = make()
        return made, describe(made)
    made, box = None, [None, None]
    if is_writer():
        try:
            made = make()
            box[0] = describe(made)
        except BaseException as err:
            dist.broadcast_object_list([None, f"{type(err).__name__}: {err}"], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise RunFileError(f"rank 0 could not open the run file ({box[1]}); fix that, then start again")
    return made, box[0]


class NullWriter:
    """Stands in for the run file's writer on ranks other than 0: takes every call, writes nothing."""

    sizes: dict[str, int] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def append_interval(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass


def accumulator_names(model: nn.Module) -> list[str]:
    """Qualified names of every routed layer's accumulator buffers (`blocks.0.mlp.node_visits`, ...)."""
    names = []
    for prefix, module in model.named_modules():
        stats = getattr(module, "routing_stats", None)
        if not callable(stats):
            continue
        own = {id(t): name for name, t in module.named_buffers(recurse=False)}
        names += [f"{prefix}.{own[id(t)]}" if prefix else own[id(t)] for t in stats().values() if id(t) in own]
    return names


def ignore_accumulators(model: nn.Module) -> list[str]:
    """Keep DDP from broadcasting the routed layers' accumulators (broadcast_buffers=True would overwrite
    the other ranks' counts with rank 0's at every forward); returns the names it marked.

    Call it on the model before wrapping it in DistributedDataParallel, or on the DDP module itself
    (it then updates the live wrapper). patch(), Recorder and the callbacks call it for you.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        names = accumulator_names(model.module)
        model.parameters_to_ignore.update(names)  # DDP re-reads this set before each buffer sync...
        if hasattr(model, "_assign_modules_buffers"):  # ...but decides whether to sync from its current list
            model._assign_modules_buffers()
        ignore_accumulators(model.module)
        return names
    names = accumulator_names(model)
    marked = set(getattr(model, DDP_IGNORE_ATTR, ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(marked | set(names)))
    return names
