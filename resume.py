"""
Exact kill-and-resume for train.py: a run killed at any point and restarted with `--resume auto` ends with the
same weights, bit for bit, as an uninterrupted run. The paper needs none of this; long runs on shared machines do.

Three things make it so:
- the data order is a pure function of (seed, epoch), cut into global batches that hold the same samples whatever
  the number of processes (ResumableSampler), and it can start mid-epoch;
- the random choices made for a sample (which of the ref's sentences) are a pure function of (seed, epoch, index)
  (PerSampleSeeds), so they do not depend on workers, world size or where the run was resumed;
- checkpoints record every process's RNG states (rng_state / set_rng_state), for dropout, and where the run
  stands (Progress, Checkpoints).
"""
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import distributed
from checkpoint import KINDS, checkpoint_kind, load_checkpoint, read_checkpoint, save_checkpoint, saved_config
from errors import UserError


class ResumableSampler(Sampler):
    """This process's (epoch, index) keys for one epoch: a permutation seeded by seed + epoch, cut into global
    batches (the incomplete last one dropped, as the authors' drop_last=True), each split into `world` contiguous
    parts. set_epoch(epoch, start_step) resumes mid-epoch."""

    def __init__(self, n, global_batch, rank, world, seed):
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.local = global_batch // world
        self.steps = n // global_batch
        self.epoch, self.start_step = 0, 0
        if self.steps == 0:
            raise ValueError(f"the training set has {n} samples, fewer than one global batch of {global_batch}:"
                             f" lower --batch-size or raise --train-samples")

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch + self.rank * self.local
            for i in perm[base:base + self.local]:
                yield (self.epoch, i)

    def __len__(self):
        return (self.steps - self.start_step) * self.local


class PerSampleSeeds(Dataset):
    """Reads (epoch, index) keys and seeds Python's, numpy's and torch's CPU generators from (seed, epoch, index)
    around each dataset[index]. The caller's states of exactly those generators are restored afterwards (which
    matters when the loader has no workers)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % 2**32
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.default_generator.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def rng_state(device):
    """This process's RNG states, as tensors and plain containers (so checkpoints load with weights_only)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0  # the epoch being trained (0-based)
    step: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    best: float = -1.0  # the best val mIoU so far
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, in all
    history: list = field(default_factory=list)  # one record per epoch, as in metrics.jsonl
    bad_samples: list = field(default_factory=list)  # samples that --skip-bad left out, first seen first

    def summary(self):
        lines = [f"done: best val mIoU {self.best:.2f}, {self.global_step} steps, {self.skipped} skipped for a "
                 f"non-finite loss or gradients"]
        if self.bad_samples:
            lines.append(f"--skip-bad left out {len(self.bad_samples)} bad sample(s); the first ones:")
            lines += [f"  ref {b['ref_id']}: {b['error']}" for b in self.bad_samples[:10]]
        return "\n".join(lines)

    def add_bad_samples(self, per_process):
        """Bad samples met by each process (lists), counted once each, whatever epoch met them again."""
        seen = {(b["ref_id"], b["file"]) for b in self.bad_samples}
        for entry in (b for part in per_process for b in part):
            if (entry["ref_id"], entry["file"]) not in seen:
                seen.add((entry["ref_id"], entry["file"]))
                self.bad_samples.append(entry)


class Checkpoints:
    """train.py's checkpoints (last.pth, best.pth) in its output folder: the model, as checkpoint.save_checkpoint
    writes it, with everything an exact resume needs: optimizer, schedule, GradScaler, progress, the running
    epoch's metric sums and every process's RNG states."""

    def __init__(self, net, optimizer, scheduler, scaler, progress, args, proc):
        self.net, self.optimizer, self.scheduler, self.scaler = net, optimizer, scheduler, scaler
        self.progress, self.args, self.proc = progress, args, proc

    def save(self, name, meters):
        """Called by every process (it gathers their RNG states); rank 0 writes."""
        self.progress.skipped += meters.take_skipped()[0]
        epoch_sums, rngs = meters.totals(), distributed.gather(rng_state(self.proc.device))
        if self.proc.main:
            save_checkpoint(os.path.join(self.args.output, name), self.net, args=vars(self.args), amp=self.args.amp,
                            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                            scaler=self.scaler.state_dict(), progress=asdict(self.progress), epoch_sums=epoch_sums,
                            rng=rngs, world_size=self.proc.world)

    def restore(self, path):
        """Everything save() wrote, from `path`; returns the interrupted epoch's metric sums (None if the epoch
        had not started)."""
        seen = distributed.gather(os.path.isfile(path))
        if not all(seen):
            raise UserError(f"--resume {path}: no such file" + ("" if len(seen) == 1 else
                            f" for rank(s) {[r for r, ok in enumerate(seen) if not ok]}: give a path every node sees"))
        kind = checkpoint_kind(path)
        if kind != "etris":
            raise UserError(f"--resume {path!r} is {KINDS[kind]}, not a checkpoint written by train.py" +
                            ("; --weights starts from its weights" if kind == "etris-authors" else ""))
        ckpt = read_checkpoint(path)
        old, new = ({k: v for k, v in c.items() if k != "clip_weights"}
                    for c in (saved_config(ckpt, path), asdict(self.net.config)))
        if old != new:
            diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
            raise UserError(f"--resume {path!r} was trained with another model (checkpoint, now): {diff}; use the "
                            f"same model options or another --output")
        load_checkpoint(self.net, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["amp"] == self.args.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.proc.main:
            print(f"note: {path} was trained with --amp {ckpt['amp']}, this run uses --amp {self.args.amp}: "
                  f"the loss scaling starts afresh")
        for k, v in ckpt["progress"].items():
            setattr(self.progress, k, v)
        if ckpt["world_size"] == self.proc.world:
            set_rng_state(ckpt["rng"][self.proc.rank], self.proc.device)  # last: nothing draws after it
        elif self.proc.main:
            print(f"warning: {path} was written by {ckpt['world_size']} processes, this run has {self.proc.world}: "
                  f"RNG states not restored, so the run is not bit-identical to an uninterrupted one")
        if self.proc.main:
            print(f"resumed from {path}: epoch {self.progress.epoch + 1}, step {self.progress.step} of the epoch")
        return ckpt["epoch_sums"] if self.progress.step else None
