"""
Training of ETRIS (paper Sec. 4.1; the authors' train.py + engine.train, inherited from CRIS). The CLIP
encoders stay frozen except their positional embeddings; the Bridger, the neck (HA), the decoder (GA) and the
projector are trained with BCE on the 1/4-resolution logits. Defaults are the paper's: Adam lr 1e-4, no weight
decay, MultiStepLR x0.1 at epoch 35, 50 epochs, global batch 32, AMP with GradScaler, SyncBN, seed 0. After
every epoch the model is validated on the 'val' split (sentence 0 of each ref, full test protocol).

    python train.py --data refcoco --backbone ViT-B/16                  # one process (GPU or CPU)
    torchrun --nproc_per_node 4 train.py --data refcoco --backbone RN101
    python train.py --data synthetic --backbone tiny-ViT --input-size 64 --epochs 2 --batch-size 8

A run killed at any point and restarted with `--resume auto` ends with the same weights as an uninterrupted
run: the data order is a pure function of (seed, epoch) (the random sentence of a sample too, of
(seed, epoch, index)), checkpoints record the position inside the epoch and every process's RNG states.
"""
import argparse
import datetime
import json
import os
import random
import time

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dataset import DATASETS, WORD_LEN, build_dataset, collate
from evaluate import evaluate, format_table, sanitize, shard_loader, weights_file_kind
from loss import segmentation_loss
from model import (build_model, checkpoint_state_dict, format_parameter_counts, load_checkpoint, parameter_counts,
                   read_checkpoint)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train ETRIS (frozen CLIP + Bridger + HA/GA decoder).")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="refcoco", help=f"one of {sorted(DATASETS)}")
    g.add_argument("--data-root", default="./datasets")
    g.add_argument("--input-size", type=int, default=416)
    g.add_argument("--word-len", type=int, default=None, help="default: by dataset (17 RefCOCO/+, 22 G-Ref)")
    g.add_argument("--workers", type=int, default=4, help="data loader workers per process")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks instead of failing")
    g.add_argument("--train-samples", type=int, default=None, help="use only this many training refs")
    g.add_argument("--val-samples", type=int, default=None, help="use only this many validation refs")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="ViT-B/16", help="ViT-B/16 | RN50 | RN101 | tiny-ViT | tiny-RN")
    g.add_argument("--clip-weights", default=None, help="OpenAI CLIP archive or state dict (default: by name)")
    g.add_argument("--ladder-dim", type=int, default=64, help="Bridger width d")
    g.add_argument("--bridger-stages", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--no-bridger", action="store_true", help="ablation: no Bridger (frozen CLIP features only)")
    g.add_argument("--zoom", default="conv", help="Bridger zoom layers (ablation)")
    g.add_argument("--frozen-bn-stats", action="store_true", help="keep the ResNet BN running stats frozen")
    g.add_argument("--checkpoint-backbone", action="store_true",
                   help="recompute the frozen CLIP blocks in backward instead of storing them (less memory, same numbers)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (worth it for long GPU runs; evaluation stays eager)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch, split across processes")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--milestones", type=int, nargs="+", default=[35])
    g.add_argument("--lr-decay", type=float, default=0.1)
    g.add_argument("--amp", choices=["fp16", "bf16", "off"], default=None,
                   help="default: fp16 (with GradScaler) on CUDA, off on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    g.add_argument("--max-nonfinite", type=int, default=20,
                   help="stop after this many skipped (non-finite) steps in a row; checked at each log step")
    g.add_argument("--deterministic", action="store_true",
                   help="cuDNN deterministic, no autotuning (the authors' setting; slower). Default: cudnn.benchmark")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="default: exp/<data>/<backbone>")
    g.add_argument("--resume", default=None, help="'auto' (the output folder's last.pth, if any) or a path")
    g.add_argument("--save-every-steps", type=int, default=0, help="also write last.pth every N steps")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar updates")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.data not in DATASETS:
        p.error(f"--data {args.data!r} is not one of {sorted(DATASETS)}")
    args.output = args.output or os.path.join("exp", args.data, sanitize(args.backbone))
    args.word_len = args.word_len or WORD_LEN[args.data]
    return args


# -----------------------------------------------------------------------------
# deterministic, resumable data order

class EpochSeeded(Dataset):
    """Takes (epoch, index) keys and seeds python/numpy/torch from (seed, epoch, index) around each
    __getitem__, so the random sentence picked for a sample does not depend on workers, world size or where
    a run was resumed. The caller's RNG states are restored afterwards (matters with workers=0)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % 2**32
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _worker_init(worker_id):
    cv2.setNumThreads(0)  # one OpenCV thread per loader worker: the workers are the parallelism


class ResumableSampler(Sampler):
    """This process's keys for one epoch: a permutation seeded by seed+epoch, cut into global batches (the
    incomplete last one dropped, as the authors' drop_last=True), each split into `world` contiguous parts.
    A global batch holds the same samples whatever the world size; `start_step` resumes mid-epoch."""

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


# -----------------------------------------------------------------------------
# checkpoints and RNG states

def rng_state(device):
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


def atomic_save(obj, path):
    """Write to a temporary file then rename: a kill leaves either the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_resume_checkpoint(path):
    kind = weights_file_kind(path)
    if kind == "clip":
        raise ValueError(f"--resume {path!r} is a CLIP weights file: pass it as --clip-weights instead")
    if kind == "etris-authors":
        raise ValueError(f"--resume {path!r} is an authors' ETRIS release without optimizer/RNG state of ours: "
                         f"evaluate it with evaluate.py --backbone ... --clip-weights ...")
    if kind != "etris":
        raise ValueError(f"--resume {path!r} is not a checkpoint written by train.py")
    return read_checkpoint(path)


def train_metric(logits, mask, threshold=0.35):
    """The authors' trainMetricGPU on device: IoU of sigmoid(logits) >= thr against the mask resized
    (nearest) to the logits' size; returns (sum of IoUs, number with IoU > 0.5) as tensors, no host sync."""
    target = F.interpolate(mask, size=logits.shape[-2:], mode="nearest").flatten(1) > 0
    pred = torch.sigmoid(logits.detach().float()).flatten(1) >= threshold
    ious = (pred & target).sum(1) / ((pred | target).sum(1) + 1e-6)
    return ious.sum(), (ious > 0.5).sum().float()


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    distributed = world > 1
    use_cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) is not divisible by {world} processes")
    if use_cuda:
        torch.cuda.set_device(device)
        # every batch has the same shape, so cuDNN's autotuner pays off after the first step
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    amp = args.amp or ("fp16" if use_cuda else "off")
    if amp == "fp16" and not use_cuda:
        raise ValueError("--amp fp16 needs CUDA (GradScaler); use --amp bf16 or off on CPU")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    main_proc = rank == 0

    # same seed on every process, as the authors (DDP also broadcasts rank 0's weights at wrap time)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    if args.clip_weights is not None and weights_file_kind(args.clip_weights) in ("etris", "etris-authors"):
        raise ValueError(f"--clip-weights {args.clip_weights!r} is an ETRIS checkpoint, not CLIP weights: "
                         f"use --resume to continue training from it (or evaluate.py --checkpoint)")
    resume_path = args.resume
    if resume_path == "auto":
        resume_path = os.path.join(args.output, "last.pth")
        resume_path = resume_path if os.path.isfile(resume_path) else None
    ck = read_resume_checkpoint(resume_path) if resume_path else None

    net = build_model(backbone=args.backbone, clip_weights=args.clip_weights, input_size=args.input_size,
                      word_len=args.word_len, ladder_dim=args.ladder_dim, bridger=not args.no_bridger,
                      bridger_stages=tuple(args.bridger_stages), zoom=args.zoom,
                      frozen_bn_stats=args.frozen_bn_stats)
    net.checkpoint_backbone(args.checkpoint_backbone)
    if ck is not None:
        old = {k: v for k, v in ck["config"]["net"].items() if k != "clip_weights"}
        new = {k: v for k, v in net.config.items() if k != "clip_weights"}
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise ValueError(f"--resume {resume_path!r} was trained with a different model (checkpoint, now): "
                             f"{diff}; use the same model options or another --output")
        load_checkpoint(net, ck["model"])
    if main_proc:
        print(format_parameter_counts(parameter_counts(net)))
    net.to(device)
    if distributed and use_cuda:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # names unchanged: checkpoints stay compatible
    model = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if use_cuda else None) \
        if distributed else net
    if args.compile:
        model = torch.compile(model)

    params = [p for p in net.parameters() if p.requires_grad]
    # fused: one kernel for all tensors, and it skips a step on the device when told to (found_inf below)
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = MultiStepLR(optimizer, milestones=args.milestones, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    local_batch = args.batch_size // world
    train_set = build_dataset(args.data, "train", root=args.data_root, input_size=args.input_size,
                              word_len=args.word_len, skip_bad=args.skip_bad, seed=args.seed,
                              num_samples=args.train_samples)
    val_set = build_dataset(args.data, "val", root=args.data_root, input_size=args.input_size,
                            word_len=args.word_len, mode="val", skip_bad=args.skip_bad, seed=args.seed,
                            num_samples=args.val_samples)
    sampler = ResumableSampler(len(train_set), args.batch_size, rank, world, args.seed)
    loader = DataLoader(EpochSeeded(train_set, args.seed), batch_size=local_batch, sampler=sampler,
                        num_workers=args.workers, collate_fn=collate, pin_memory=use_cuda,
                        persistent_workers=args.workers > 0, worker_init_fn=_worker_init,
                        generator=torch.Generator().manual_seed(args.seed))  # leaves the global RNG alone
    val_loader = shard_loader(val_set, local_batch, args.workers, collate)

    start_epoch, start_step, global_step, best, history, nonfinite_total = 0, 0, 0, -1.0, [], 0
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, start_step, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        best, history, nonfinite_total = ck["best_score"], list(ck["history"]), ck["nonfinite_total"]
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank], device)  # last, after everything that draws random numbers
        elif main_proc:
            print(f"warning: checkpoint written by {len(ck['rng'])} processes, now {world}: RNG states not "
                  f"restored, the run continues but is not bit-identical to an uninterrupted one")
        if main_proc:
            print(f"resumed from {resume_path}: epoch {start_epoch + 1}, step {start_step} of the epoch")
    if main_proc:
        os.makedirs(args.output, exist_ok=True)
        # rewrite the log from the checkpoint so epochs redone after a kill are not logged twice
        with open(os.path.join(args.output, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)

    def save(path, epoch, step_in_epoch, sums):
        states, totals = [None] * world, sums.clone()
        if distributed:
            dist.all_gather_object(states, rng_state(device))
            dist.all_reduce(totals)
        else:
            states[0] = rng_state(device)
        if main_proc:
            atomic_save({"config": {"args": vars(args), "net": net.config}, "model": checkpoint_state_dict(net),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "global_step": global_step, "best_score": best, "history": history,
                         "nonfinite_total": nonfinite_total + int(skipped_since.item()),
                         "epoch_sums": totals.cpu(), "rng": states,
                         "world_size": world}, path)

    last_path, best_path = os.path.join(args.output, "last.pth"), os.path.join(args.output, "best.pth")
    # skipped-step counters stay on the device: no host sync in the step, checked at log time
    streak, worst_streak, skipped_since = (torch.zeros((), device=device) for _ in range(3))
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and global_step >= args.max_steps:
            break
        step_in_epoch = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, step_in_epoch)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(4, device=device)  # loss*B, IoU sum, IoU>0.5 count, samples; reduced at log time
        if ck is not None and epoch == start_epoch and step_in_epoch > 0:
            logged = ck["epoch_sums"].to(device)  # the killed run's part of this epoch, for the epoch's means
            sums += logged if main_proc else 0
        else:
            logged = torch.zeros(4, device=device)
        t_log, t_epoch = time.time(), time.time()
        bar = tqdm(total=sampler.steps, initial=step_in_epoch, disable=not main_proc, dynamic_ncols=True,
                   desc=f"epoch {epoch + 1}/{args.epochs}")
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            tokens = batch["tokens"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images, tokens)  # [B, 1, S/4, S/4]
                loss = segmentation_loss(logits, masks)
            # a non-finite loss or gradient skips the update on every process, decided on the device
            bad = (~torch.isfinite(loss.detach())).float()
            if distributed:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # queued on the device like DDP's own all-reduce
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if scaler.is_enabled():
                scaler.step(optimizer)  # fused Adam: an overflowing fp16 step is skipped on the device too
                scaler.update()
            else:  # gradients are all-reduced by now, so every process reaches the same verdict
                grads = [p.grad for p in params if p.grad is not None]
                bad = torch.maximum(bad, (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float())
                optimizer.found_inf = bad  # fused Adam leaves weights, moments and step count as they were
                optimizer.step()
            streak = (streak + 1) * bad
            worst_streak = torch.maximum(worst_streak, streak)
            skipped_since += bad
            iou_sum, prec_count = train_metric(logits, masks)
            step_sums = torch.stack([loss.detach().float() * len(images), iou_sum, prec_count,
                                     torch.full((), float(len(images)), device=device)])  # no host-to-device copy
            sums += torch.where(bad > 0, 0.0, step_sums)  # skipped steps count in no mean
            step_in_epoch += 1
            global_step += 1
            bar.update(1)
            if step_in_epoch % args.log_every == 0 or step_in_epoch == sampler.steps:
                worst, skipped = (int(x) for x in torch.stack([worst_streak, skipped_since]).tolist())
                nonfinite_total += skipped
                skipped_since.zero_()
                if worst >= args.max_nonfinite:
                    raise RuntimeError(f"{args.max_nonfinite} non-finite losses in a row by epoch {epoch + 1} step "
                                       f"{step_in_epoch}: training diverged; lower --lr, try --amp bf16/off, or "
                                       f"resume from an earlier checkpoint")
                totals = sums.clone()
                if distributed:
                    dist.all_reduce(totals)
                window = (totals - logged).tolist()
                logged, now = totals, time.time()
                n = max(window[3], 1.0)
                bar.set_postfix(loss=f"{window[0] / n:.4f}", IoU=f"{100 * window[1] / n:.2f}", lr=f"{lr:.1e}",
                                img_s=f"{window[3] / max(now - t_log, 1e-9):.1f}")
                t_log = now
            stop = args.max_steps is not None and global_step >= args.max_steps
            if (args.save_every_steps and global_step % args.save_every_steps == 0
                    and step_in_epoch < sampler.steps and not stop):
                save(last_path, epoch, step_in_epoch, sums)
            if stop:
                break
        bar.close()
        nonfinite_total += int(skipped_since.item())  # steps skipped since the last log step (a --max-steps stop)
        skipped_since.zero_()

        finished = step_in_epoch == sampler.steps
        if finished:
            scheduler.step()
        val = evaluate(net, val_loader, device)
        val.pop("per_sample")
        totals = sums.clone()
        if distributed:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n = max(totals[3], 1.0)
        record = {"epoch": epoch + 1, "global_step": global_step, "epoch_complete": finished, "lr": lr,
                  "train_loss": totals[0] / n, "train_IoU": 100 * totals[1] / n, "train_Prec@0.5": 100 * totals[2] / n,
                  "nonfinite_skipped": nonfinite_total, "epoch_time_s": time.time() - t_epoch,
                  **{f"val_{k}": v for k, v in val.items()}}
        history.append(record)
        improved = val["mIoU"] >= best
        best = max(best, val["mIoU"])
        next_pos = (epoch + 1, 0) if finished else (epoch, step_in_epoch)
        if improved:
            save(best_path, *next_pos, sums)  # best first: a kill between the two redoes this epoch, fixing both
        save(last_path, *next_pos, sums)
        if main_proc:
            with open(os.path.join(args.output, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}  IoU {record['train_IoU']:.2f}  "
                  f"| val (sentence 0, n={val['n']})\n{format_table(val)}")
        if not finished:
            break
    if main_proc:
        print(f"done: best val mIoU {best:.2f}, {global_step} steps, {nonfinite_total} non-finite steps skipped"
              f" ({datetime.datetime.now():%Y-%m-%d %H:%M})")
    if distributed:
        # leave together: once in ~15 test runs a gloo rank aborted (SIGABRT) at exit, after its peer had
        # already torn the group down
        dist.barrier()
        dist.destroy_process_group()
    return net


if __name__ == "__main__":
    main()
