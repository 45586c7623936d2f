"""Sharding ``gradmem-fast write`` over processes started by ``torchrun``.

    torchrun --nproc-per-node N -m gradmem_fast write --model ... --input docs.jsonl --output mem.safetensors

Every process reads and validates the whole input (so a bad input fails on every rank the same way),
splits the documents into fixed shards of ``--shard-size`` documents and writes the shards
``rank, rank + N, rank + 2N, ...`` into the checkpoint directory ``OUTPUT.partial``. After a barrier,
rank 0 merges the shards into the output in input order. The checkpoint directory must therefore be on
a file system every rank sees (always true on one machine; across machines use a shared file system).

Shard boundaries and batching inside a shard depend only on the input and the options, not on the
number of processes, so a run with N processes computes exactly the batches of a single-process run,
and a killed run resumes from its finished shards whatever N the rerun uses.

``gradmem-fast capacity`` under torchrun: every process reads, tokenizes and validates every text, searches
the texts ``rank, rank + N, ...`` (``Context.my_shards`` with one text per shard), and sends its results to
rank 0 (``gather_to_main``), which writes the one report in input order. A text's search depends only on its
own tokens and the options (stages batch texts, but each text's computation is its own), so the merged report
is the single-process report up to floating-point rounding of batch shapes.

The process group uses NCCL when the processes run on GPUs and gloo on CPUs.
"""

import dataclasses
import datetime
import os

# Ranks wait for each other only at the end (before the merge); a slow rank may need hours.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclasses.dataclass
class Context:
    """Where this process stands: its rank among ``world_size`` and its local rank on the machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = None  # "nccl" or "gloo" when a process group was started

    @property
    def is_main(self) -> bool:
        """Rank 0 merges the shards and prints."""
        return self.rank == 0

    def my_shards(self, num_shards: int):
        """The shard indices this rank writes: round robin, so ranks finish at about the same time."""
        return list(range(self.rank, num_shards, self.world_size))


def from_environment() -> Context:
    """Rank, world size and local rank from torchrun's environment (one process when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Context()
    return Context(
        rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def start(ctx: Context, device: str) -> Context:
    """Start the process group (NCCL for CUDA devices, gloo otherwise) when there are several processes."""
    if ctx.world_size <= 1:
        return ctx
    import torch
    import torch.distributed as dist

    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    return dataclasses.replace(ctx, backend=backend)


def barrier(ctx: Context):
    """Wait until every rank gets here (no-op for one process)."""
    if ctx.backend is None:
        return
    import torch.distributed as dist

    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def stop(ctx: Context):
    """Tear the process group down (no-op for one process)."""
    if ctx.backend is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(ctx: Context, obj):
    """Rank 0: every rank's ``obj`` in rank order; other ranks: None (one process: ``[obj]``). ``obj`` is
    pickled: keep its tensors on the CPU, or rank 0 would unpickle them onto the sender's device."""
    if ctx.backend is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
