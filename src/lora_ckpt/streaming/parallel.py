"""Several processes writing one streamed output: which shards each rank writes, and how they agree.

Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and the rendezvous), each rank plans the
same merge, writes the output shards assigned to it into the staging folder rank 0 made, and rank 0
writes the index and installs the folder once every rank reports success. Process groups come from
``torch.distributed`` itself (gloo, on CPU); nothing here starts or watches processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lora_ckpt.errors import CheckpointFileError, LoraCkptError

__all__ = ["Ranks", "assign_shards"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks writing one output (``rank`` of ``world``), over a gloo group.

    Example:
        >>> Ranks(rank=0, world=1).mine([10, 30, 20])
        [0, 1, 2]
    """

    rank: int
    world: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks ``torchrun`` set up (``WORLD_SIZE`` > 1), joining the default process group over gloo if
        none is initialised yet; None when this process runs alone.

        Raises:
            CheckpointFileError: ``WORLD_SIZE`` or ``RANK`` is not a valid integer, or the group cannot start.
        """
        raw_world, raw_rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        try:
            world, rank = int(raw_world), int(raw_rank)
        except ValueError:
            raise CheckpointFileError(f"WORLD_SIZE={raw_world!r}, RANK={raw_rank!r}: not integers; launch with "
                                      "torchrun, or unset them") from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise CheckpointFileError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
        import torch.distributed as dist

        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo")
            except (RuntimeError, ValueError) as e:
                raise CheckpointFileError(f"cannot join the process group of {world} ranks ({e}); launch with "
                                          "torchrun --nproc-per-node N -m lora_ckpt ...") from None
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise CheckpointFileError(f"the process group ({dist.get_rank()} of {dist.get_world_size()}) does not "
                                      f"match RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world)

    def mine(self, sizes: list[int]) -> list[int]:
        """The indices of the shards (of ``sizes`` bytes) this rank writes; see :func:`assign_shards`."""
        return [i for i, r in enumerate(assign_shards(sizes, self.world)) if r == self.rank]

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Wait for every rank; raise on all of them if any failed (its own error, or the first rank's message)."""
        import torch.distributed as dist

        mine = None if error is None else f"{type(error).__name__}: {error}"
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        if error is not None:
            raise error
        if failed:
            r, message = failed[0]
            raise _RankFailed(f"rank {r} of {self.world} failed, so nothing was written: {message}")


class _RankFailed(LoraCkptError):
    """Another rank failed."""


def assign_shards(sizes: list[int], world: int) -> list[int]:
    """The rank that writes each shard: largest shard first, each to the rank with the fewest bytes so far.

    Example:
        >>> assign_shards([5, 9, 4, 4], 2)
        [1, 0, 1, 0]
    """
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner
