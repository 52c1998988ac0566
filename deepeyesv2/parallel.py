"""One training-loop object for one process and many: `SingleProcess`, and FSDP2 over torchrun ranks.

`setup(model)` returns the one the run needs; the SFT and RL loops call the same methods on either (forward
call, gradient-sync switch, clip-and-step, full weights, save, load) and never branch on the world size --
the way torchtitan applies FSDP with degree 1 on one GPU. The collectives below (`all_sum`, ...) are the
identity in a single process.

    torchrun --nproc_per_node 8 -m deepeyesv2 sft --config run.yaml     (or python -m torch.distributed.run)
    torchrun --nproc_per_node 8 -m deepeyesv2 rl  --config run.yaml

What a rank does, and why the numbers equal a single-process run's:
  - every rank builds the same model (same seed) and the same packed rows; rank r trains on rows
    r, r + W, r + 2W, ... of each optimizer step (W = world size);
  - each decoder layer is its own FSDP2 unit, and a root unit (`PackedPolicy`) holds the rest (embeddings,
    vision tower, final norm, lm_head): parameters live sharded, are all-gathered for a layer's forward and
    backward, and gradients are reduce-scattered;
  - the loss is normalised by the GLOBAL number of trained tokens (an all-reduce), and the reduce-scatter
    SUMS gradients instead of averaging them, so the sharded gradient is exactly the single-process
    gradient's shard (up to float summation order);
  - gradient clipping uses the global norm; the optimizer steps on the local shards;
  - only rank 0 logs and writes checkpoints; a checkpoint holds the full (gathered) weights in HF format
    and the optimizer state in the single-process layout, so single-process and distributed runs can
    resume each other's checkpoints.
  - RL (deepeyesv2.rl.train_rl): `full_weights()` all-gathers every unit once per step and keeps it gathered
    for the rollouts (forwards then issue no collectives, so ranks may sample different numbers of tokens);
    the update then runs on this rank's own episodes with the same global-token normalisation, padding with
    zero-weighted passes where a rank has fewer packed rows than another.
Backends: NCCL on CUDA, gloo on CPU (the CPU path is what the tests run).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from .data import DataState
from .optim import clip_and_step


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if there is
    one with more than one rank. Returns whether this process is now part of a multi-rank group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_sum(x: float) -> float:
    """Sum of a Python number over ranks (fp64, so token counts stay exact); an int stays an int."""
    if not is_distributed():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item()) if isinstance(x, int) else float(t.item())


def all_gather_ints(x: int) -> list[int]:
    """[x on rank 0, x on rank 1, ...] ([x] in a single process)."""
    if not is_distributed():
        return [int(x)]
    t = torch.zeros(world_size(), dtype=torch.int64, device=_comm_device())
    t[rank()] = int(x)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process). For small metadata only."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_weighted_mean(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{key: (weighted sum, total weight)} on each rank -> {key: sum over ranks / weight over ranks}.
    Every rank must pass the same keys."""
    keys = sorted(totals)
    t = torch.tensor([list(totals[k]) for k in keys], dtype=torch.float64).reshape(len(keys), 2)
    if is_distributed():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return {k: float(s / w) if w else 0.0 for k, (s, w) in zip(keys, t.tolist())}


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class PackedPolicy(torch.nn.Module):
    """The FSDP2 root: every training forward goes through `forward`, so FSDP's hooks gather the root's
    parameters (embeddings, vision tower, norm, lm_head -- the lm_head weight is read directly by the fused
    kernels, outside any nn.Module call) and reduce their gradients."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn, *args, **kwargs):
        """fn(policy, *args, **kwargs) with the root's parameters gathered: `packed_logprobs` for SFT,
        `deepeyesv2.rl.policy_loss` for RL."""
        return fn(self.policy, *args, **kwargs)


class _GatheredModel:
    """save_checkpoint's view of a sharded model: HF save_pretrained with the gathered full state dict."""

    def __init__(self, policy, state_dict: dict):
        self.policy, self.state_dict = policy, state_dict

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.policy.save_pretrained(path, state_dict=self.state_dict, **kwargs)


class _GatheredOptimizer:
    def __init__(self, state_dict: dict):
        self._sd = state_dict

    def state_dict(self) -> dict:
        return self._sd


class SingleProcess:
    """The training-loop object of a one-process run: the same methods as `DataParallel`, with nothing to
    shard, gather or reduce. `policy` is the model itself."""

    rank, world_size = 0, 1

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    @property
    def is_main(self) -> bool:
        return True

    def local_rows(self, rows: list) -> list:
        return rows

    def call(self, fn, *args, **kwargs):
        """fn(policy, *args, **kwargs): one training forward."""
        return fn(self.policy, *args, **kwargs)

    @contextmanager
    def full_weights(self):
        yield self.policy  # the weights are always whole here

    def set_sync(self, sync: bool) -> None:
        """Nothing to reduce: gradients accumulate in place either way."""

    def clip_and_step(self, opt, sched, max_norm: float) -> float:
        return clip_and_step(self.policy, opt, sched, max_norm)

    def save_checkpoint(self, out_dir: str | Path, step: int, processor, opt, sched, data_state: DataState | dict | None,
                        extra: dict | None = None, protocol: dict | None = None) -> Path | None:
        return save_checkpoint(out_dir, step, self.policy, processor, opt, sched, data_state, extra, protocol=protocol)

    def load_checkpoint(self, ckpt_dir: str | Path, opt, sched) -> tuple[int, DataState | None, dict]:
        # verify=False: deepeyesv2.checkpoint.prepare_run_dir chose this checkpoint because it verified
        return load_checkpoint(ckpt_dir, self.policy, opt, sched, verify=False)


@dataclass
class DataParallel:
    """A model sharded over all ranks with FSDP2. `policy` is the HF model (its parameters are now DTensor shards; build
    the optimizer from it after `shard`); `root` is the FSDP2 root module used for the training forward."""

    policy: torch.nn.Module
    root: PackedPolicy
    rank: int
    world_size: int
    reshard_after_forward: bool = True
    _root_ran: bool = False

    @classmethod
    def shard(cls, model: torch.nn.Module, reshard_after_forward: bool = True) -> "DataParallel":
        """fully_shard each decoder layer, then the root. Requires an initialised multi-rank process group."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not is_distributed():
            raise RuntimeError("DataParallel.shard needs an initialised process group with > 1 ranks (init_from_env)")
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if device_type == "cuda":
            model.to(torch.device("cuda", torch.cuda.current_device()))
        layers = getattr(getattr(getattr(model, "model", None), "language_model", None), "layers", None)
        if layers is None:
            raise NotImplementedError(
                f"FSDP2 sharding expects a plain Qwen2.5-VL model (model.model.language_model.layers); got "
                f"{type(model).__name__} (LoRA / other wrappers are not supported under torchrun yet)")
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        root = PackedPolicy(model)
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)
        for m in root.modules():
            if isinstance(m, FSDPModule):
                # The loss is already divided by the global token count: gradients must be SUMMED over
                # ranks, not averaged. (Forcing a plain sum also avoids PREMUL_SUM, which gloo lacks.)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        return cls(model, root, dist.get_rank(), dist.get_world_size(), reshard_after_forward)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the training step --------------------------------------------------------------------------
    def local_rows(self, rows: list) -> list:
        """This rank's share of one optimizer step's rows: every world_size-th, starting at its rank."""
        if len(rows) % self.world_size:
            raise ValueError(
                f"{len(rows)} packed rows per optimizer step do not split evenly over {self.world_size} ranks: "
                f"set train.rows_per_step * optim.grad_accum to a multiple of the world size"
            )
        return rows[self.rank :: self.world_size]

    def call(self, fn, *args, **kwargs):
        """fn(policy, *args, **kwargs) as one FSDP2 forward (its backward reduces the gradients)."""
        return self.root(fn, *args, **kwargs)

    @contextmanager
    def full_weights(self):
        """Collective. Inside: every FSDP2 unit all-gathered once and kept gathered, so `policy` holds plain full
        tensors and any number of forwards issue no collectives (rollouts, no-grad log-prob passes; ranks may run
        different numbers of them). On exit the units reshard: only the shards stay between rollouts."""
        from torch.distributed.fsdp import FSDPModule

        if not self._root_ran:
            # FSDP2 takes the first module to run forward as its root: make it ours, not a layer the engine calls.
            with torch.no_grad():
                self.root(lambda policy: None)
            self._root_ran = True
        units = [m for m in self.root.modules() if isinstance(m, FSDPModule)]
        self.root.set_reshard_after_forward(False, recurse=True)
        for m in units:
            m.unshard()
        try:
            yield self.policy
        finally:
            for m in units:
                m.reshard()
            self.root.set_reshard_after_forward(self.reshard_after_forward, recurse=True)

    def set_sync(self, sync: bool) -> None:
        """Reduce-scatter gradients in the coming backward (True) or keep accumulating locally (False)."""
        self.root.set_requires_gradient_sync(sync, recurse=True)

    def clip_and_step(self, opt, sched, max_norm: float) -> float:
        """Clip to the global gradient norm, step, zero grads. Returns the pre-clip global norm."""
        return clip_and_step(self.policy, opt, sched, max_norm)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _param_fqns(self, opt) -> list[str]:
        names = {id(p): n for n, p in self.policy.named_parameters()}
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]

    def save_checkpoint(self, out_dir: str | Path, step: int, processor, opt, sched, data_state: DataState | dict | None,
                        extra: dict | None = None, protocol: dict | None = None) -> Path | None:
        """Collective: every rank must call it. Rank 0 writes the same layout as a single-process run."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.policy, options=opts)
        optim_sd = get_optimizer_state_dict(self.policy, opt, options=opts)
        path = None
        if self.rank == 0:
            path = save_checkpoint(out_dir, step, _GatheredModel(self.policy, model_sd), processor,
                                   _GatheredOptimizer(_fqn_to_index(optim_sd, self._param_fqns(opt))), sched, data_state, extra,
                                   protocol=protocol)
        dist.barrier()
        return path

    def load_checkpoint(self, ckpt_dir: str | Path, opt, sched) -> tuple[int, DataState | None, dict]:
        """Every rank reads the full checkpoint and keeps its shards: weights, optimizer, scheduler, RNG."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        ckpt_dir = Path(ckpt_dir)
        step, state, extra = load_checkpoint(ckpt_dir, model=None, optimizer=None, scheduler=sched)
        cls = type(self.policy)
        dtype = next(self.policy.parameters()).dtype
        # from_pretrained applies transformers' key renaming between the saved and in-memory layouts.
        full = cls.from_pretrained(str(ckpt_dir), dtype=dtype, attn_implementation="sdpa").state_dict()
        opts = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.policy, full, options=opts)
        del full
        saved = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)["optimizer"]
        set_optimizer_state_dict(self.policy, opt, _index_to_fqn(saved, self._param_fqns(opt)), options=opts)
        return step, state, extra


def _fqn_to_index(sd: dict, fqns: list[str]) -> dict:
    """A full optimizer state dict keyed by parameter names -> torch.optim's layout (integer ids in
    param-group order), which is what a single-process run saves."""
    index = {n: i for i, n in enumerate(fqns)}
    return {
        "state": {index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
    }


def _index_to_fqn(sd: dict, fqns: list[str]) -> dict:
    return {
        "state": {fqns[int(i)]: s for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in sd["param_groups"]],
    }


Parallel = SingleProcess | DataParallel


def setup(model: torch.nn.Module) -> Parallel:
    """Under torchrun with > 1 ranks: join the group and shard `model` with FSDP2 (call before building the
    optimizer). Otherwise the single-process object (nothing changes)."""
    return DataParallel.shard(model) if init_from_env() else SingleProcess(model)
