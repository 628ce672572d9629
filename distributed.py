"""Several processes, one per GPU: train.py's loop data-parallel (DDP) or fully sharded (FSDP2), via torchrun.

    torchrun --standalone --nproc-per-node 8 train.py --parallel fsdp --model CKPT --data train.jsonl --out runs/x

train.py asks `setup` for its processes either way: without torchrun (WORLD_SIZE 1) it gets a
SingleProcess, the same interface with every operation the identity, so the training loop never asks
how many processes there are. PyTorch's own engines do the work: DistributedDataParallel (Li et al., "PyTorch Distributed",
VLDB 2020) keeps a full replica per rank and all-reduces gradients; FSDP2's `fully_shard` (Zhao et al.,
"PyTorch FSDP", VLDB 2023) keeps 1/N of every weight, gradient and AdamW moment per rank and all-gathers
one transformer block's weights just before it runs. What this file adds is what makes N processes train
exactly like one process with an N times larger batch:

  - data: each global batch (world_size * batch_size pairs, cut as a single process with that batch
    size cuts it) is split into world_size contiguous parts, part r for rank r       (Distributed.part_of)
  - loss: a rank's mean is weighted by its share of the global batch, so the average over ranks that
    DDP and FSDP apply to gradients is the global batch's mean                        (Distributed.share)
  - metrics, per-user evaluation records and reference log-probs are gathered across ranks
  - checkpoints: rank 0 writes full tensors in the single-process format, so any run resumes on any
    number of processes (the data position is exact when processes * batch_size is unchanged)

The user model is small: it sits with the embeddings in FSDP's root group, or is replicated by DDP, and
its gradients are reduced with the rest. Backends: NCCL on CUDA, gloo on CPU (the tests).
"""
from __future__ import annotations

import atexit
import copy
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

# PyTorch's engines are imported where they are used: a single process (most runs) never loads them.

PARALLEL = ("ddp", "fsdp")


def setup(device: str, parallel: str) -> Distributed | SingleProcess:
    """The processes this run has: torchrun's (WORLD_SIZE > 1), or a SingleProcess."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return SingleProcess(device)
    return join(device, parallel)


def join(device: str, parallel: str) -> Distributed:
    """Join the process group that torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel {parallel}: expected one of {', '.join(PARALLEL)}")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # train() may run several stages in one process
        # PyTorch's engines load before the group exists: loaded after it, something in them kept the
        # group alive past close(), gloo threads and all (test_close_joins_the_gloo_threads...)
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401
        import torch.nn.parallel  # noqa: F401

        cuda = device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
        atexit.register(close)
    return Distributed(rank, world_size, device, parallel)


_meshes = []  # FSDP's device meshes (see close)


def close():
    """Destroy the process groups, and make sure they are freed while Python is still whole.

    A gloo group runs collectives on worker threads, which it joins when it is freed. Under FSDP it
    used to outlive destroy_process_group: FSDP's modules (in reference cycles) hold it, and DTensor's
    sharding caches keep the device mesh, which holds its groups, until the interpreter is torn down.
    A worker thread still alive then can abort the process ("terminate called without an active
    exception", once in CI, on the rank that exits first). Runs at exit (registered by join).
    """
    if not dist.is_initialized():
        return
    gc.collect()  # the FSDP modules train() left behind
    for mesh in _meshes:
        mesh._pg_registry.clear()  # (a private field: the mesh's process groups, by name)
    _meshes.clear()
    dist.destroy_process_group()


class Bundle(nn.Module):
    """The trained modules under one root, named as in checkpoints (model., user., head.).

    DDP and FSDP do their work in hooks around a module's forward (gradient-sync setup, weight
    gathering), but P-DPO's loss is a function of several modules that also reads model.tok_embeddings
    and model.output directly. So the root's forward simply runs that function: bundle(fn, batch).
    """

    def __init__(self, model: nn.Module, user_model: nn.Module | None, head: nn.Module | None):
        super().__init__()
        self.model, self.user, self.head = model, user_model, head

    def forward(self, fn, *args):
        return fn(*args)


def meta_copy(module: nn.Module) -> nn.Module:
    """The module's structure with every parameter on the meta device: no memory, filled in later."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)  # deepcopy takes a parameter from memo instead of copying it


def materialize(skeleton: nn.Module, tensors: dict) -> nn.Module:
    """Put full tensors into a meta_copy, keeping tied parameters (embedding = output head) tied."""
    names = {}  # one parameter under several names: the first name for each
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    skeleton.load_state_dict(tensors, assign=True)  # assign: take the tensors, no second copy
    for first, *others in names.values():
        for name in others:
            parent, attr = name.rsplit(".", 1)
            setattr(skeleton.get_submodule(parent), attr, skeleton.get_parameter(first))
    return skeleton


def copy_full_state(trainables: dict, optimizer, tensors: dict, optimizer_state: dict):
    """Full tensors and AdamW state (a checkpoint's) into full parameters: one process, or a DDP replica."""
    with torch.no_grad():
        for k, p in trainables.items():
            p.copy_(tensors[k])
    optimizer.load_state_dict(optimizer_state)


@dataclass
class SingleProcess:
    """One process, no torchrun: Distributed's interface, each operation the identity (or a no-op)."""
    device: str
    rank: int = 0
    world_size: int = 1
    sharded: bool = False
    modules: tuple = (None, None, None)

    def wrap(self, model, user_model, head):
        self.modules = (model, user_model, head)

    def wrapped(self, fn, *args):
        return fn(*args)

    def sync_gradients(self, enabled: bool):
        pass

    def part_of(self, idx: list[int]) -> tuple[list[int], int]:
        return idx, len(idx)

    def share(self, count: float) -> float:
        return 1.0

    def shard(self, items: list, pad=None) -> list:
        return items

    def average(self, rows: list[dict]) -> list[dict]:
        return rows

    def total(self, x: float) -> float:
        return x

    def gather(self, items: list) -> list:
        return items

    def full_state(self, trainables: dict, optimizer) -> tuple[dict, dict]:
        return trainables, optimizer.state_dict()

    def load_full_state(self, trainables: dict, optimizer, tensors: dict, optimizer_state: dict):
        copy_full_state(trainables, optimizer, tensors, optimizer_state)

    def full_modules(self):
        return self.modules


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: str  # this rank's device: cuda:LOCAL_RANK, or cpu
    parallel: str  # "ddp" or "fsdp"
    wrapped: nn.Module | None = None  # the Bundle under DDP or FSDP; call it as wrapped(fn, *args)
    skeleton: Bundle | None = None  # FSDP, rank 0: the Bundle's structure on the meta device (final save)

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    # ------------------------------------------------------------------------------------------
    # Models

    def wrap(self, model, user_model, head):
        """Hand the trained modules to DDP or FSDP2. Call before building the optimizer: FSDP replaces
        each parameter with its shard (a DTensor), under the same name and module attributes."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        bundle = Bundle(model, user_model, head)
        if self.parallel == "ddp":
            cuda = self.device.startswith("cuda")
            # bucket views: the gradients live in DDP's all-reduce buffers, not in a second copy beside them
            self.wrapped = DistributedDataParallel(bundle, device_ids=[torch.device(self.device)] if cuda else None,
                                                   gradient_as_bucket_view=True)
            return
        if self.rank == 0:
            self.skeleton = meta_copy(bundle)
        mesh = init_device_mesh(torch.device(self.device).type, (self.world_size,))
        _meshes.append(mesh)
        for block in model.layers:  # one group per block: only a block or two are ever whole at once
            fully_shard(block, mesh=mesh)
        # the root group: embeddings (tied to the output head, so in one group), final norm, user model,
        # head. Resharded after forward too (FSDP leaves a root whole until backward): a no-grad forward
        # (reference, evaluation) has no backward, and the optimizer and checkpoints must see shards.
        self.wrapped = fully_shard(bundle, mesh=mesh, reshard_after_forward=True)

    def sync_gradients(self, enabled: bool):
        """Gradient accumulation. DDP: all-reduce only at the last micro-batch, as DDP.no_sync() does
        (local gradients add up at no memory cost). FSDP reduce-scatters every micro-batch, so that
        gradients stay sharded (skipping it would hold full-size gradients on every rank)."""
        if self.parallel == "ddp":
            self.wrapped.require_backward_grad_sync = enabled

    # ------------------------------------------------------------------------------------------
    # Data: who computes what

    def part_of(self, idx: list[int]) -> tuple[list[int], int]:
        """This rank's part of a global batch, and how many of its items are real.

        Part r of world_size contiguous parts: a single process with batch world_size * b sees the
        ranks' batches of b side by side. The short last batch of an epoch is cut as evenly as possible;
        a rank whose part is empty repeats the first item with weight 0 (`share`), because every rank
        must run a forward and backward: their collectives pair up across ranks.
        """
        start, stop = self.rank * len(idx) // self.world_size, (self.rank + 1) * len(idx) // self.world_size
        return (idx[start:stop], stop - start) if stop > start else (idx[:1], 0)

    def share(self, count: float) -> float:
        """Weight of this rank's batch mean, over `count` pairs (or tokens): count / (global count / N).

        DDP and FSDP average gradients over the N ranks, so N equal means average to the global mean;
        with unequal parts, sum_r (count_r N / total) mean_r / N = the mean over the global batch.
        """
        total = torch.tensor([float(count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return count * self.world_size / total.item()

    def shard(self, items: list, pad=None) -> list:
        """Every world_size-th item from this rank's, padded with `pad` (default: a repeat of the last)
        to as many as any rank has: under FSDP each forward gathers weights, so all ranks run as many."""
        mine, most = items[self.rank::self.world_size], -(-len(items) // self.world_size)
        if len(mine) < most:
            mine += [items[-1] if pad is None else pad] * (most - len(mine))
        return mine

    # ------------------------------------------------------------------------------------------
    # Reductions

    def average(self, rows: list[dict]) -> list[dict]:
        """Each float of each row averaged over ranks (rows with the same keys on every rank)."""
        keys = list(rows[0])
        t = torch.tensor([[row[k] for k in keys] for row in rows], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [dict(zip(keys, values)) for values in (t / self.world_size).tolist()]

    def total(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (pickled: records, not weights)."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    # ------------------------------------------------------------------------------------------
    # Checkpoints in the single-process format (runs.save_checkpoint), and the final weights

    def full_state(self, trainables: dict, optimizer) -> tuple[dict, dict]:
        """Trainable tensors and AdamW state in full; FSDP gathers them onto rank 0's CPU (a collective).

        Returned as a single process has them: tensors by name; optimizer state by parameter position,
        the order of `trainables` (train.py builds the optimizer's groups from it). Empty on other ranks.
        """
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        if not self.sharded:  # DDP: every rank holds the full tensors already
            return trainables, optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        tensors = get_model_state_dict(self.wrapped, options=options)
        opt = get_optimizer_state_dict(self.wrapped, optimizer, options=options)
        position = {name: i for i, name in enumerate(trainables)}
        state = {position[name]: s for name, s in opt.get("state", {}).items()}
        param_groups = optimizer.state_dict()["param_groups"]  # hyperparameters, params by position
        return {k: tensors[k] for k in trainables if k in tensors}, {"state": state, "param_groups": param_groups}

    def load_full_state(self, trainables: dict, optimizer, tensors: dict, optimizer_state: dict):
        """Full tensors and AdamW state (as full_state returns them) into this rank's replica or shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if not self.sharded:
            return copy_full_state(trainables, optimizer, tensors, optimizer_state)
        names = list(trainables)
        # strict=False: frozen weights (LoRA's base) are not in checkpoints, and a tied head is the embedding
        set_model_state_dict(self.wrapped, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        by_name = {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(self.wrapped, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def full_modules(self):
        """(model, user_model, head) as plain modules with full weights, for save_run. DDP: the replicas.
        FSDP: gathered onto rank 0's CPU (every rank must call this); (None, None, None) elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.parallel == "ddp":
            b = self.wrapped.module
            return b.model, b.user, b.head
        tensors = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        if self.rank != 0:
            return None, None, None
        b = materialize(self.skeleton, tensors)
        return b.model, b.user, b.head
