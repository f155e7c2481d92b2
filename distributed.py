"""
Where a process runs, the same for train.py, evaluate.py and the demo: its device, torchrun's process group, and
the seeds and kernel choices that make runs repeatable.

torchrun starts one process per GPU on every node and gives each RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous;
nothing here starts processes. Past one machine, torchrun runs once per node (docs/gpus.md: "Training past one
machine"). Decisions that read a disk (is there a checkpoint to resume?) are taken by rank 0 and broadcast, since
each node sees its own disks.
"""
import itertools
import os
import random
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError, job_store


@dataclass
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def default_device():
    """What --device means when it is not given: CUDA wherever there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name, local_rank=0, world=1):
    """A torch device from a --device string ('cpu', 'cuda', 'cuda:1'; None: default_device()). Under torchrun
    'cuda' means this process's GPU, cuda:LOCAL_RANK."""
    if name is None:
        name = default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: only cpu and cuda (cuda:N) are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name!r}: this machine has no CUDA device (or this torch build lacks CUDA); "
                            f"use --device cpu")
        if device.index is not None and world > 1:
            raise UserError(f"--device {name!r}: under torchrun each process uses its own GPU, cuda:LOCAL_RANK; "
                            f"pass --device cuda")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup(device_name=None):
    """This process's rank and device, with the process group started when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise UserError(f"started by SLURM as {os.environ['SLURM_NTASKS']} tasks without torchrun: each would train "
                        f"alone. Start torchrun once per node (srun --ntasks-per-node 1 torchrun ...; docs/gpus.md: "
                        f"'Training past one machine')")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        # NCCL is told its device up front, so that collectives such as barrier() need not guess it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Process(rank, world, local_rank, device)


def seed_and_configure(seed, deterministic, device):
    """The same seed on every process, as the authors (DDP also broadcasts rank 0's weights when it wraps), and
    the CUDA kernels: autotuned (batches have one shape, so it pays off), or deterministic ones. torch's flash,
    memory-efficient and cuDNN attention kernels have a non-deterministic backward unless deterministic
    algorithms are strictly enforced, which the upsampling backward (no deterministic CUDA kernel) rules out; so
    the deterministic mode computes attention with the math kernel (matrix products and a softmax)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, i.e. later
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)


def teardown():
    if dist.is_initialized():
        dist.barrier()  # leave together: a gloo rank can abort at exit when its peer has torn the group down first
        dist.destroy_process_group()


def broadcast(obj):
    """obj as rank 0 has it, on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


_node_first_calls = itertools.count()


def on_each_node_first(fn, poll_s=0.5, patience=timedelta(days=7)):
    """fn() on the first process of each node (a download into the node's cache, say), then on the node's other
    processes, which find its result in place. They wait for it on the job's store (errors.job_store), which every
    process reached to join the process group: no second transport to connect across nodes, and no collective
    with a timeout, so no download is too slow. The first process leaves its outcome there, a failure included,
    so that none of the others waits for ever."""
    if not dist.is_initialized():
        return fn()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    first = dist.get_rank() - local_rank  # torchrun numbers the processes of a node consecutively
    key = f"node-first/{next(_node_first_calls)}/{first}"  # every process makes the same calls in the same order
    store = job_store(timedelta(minutes=5))
    if local_rank == 0:
        try:
            result = fn()
        except BaseException as e:
            store.set(key, str(e) if isinstance(e, UserError) else
                      f"rank {first}, the first process of this node, failed ({type(e).__name__}: {e}); see its "
                      f"traceback")
            raise
        store.set(key, "")
        return result
    deadline = time.monotonic() + patience.total_seconds()
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise UserError(f"rank {first}, the first process of this node, did not finish in {patience}")
        time.sleep(poll_s)
    failure = store.get(key).decode()
    if failure:
        raise UserError(failure)
    return fn()


def check_shared_dir(path):
    """Every process must see the same output folder: only rank 0 writes checkpoints, and every rank resumes from
    them. Rank 0 leaves a random token there; a rank that cannot read it is on another filesystem."""
    if not dist.is_initialized():
        return
    token_file = os.path.join(path, ".shared-check")
    token = broadcast(secrets.token_hex(8) if dist.get_rank() == 0 else None)
    if dist.get_rank() == 0:
        with open(token_file, "w") as f:
            f.write(token)
    dist.barrier()
    try:
        with open(token_file) as f:
            sees = f.read() == token
    except OSError:
        sees = False
    blind = [r for r, ok in enumerate(gather(sees)) if not ok]  # every rank has read the token by now
    if dist.get_rank() == 0:
        os.remove(token_file)
    if blind:
        raise UserError(f"--output {path} is not shared: rank(s) {blind} do not see what rank 0 writes there. "
                        f"Put the output folder on a filesystem that every node mounts")
