"""
Training of ETRIS (paper Sec. 4.2; the authors' train.py and engine.train, from CRIS). The CLIP encoders stay frozen
except their positional embeddings; the Bridger, HA, GA and the Projector are trained with BCE on the stride-4
logits. The defaults are the paper's (Adam lr 1e-4, x0.1 at epoch 35, 50 epochs, a batch of 32) and, where the
paper says nothing, the authors' configs' (no weight decay, the batch of 32 split across the GPUs, fp16 AMP with
GradScaler, SyncBN, seed 0). An epoch is one pass over the refs, each with one of its sentences drawn at random.
After every epoch the model is validated on the val split (sentence 0 of each ref, the full test protocol).

    python train.py --data refcoco --backbone ViT-B/16                 # one process, GPU or CPU
    torchrun --nproc_per_node 4 train.py --data refcoco --backbone RN101
    python train.py --data synthetic --backbone tiny-ViT --input-size 64 --epochs 2 --batch-size 8

Beside the recipe: exact kill-and-resume (resume.py), steps skipped when their loss or gradients are not finite
(optimizer_step), and the device and process group (distributed.py).
"""
import json
import math
import os

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import MultiStepLR
from tqdm import tqdm

import distributed
from checkpoint import ACCEPTED, KINDS, checkpoint_kind, load_checkpoint
from clip_loader import BACKBONES, check_backbone, fetch_openai_weights
from dataset import DATASETS, WORD_LEN, build_dataset, build_loader, default_workers
from errors import ArgumentParser, UserError, number, run_cli
from evaluate import evaluate, format_table, train_metric
from loss import segmentation_loss
from model import build_model, format_parameter_counts, parameter_counts
from resume import Checkpoints, PerSampleSeeds, Progress, ResumableSampler


def parse_args(argv=None):
    p = ArgumentParser(description="Train ETRIS (frozen CLIP + Bridger + HA/GA decoder).")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="refcoco", choices=sorted(DATASETS), help="dataset (see README: Data)")
    g.add_argument("--data-root", default="./datasets", help="folder holding images/ and the annotations")
    g.add_argument("--input-size", type=number(int, 1), default=416, help="images are letterboxed to this square")
    g.add_argument("--word-len", type=number(int, 1, 77), default=None,
                   help="tokens per sentence (default: by dataset, 17 RefCOCO/+, 22 G-Ref)")
    g.add_argument("--workers", type=number(int, 0), default=default_workers(),
                   help="data loader workers per process (default: the CPUs this process may use, shared by the "
                        "node's processes, at most 4: %(default)s here)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images/masks, count them, report them")
    g.add_argument("--train-samples", type=number(int, 1), default=None,
                   help="use only this many training refs (default: all)")
    g.add_argument("--val-samples", type=number(int, 1), default=None,
                   help="use only this many validation refs (default: all)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="ViT-B/16", help=f"one of {', '.join(BACKBONES)}")
    g.add_argument("--clip-weights", default=None,
                   help="OpenAI CLIP archive or state dict (default: OpenAI's, found or downloaded by --backbone)")
    g.add_argument("--weights", default=None,
                   help="start from these model weights (ours or the authors' release) with a fresh schedule")
    g.add_argument("--bridger-dim", type=number(int, 1), default=64, help="the Bridger's width d")
    g.add_argument("--bridger-stages", type=int, nargs="*", choices=[0, 1, 2], default=[0, 1, 2],
                   help="the stages with a Bridger; none: no Bridger (ablation)")
    g.add_argument("--zoom", default="conv", choices=["conv", "linear", "mlp"], help="Bridger zoom layers")
    g.add_argument("--dropout", type=number(float, 0, 1, high_open=True), default=0.1,
                   help="dropout in GA and the ResNet Bridger")
    g.add_argument("--frozen-bn-stats", action="store_true", help="keep the ResNet BN running stats frozen")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the frozen CLIP blocks in backward instead of storing them (less memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward (long GPU runs)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number(int, 1), default=50, help="passes over the training refs")
    g.add_argument("--batch-size", type=number(int, 1), default=32, help="GLOBAL batch, split across processes")
    g.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-4, help="Adam's learning rate")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="Adam's weight decay")
    g.add_argument("--milestones", type=number(int, 1), nargs="+", default=[35],
                   help="epochs after which the learning rate is multiplied by --lr-decay")
    g.add_argument("--lr-decay", type=number(float, 0, low_open=True), default=0.1, help="MultiStepLR's gamma")
    g.add_argument("--amp", choices=["fp16", "bf16", "off"], default=None,
                   help="mixed precision (default: fp16 with GradScaler on CUDA, off on the CPU)")
    g.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0, help="seed of every process")
    g.add_argument("--max-steps", type=number(int, 1), default=None,
                   help="stop after this many optimizer steps in total (default: no limit)")
    g.add_argument("--max-nonfinite", type=number(int, 1), default=20,
                   help="stop after this many skipped (non-finite) steps in a row; checked at each log step")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, no cuDNN autotuning (slower; see docs/gpus.md: determinism)")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="folder for checkpoints and metrics (default: exp/<data>/<backbone>)")
    g.add_argument("--resume", default=None, help="'auto' (the output folder's last.pth, if any) or a path")
    g.add_argument("--save-every-steps", type=number(int, 0), default=0,
                   help="also write last.pth every N steps (0: at the end of each epoch only)")
    g.add_argument("--log-every", type=number(int, 1), default=20, help="steps between progress-bar updates")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    args.output = args.output or os.path.join("exp", args.data, args.backbone.replace("/", "-"))
    args.word_len = args.word_len or WORD_LEN[args.data]
    check_arguments(args)
    return args


def check_arguments(args):
    """What can be checked from the options and the files they name alone, before any data, download or process
    group: a mistake fails at once, the same on every process of a torchrun job."""
    check_backbone(args.backbone, args.input_size, args.clip_weights)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (global) is not divisible by {world} processes: give a "
                        f"multiple of {world}")
    for option, path in (("--clip-weights", args.clip_weights), ("--weights", args.weights)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{option} {path}: no such file")
    if args.clip_weights is not None:
        kind = checkpoint_kind(args.clip_weights)
        if kind in ("etris", "etris-authors"):
            raise UserError(f"--clip-weights {args.clip_weights!r} is an ETRIS checkpoint, not CLIP weights: pass it "
                            f"as --weights to start from it, or --resume to continue its run")
    if args.weights is not None:
        kind = checkpoint_kind(args.weights)
        if kind not in ("etris", "etris-authors"):
            raise UserError(f"--weights {args.weights!r} is not an ETRIS checkpoint (ours or the authors' release)" +
                            (": it holds CLIP weights, pass it as --clip-weights" if kind == "clip" else
                             f" ({KINDS[kind]}): give {ACCEPTED}"))


# -----------------------------------------------------------------------------

def optimizer_step(loss, optimizer, scaler, params, amp):
    """Backward and step; returns a device tensor, 1 if the step was skipped (a non-finite loss or gradient), else
    0. GradScaler skips such steps on the device, with no host sync; under fp32 and bf16 its scale is kept at 1,
    so that it scales nothing. Under DDP the gradients are averaged by the time they are checked, so every
    process reaches the same verdict."""
    optimizer.zero_grad(set_to_none=True)
    # a non-finite loss seeds backward with NaN, so that its gradients are non-finite too and the step is skipped
    scaler.scale(loss).backward(torch.where(torch.isfinite(loss), 1.0, float("nan")))
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    skipped = (~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))).float()
    scaler.step(optimizer)
    scaler.update(None if amp == "fp16" else 1.0)
    return skipped


class Meters:
    """Per-sample sums of the training metrics over an epoch, and the skipped steps, kept on the device so that the
    step never waits for the host; read (and summed over processes) at log time, onto the progress bar."""

    def __init__(self, device, bar, resumed_sums=None):
        self.bar, self.bad_samples = bar, []  # bad_samples: those that failed to load here (--skip-bad)
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "IoU", "Prec@0.5", "samples")}
        for k, v in (resumed_sums or {}).items():  # the interrupted epoch's part before the kill
            self.sums[k] += v
        self.skipped, self.streak, self.worst_streak = (torch.zeros((), device=device) for _ in range(3))

    def update(self, skipped, **sums):
        for k, v in sums.items():
            self.sums[k] += torch.where(skipped > 0, 0.0, v)  # a skipped step counts in no mean
        self.skipped += skipped
        self.streak = (self.streak + 1) * skipped
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)

    def totals(self):
        sums = distributed.all_reduce_sum(torch.stack(list(self.sums.values())))
        return dict(zip(self.sums, sums.tolist()))

    def means(self):
        t = self.totals()
        return {k: t[k] / max(t["samples"], 1.0) for k in self.sums if k != "samples"}

    def take_skipped(self):
        """Steps skipped since the last call (the same on every process), and the longest run of them so far."""
        skipped, worst = (int(x) for x in torch.stack([self.skipped, self.worst_streak]).tolist())
        self.skipped.zero_()
        return skipped, worst

    def log(self, progress, lr, max_nonfinite):
        """Figures onto the progress bar, and the stop of a run whose steps keep being skipped."""
        skipped, worst_streak = self.take_skipped()
        progress.skipped += skipped
        if worst_streak >= max_nonfinite:
            raise UserError(f"{worst_streak} steps in a row had a non-finite loss or gradients (--max-nonfinite "
                            f"{max_nonfinite}), by epoch {progress.epoch + 1} step {progress.step}: training "
                            f"diverged; lower --lr, try --amp bf16/off, or resume from an earlier checkpoint")
        m = self.means()
        self.bar.set_postfix(epoch=progress.epoch + 1, loss=f"{m['loss']:.4f}", IoU=f"{100 * m['IoU']:.2f}",
                             lr=f"{lr:.1e}", skipped=progress.skipped, refresh=False)


def train_one_epoch(model, loader, optimizer, scaler, meters, progress, checkpoints, args, device):
    """One epoch, from progress.step on, to its end or to --max-steps. Returns True if the epoch was finished."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[args.amp]
    model.train()
    for batch in loader:
        meters.bad_samples += batch.pop("bad_samples", [])
        images, tokens, masks = (batch[k].to(device, non_blocking=True) for k in ("image", "tokens", "mask"))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images, tokens)  # [B, 1, S/4, S/4]
            loss = segmentation_loss(logits, masks)
        skipped = optimizer_step(loss, optimizer, scaler, params, args.amp)
        iou_sum, prec_count = train_metric(logits, masks)
        meters.update(skipped, loss=loss.detach().float() * len(images), IoU=iou_sum, samples=len(images),
                      **{"Prec@0.5": prec_count})
        progress.step += 1
        progress.global_step += 1
        meters.bar.update(1)
        finished = progress.step == loader.sampler.steps
        if progress.step % args.log_every == 0 or finished:
            meters.log(progress, optimizer.param_groups[0]["lr"], args.max_nonfinite)
        stop = args.max_steps is not None and progress.global_step >= args.max_steps
        if args.save_every_steps and progress.global_step % args.save_every_steps == 0 and not (finished or stop):
            checkpoints.save("last.pth", meters)
        if stop:
            return finished
    return True


# -----------------------------------------------------------------------------

def build_data(args, proc):
    """The training and validation loaders. The data is read first, before any CLIP download, so that a missing
    dataset is reported at once."""
    common = dict(root=args.data_root, input_size=args.input_size, word_len=args.word_len, skip_bad=args.skip_bad,
                  seed=args.seed, verbose=proc.main)
    train_set = build_dataset(args.data, "train", num_samples=args.train_samples, **common)
    val_set = build_dataset(args.data, "val", mode="val", num_samples=args.val_samples, **common)
    local_batch, pin = args.batch_size // proc.world, proc.device.type == "cuda"
    sampler = ResumableSampler(len(train_set), args.batch_size, proc.rank, proc.world, args.seed)
    loader = build_loader(PerSampleSeeds(train_set, args.seed), local_batch, args.workers, sampler=sampler,
                          pin_memory=pin, seed=args.seed)
    val_loader = build_loader(val_set, local_batch, args.workers, shard=(proc.rank, proc.world), pin_memory=pin)
    return loader, val_loader, train_set.bad_samples + val_set.bad_samples


def build_net(args, proc):
    """ETRIS with the frozen CLIP (downloaded by one process per node), optionally starting from --weights."""
    if args.clip_weights is None and not args.backbone.startswith("tiny-"):
        distributed.on_each_node_first(lambda: fetch_openai_weights(args.backbone))
    net = build_model(args.backbone, args.clip_weights, args.input_size, args.word_len, bridger_dim=args.bridger_dim,
                      bridger_stages=tuple(args.bridger_stages), zoom=args.zoom, frozen_bn_stats=args.frozen_bn_stats,
                      ga_dropout=args.dropout, bridger_dropout=args.dropout)
    if args.weights:
        try:
            load_checkpoint(net, args.weights)
        except UserError as e:
            raise UserError(f"--weights {args.weights!r} does not fit this model (--backbone {args.backbone}, "
                            f"--input-size {args.input_size}): {e}") from None
    if proc.main:
        print(format_parameter_counts(parameter_counts(net)))
    return net.set_grad_checkpointing(args.grad_checkpointing).to(proc.device)


def wrap_for_training(net, args, proc):
    """SyncBN and DDP over the processes (as the authors), torch.compile if asked."""
    if proc.world == 1:
        return torch.compile(net) if args.compile else net
    if proc.device.type == "cuda":
        if args.compile:
            raise UserError("--compile with several CUDA processes (SyncBN + DDP) is not supported yet: drop "
                            "--compile, or train one process per run")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # the same names: checkpoints stay compatible
    model = nn.parallel.DistributedDataParallel(net, device_ids=[proc.device.index] if proc.device.type == "cuda"
                                                else None)
    return torch.compile(model) if args.compile else model


def main(argv=None):
    args = parse_args(argv)
    proc = distributed.setup(args.device)
    net = train(args, proc)
    distributed.teardown()
    return net


def train(args, proc):
    args.amp = args.amp or ("fp16" if proc.device.type == "cuda" else "off")
    distributed.seed_and_configure(args.seed, args.deterministic, proc.device)
    loader, val_loader, bad_at_build = build_data(args, proc)
    net = build_net(args, proc)
    model = wrap_for_training(net, args, proc)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr,
                                 weight_decay=args.weight_decay, fused=True)
    scheduler = MultiStepLR(optimizer, milestones=args.milestones, gamma=args.lr_decay)
    scaler = torch.amp.GradScaler(proc.device.type, init_scale=2.0 ** 16 if args.amp == "fp16" else 1.0)
    progress = Progress(bad_samples=bad_at_build)
    checkpoints = Checkpoints(net, optimizer, scheduler, scaler, progress, args, proc)
    os.makedirs(args.output, exist_ok=True)
    distributed.check_shared_dir(args.output)
    resume = args.resume
    if resume == "auto":
        last = os.path.join(args.output, "last.pth")
        resume = distributed.broadcast(last if proc.main and os.path.isfile(last) else None)
    resumed_sums = checkpoints.restore(resume) if resume else None
    if proc.main:  # rewritten from the checkpoint, so that epochs redone after a kill are not logged twice
        with open(os.path.join(args.output, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in progress.history)
    total = min(args.epochs * loader.sampler.steps, args.max_steps or math.inf)
    bar = tqdm(total=total, initial=progress.global_step, disable=not proc.main, dynamic_ncols=True, desc="train")
    while progress.epoch < args.epochs and progress.global_step < total:
        loader.sampler.set_epoch(progress.epoch, progress.step)
        meters = Meters(proc.device, bar, resumed_sums if proc.main else None)
        lr = optimizer.param_groups[0]["lr"]
        finished = train_one_epoch(model, loader, optimizer, scaler, meters, progress, checkpoints, args, proc.device)
        if finished:
            scheduler.step()
        end_epoch(net, val_loader, meters, progress, checkpoints, finished, lr, args, proc)
        resumed_sums = None
    bar.close()
    if proc.main:
        print(progress.summary())
    return net


def end_epoch(net, val_loader, meters, progress, checkpoints, finished, lr, args, proc):
    """Validation, the epoch's record in metrics.jsonl, best.pth if it improved, last.pth."""
    val = evaluate(net, val_loader, proc.device)
    val.pop("per_sample")
    progress.add_bad_samples(distributed.gather(meters.bad_samples + val.pop("bad_samples")))
    train = meters.means()
    record = {"epoch": progress.epoch + 1, "global_step": progress.global_step, "epoch_complete": finished, "lr": lr,
              **{f"train_{k}": (100 * v if k != "loss" else v) for k, v in train.items()},
              "nonfinite_skipped": progress.skipped + meters.take_skipped()[0], "bad_samples": len(progress.bad_samples),
              **{f"val_{k}": v for k, v in val.items()}}
    progress.skipped = record["nonfinite_skipped"]
    progress.history.append(record)
    improved, progress.best = val["mIoU"] >= progress.best, max(progress.best, val["mIoU"])
    if finished:
        progress.epoch, progress.step = progress.epoch + 1, 0
    if improved:
        checkpoints.save("best.pth", meters)  # best first: a kill between the two redoes this epoch, fixing both
    checkpoints.save("last.pth", meters)
    if proc.main:
        with open(os.path.join(args.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"epoch {record['epoch']}: train loss {train['loss']:.4f}  IoU {100 * train['IoU']:.2f}  | val "
                   f"(sentence 0, n={val['n']})\n{format_table(val)}")


if __name__ == "__main__":
    run_cli(main)
