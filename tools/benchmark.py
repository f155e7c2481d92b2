"""
Speed and memory of ETRIS, beside the recipe: the whole model of paper Fig. 2 on random CLIP weights of the real
shapes (no download), optionally side by side with the authors' released code on the same weights; and the GPU
check, one prepared script for a short time on a GPU machine.

One configuration (backbone, input size, batch, device, options) gives:
- train: the real training step (train.optimizer_step: forward, BCE, backward, GradScaler, fused Adam) in
  images/s on fixed tensors, and through dataset.build_loader (data included); peak memory (CUDA: max allocated;
  CPU: peak RSS);
- eval forward: images/s of net(images, tokens) under no_grad;
- eval loop: sentences/s of evaluate.evaluate, the full test protocol, on --data / --root (test mode);
- loader: samples/s of the data loader alone.

    python tools/benchmark.py --backbone tiny-ViT --input-size 128 --batch-size 4 --device cpu      # quick
    python tools/benchmark.py --backbone ViT-B/16 --batch-size 8 --amp fp16 --write BENCHMARKS.md     # one row
    python tools/benchmark.py --backbone ViT-B/16 --authors-repo ~/ETRIS --repeats 5 --write BENCHMARKS.md
    python tools/benchmark.py --memory-estimate                              # activation memory per sample
    python tools/benchmark.py --gpu-check --out gpu_check.md                 # the GPU check (BENCHMARKS.md)

--authors-repo PATH runs the authors' model (their checkout, imported at run time; nothing of it is part of this
repository) in a second process with the same weights (tools/parity.py), and alternates ours / theirs (A B A B ...)
so that load changes hit both; medians are reported. Their step is their ETRIS.forward in train mode (loss
inside) + backward + their optimizer (plain Adam), under their AMP when --amp fp16; their eval loop is their
engine.inference on their RefDataset (test mode) of a prepared folder (--root), its LMDB replaced by an
in-memory dict of the same records. Their modules that the timed code does not use (loguru, wandb, lmdb,
pyarrow, PIL) are stubbed where not installed.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: its modules, train.py, tests/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from distributed import default_device  # noqa: E402
from errors import ArgumentParser, UserError, number, run_cli  # noqa: E402
AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# the authors' config/refcoco/bridge_*.yaml values for the side-by-side model
AUTHORS_CFG = {
    "ViT-B/16": dict(word_dim=512, nhead=8, stride=[1, 1, 1], fpn_in=[768, 768, 512]),
    "RN50": dict(word_dim=1024, nhead=4, stride=[2, 1, 2], fpn_in=[512, 1024, 1024]),
    "RN101": dict(word_dim=512, nhead=4, stride=[2, 1, 2], fpn_in=[512, 1024, 512]),
}


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall and process-CPU seconds of a block. On a shared CPU the CPU time of a 1-thread run is the steadier
    figure: it leaves out the time the process waits for a core."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return False


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def host_syncs(fn):
    """How many times fn() makes the host wait for the GPU (CUDA's sync debug mode warns at each such op)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


class ForcedSyncBatchNorm(torch.nn.SyncBatchNorm):
    """A SyncBatchNorm that takes its synchronising path (all-gather the statistics, then drop empty ranks'
    entries with boolean masks) also in a one-process group, where nn.SyncBatchNorm falls back to plain batch
    norm: what SyncBN does each step of a multi-GPU run, on one GPU."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        import torch.distributed as dist
        from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm
        self.num_batches_tracked.add_(1)
        return sync_batch_norm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                     self.momentum, dist.group.WORLD, 1)


def force_sync_batchnorm(net):
    """net with every BatchNorm a ForcedSyncBatchNorm (train.py converts the whole model under torchrun on GPUs,
    the frozen backbone's train-mode BNs included). Needs a process group."""
    import torch.nn as nn
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in net.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = ForcedSyncBatchNorm
    return net


def forced_sync_batchnorm(net, device):
    """force_sync_batchnorm in a one-process NCCL group: what SyncBN costs each step, measured on one GPU."""
    import torch.distributed as dist
    if device.type != "cuda":
        raise SystemExit("--syncbn needs a CUDA device (SyncBatchNorm runs on GPUs only)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1,
                            device_id=torch.device("cuda", index))
    return force_sync_batchnorm(net)


def step_on_the_cpu(backbone, grad_checkpointing, input_size):
    """A training-mode ETRIS on random CLIP weights of `backbone` and a batch of 2 for it on the CPU (images,
    tokens, mask): what the counts below run one training step (forward and backward) of."""
    from clip_loader import random_clip_state_dict
    from model import build_model
    net = build_model(backbone, random_clip_state_dict(backbone), input_size, 17).set_grad_checkpointing(
        grad_checkpointing).train()
    return net, make_inputs(types.SimpleNamespace(batch_size=2, input_size=input_size, word_len=17),
                            torch.device("cpu"))


def batchnorm_forwards(backbone, grad_checkpointing, input_size=64):
    """Train-mode BatchNorm forwards in one training step (forward and backward): under torchrun on GPUs each is
    a SyncBatchNorm forward."""
    import torch.nn as nn
    from loss import segmentation_loss
    net, (images, tokens, mask) = step_on_the_cpu(backbone, grad_checkpointing, input_size)
    calls = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(lambda mod, *_: calls.append(1) if mod.training else None)
    segmentation_loss(net(images, tokens), mask).backward()
    return len(calls)


def host_waits_counted_on_the_cpu(backbone, grad_checkpointing, syncbn, input_size=64):
    """The ops of one training step (forward and backward) that would make the host wait for a GPU, counted on the
    CPU: a boolean-mask index (CUDA computes its nonzero and copies the count to the host), nonzero,
    masked_select, .item(). syncbn: every BatchNorm on SyncBatchNorm's synchronising path, torch's own code run
    in a one-process gloo group, its five CUDA-only kernels computed by CPU stand-ins (_SYNCBN_KERNELS). CUDA's
    sync debug mode (host_syncs, in the GPU check) counts the same thing on a GPU."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented hook for every aten op
    from loss import segmentation_loss
    aten = torch.ops.aten
    waits = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in waits or (func is aten.index.Tensor and any(
                    i is not None and i.dtype == torch.bool for i in args[1])):
                self.n += 1
            return _SYNCBN_KERNELS.get(func, func)(*args, **(kwargs or {}))
    net, (images, tokens, mask) = step_on_the_cpu(backbone, grad_checkpointing, input_size)
    if syncbn:
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
        net = force_sync_batchnorm(net)
    try:
        with Count() as count:
            count.n = 0
            segmentation_loss(net(images, tokens), mask).backward()
    finally:
        if syncbn:
            dist.destroy_process_group()
    return count.n


def _channel_view(t, like):
    return None if t is None else t.view([1, -1] + [1] * (like.dim() - 2))


def _bn_sums(x, *tensors):
    return [t.sum([0] + list(range(2, x.dim()))) for t in tensors]


def _gather_stats_with_counts(x, means, invstds, running_mean, running_var, momentum, eps, counts):
    counts = counts.view(-1, 1)
    n = counts.sum()
    mean = (means * counts).sum(0) / n
    var = ((invstds ** -2 - eps + (means - mean) ** 2) * counts).sum(0) / n
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * mean)
        running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    return mean, (var + eps).rsqrt()


def _backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    sum_dy, sum_dy_xmu = _bn_sums(x, dy, dy * (x - _channel_view(mean, x)))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if weight_g else None, sum_dy if bias_g else None


def _backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    n = count.sum()
    mean, invstd, sum_dy, sum_dy_xmu = (_channel_view(t, x) for t in (mean, invstd, sum_dy, sum_dy_xmu))
    scale = invstd if weight is None else invstd * _channel_view(weight, x)
    return (dy - sum_dy / n - (x - mean) * invstd ** 2 * sum_dy_xmu / n) * scale


def _elemt(x, weight, bias, mean, invstd, eps):
    y = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
    return y * _channel_view(weight, x) + _channel_view(bias, x) if weight is not None else y


def _stats(x, eps):
    var, mean = torch.var_mean(x, [0] + list(range(2, x.dim())), correction=0)
    return mean, (var + eps).rsqrt()


# CPU stand-ins for the CUDA-only kernels of torch's SyncBatchNorm (torch/nn/modules/_functions.py)
_SYNCBN_KERNELS = {torch.ops.aten.batch_norm_stats.default: _stats,
                   torch.ops.aten.batch_norm_gather_stats_with_counts.default: _gather_stats_with_counts,
                   torch.ops.aten.batch_norm_elemt.default: _elemt,
                   torch.ops.aten.batch_norm_backward_reduce.default: _backward_reduce,
                   torch.ops.aten.batch_norm_backward_elemt.default: _backward_elemt}


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores"


def make_inputs(a, device):
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(a.batch_size, 3, a.input_size, a.input_size, generator=g)
    tokens = torch.zeros(a.batch_size, a.word_len, dtype=torch.long)
    for b in range(a.batch_size):  # alternately a full and a short sentence
        n = a.word_len - 2 if b % 2 == 0 else 5
        tokens[b, 0], tokens[b, 1 + n] = 49406, 49407
        tokens[b, 1:1 + n] = torch.randint(1, 49405, (n,), generator=g)
    mask = (torch.rand(a.batch_size, 1, a.input_size, a.input_size, generator=g) > 0.5).float()
    return images.to(device), tokens.to(device), mask.to(device)


def eval_dataset(a):
    from dataset import DATASETS, build_dataset
    split = a.split if a.split in DATASETS[a.data]["splits"] else "test"
    return build_dataset(a.data, split, root=a.root, input_size=a.input_size, word_len=a.word_len, mode="test",
                         num_samples=a.eval_samples, verbose=False)


def loader_throughput(dataset, workers, batch_size, n_batches):
    """Samples per second through dataset.build_loader, after one warm-up batch (worker start-up excluded)."""
    from dataset import build_loader
    loader = build_loader(dataset, batch_size, workers)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["index"])
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the two sides

class Ours:
    """Our model with the fast-path options; every method returns seconds (or a dict)."""

    def __init__(self, a, device):
        from clip_loader import random_clip_state_dict
        from model import build_model
        from tools.parity import fill_
        self.a, self.device = a, device
        net = build_model(a.backbone, clip_weights=random_clip_state_dict(a.backbone), input_size=a.input_size,
                          word_len=a.word_len)
        if a.fill:
            fill_(net)
        net.set_grad_checkpointing(a.grad_checkpointing).to(device)
        if a.channels_last:
            net.to(memory_format=torch.channels_last)
        if a.syncbn:
            net = forced_sync_batchnorm(net, device)
        self.net = net
        self.fwd = torch.compile(net) if a.compile else net
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if a.amp == "fp16" else 1.0)
        self.inputs = make_inputs(a, device)

    def autocast(self):
        dtype = AMP_DTYPES[self.a.amp]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def step(self, images=None, tokens=None, mask=None):
        """One training step, as train.py runs it."""
        from loss import segmentation_loss
        from train import optimizer_step
        if images is None:
            images, tokens, mask = self.inputs
        if self.a.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.net.train()
        with self.autocast():
            loss = segmentation_loss(self.fwd(images, tokens), mask)
        optimizer_step(loss, self.opt, self.scaler, self.params, self.a.amp)

    def train_step(self, *batch):
        with Timer(self.device) as t:
            self.step(*batch)
        return t.wall, t.cpu

    @torch.no_grad()
    def eval_forward(self):
        images, tokens, _ = self.inputs
        self.net.eval()
        with Timer(self.device) as t, self.autocast():
            self.fwd(images, tokens)
        return t.wall, t.cpu

    def train_with_data(self, steps):
        """images/s of training steps fed by build_loader (worker start-up and one warm-up batch excluded)."""
        from dataset import build_dataset, build_loader
        ds = build_dataset(self.a.data, "train", root=self.a.root, input_size=self.a.input_size,
                           word_len=self.a.word_len, num_samples=self.a.batch_size * (steps + 1), verbose=False)
        it = iter(build_loader(ds, self.a.batch_size, self.a.workers, pin_memory=self.device.type == "cuda"))
        n, elapsed = 0, 0.0
        for i in range(steps + 1):
            t0 = time.perf_counter()
            b = next(it)
            self.train_step(*(b[k].to(self.device, non_blocking=True) for k in ("image", "tokens", "mask")))
            if i:  # the first step waits for the workers to start
                elapsed += time.perf_counter() - t0
                n += b["image"].shape[0]
        return n / elapsed

    def eval_loop(self):
        from dataset import build_loader
        from evaluate import evaluate
        loader = build_loader(eval_dataset(self.a), self.a.eval_batch_size, self.a.workers,
                              pin_memory=self.device.type == "cuda")
        t0 = time.perf_counter()
        with self.autocast():
            out = evaluate(self.net, loader, self.device)
        return dict(seconds=time.perf_counter() - t0, n=out["n"], mIoU=out["mIoU"])


def stub_modules(*names):
    """Empty stand-ins for the authors' imports that the timed code never calls, where not installed."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.logger = types.SimpleNamespace(info=lambda *a, **k: None)  # loguru
            mod.Image = None  # PIL
            sys.modules[name] = mod


class Authors:
    """The authors' ETRIS built as their segmenter.py does (their ETRIS.__init__ only adds loading a TorchScript
    CLIP file), from their checkout at `repo`, with the same weights as ours."""

    def __init__(self, a, device, repo):
        import torch.nn as nn
        from clip_loader import random_clip_state_dict
        from tools.parity import fill_  # before their checkout goes on the path: it has a tools/ folder too
        stub_modules("loguru", "wandb", "lmdb", "pyarrow", "PIL")
        sys.path.insert(0, repo)
        from model.bridger import Bridger_RN, Bridger_ViT
        from model.clip import build_model
        from model.layers import GA, HA, Projector
        from model.segmenter import ETRIS
        if a.backbone not in AUTHORS_CFG:
            raise ValueError(f"--authors-repo compares {', '.join(AUTHORS_CFG)} only (the authors' Bridger taps "
                             f"fixed blocks 4/8/12), not {a.backbone}")
        self.a, self.device = a, device
        sd = random_clip_state_dict(a.backbone)
        vit = a.backbone.startswith("ViT")
        cfg = AUTHORS_CFG[a.backbone]
        net = ETRIS.__new__(ETRIS)
        nn.Module.__init__(net)
        net.backbone = (build_model(sd, a.word_len, a.input_size) if vit else build_model(sd, a.word_len)).float()
        for name, p in net.backbone.named_parameters():
            p.requires_grad_("positional_embedding" in name)
        net.bridger = Bridger_ViT(d_model=64, nhead=8) if vit else Bridger_RN(d_model=64, nhead=cfg["nhead"],
                                                                              fusion_stage=3)
        net.neck = HA(in_channels=cfg["fpn_in"], out_channels=[256, 512, 1024], stride=cfg["stride"])
        net.decoder = GA(num_layers=3, d_model=512, nhead=8, dim_ffn=512, dropout=0.1, return_intermediate=False)
        net.proj = Projector(cfg["word_dim"], 256, 3)
        fill_(net)
        self.net = net.to(device)
        # their train.py: Adam over the trainable parameters, no fused/foreach option; their AMP: fp16 + GradScaler
        self.opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=a.amp == "fp16")
        self.inputs = make_inputs(a, device)
        self.repo = repo

    def train_step(self):
        images, tokens, mask = self.inputs
        self.net.train()
        with Timer(self.device) as t:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.a.amp == "fp16"):
                _, _, loss = self.net(images, tokens, mask)
            self.opt.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        return t.wall, t.cpu

    @torch.no_grad()
    def eval_forward(self):
        images, tokens, _ = self.inputs
        self.net.eval()
        with Timer(self.device) as t:
            self.net(images, tokens)
        return t.wall, t.cpu

    def eval_loop(self):
        """Their test.py: RefDataset(mode='test') in a DataLoader(batch_size=1, num_workers=1), then
        engine.inference. Their LMDB (tools/folder2lmdb.py records) is an in-memory dict here."""
        import utils.dataset as their_data
        from engine import engine
        root, split = self.a.root, self.a.split
        records = json.load(open(os.path.join(root, "anns", "refcoco", f"{split}.json")))[:self.a.eval_samples]
        db = {b"__len__": len(records), b"__keys__": [str(i).encode() for i in range(len(records))]}
        for i, item in enumerate(records):
            read = lambda path: open(path, "rb").read()
            db[str(i).encode()] = dict(
                img=read(os.path.join(root, "images", "train2014", item["img_name"])),
                mask=read(os.path.join(root, "masks", "refcoco", f"{item['segment_id']}.png")),
                cat=item["cat"], seg_id=item["segment_id"], img_name=item["img_name"],
                num_sents=item["sentences_num"], sents=[s["sent"] for s in item["sentences"]])
        their_data.lmdb = types.SimpleNamespace(open=lambda *a, **k: _FakeEnv(db))
        their_data.loads_pyarrow = lambda x: x
        ds = their_data.RefDataset(lmdb_dir="memory", mask_dir=os.path.join(root, "masks", "refcoco"),
                                   dataset="refcoco", split=split, mode="test", input_size=self.a.input_size,
                                   word_length=self.a.word_len)
        ds._init_db()
        loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=1,
                                             pin_memory=self.device.type == "cuda")
        args = types.SimpleNamespace(word_len=self.a.word_len, visualize=False)
        engine.logger = types.SimpleNamespace(info=lambda *a, **k: None)
        engine.time = types.SimpleNamespace(sleep=lambda s: None)  # their fixed 2 s pause is not counted
        restore = torch.Tensor.cuda
        if self.device.type == "cpu":  # their loop moves tensors with .cuda(); on a CPU run that is a no-op
            torch.Tensor.cuda = lambda t, *args, **kw: t
        try:
            t0 = time.perf_counter()
            miou, _ = engine.inference(loader, self.net, args)
            seconds = time.perf_counter() - t0
        finally:
            torch.Tensor.cuda = restore
        n = sum(len(r["sentences"]) for r in records)
        return dict(seconds=seconds, n=n, mIoU=100.0 * miou)


class _FakeEnv:
    """lmdb environment stand-in: begin() -> a context manager whose get(key) returns the record."""

    def __init__(self, db):
        self.db = db

    def begin(self, write=False):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get(self, key):
        return self.db[key]


# ----------------------------------------------------------------------------- side-by-side driver

def worker(a):
    """Subprocess loop: builds one side, then answers 'train' / 'eval' / 'loop' / 'memory' requests on stdin."""
    out = sys.stdout
    sys.stdout = sys.stderr  # their code prints; keep the reply channel clean
    device = torch.device(a.device)
    side = Authors(a, device, a.authors_repo) if a.worker == "authors" else Ours(a, device)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    commands = {"train": side.train_step, "eval": side.eval_forward, "loop": side.eval_loop,
                "memory": lambda: peak_memory_mb(device)}
    for line in sys.stdin:
        if line.strip() not in commands:
            break
        out.write(json.dumps(commands[line.strip()]()) + "\n")
        out.flush()


class Remote:
    def __init__(self, kind, argv):
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + path))  # the caller's entries kept
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind] + argv,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.ask(None)

    def ask(self, cmd):
        if cmd is not None:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (code {self.p.wait()}); see its error above")
        return json.loads(line)

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.close()
        self.p.wait()


def side_by_side(a, argv):
    """Alternate ours / theirs: returns {side: {metric: runs}}, peak memory per side, load averages."""
    sides = {"ours": Remote("ours", argv), "authors": Remote("authors", argv)}
    runs = {k: {"train": [], "eval": [], "loop": []} for k in sides}
    loads = []
    try:
        for name in sides:  # warm-up (allocator, oneDNN / cuDNN primitive caches, compile)
            sides[name].ask("train")
            sides[name].ask("eval")
            if a.loop_repeats and a.root:  # every shape of the eval loop, once
                sides[name].ask("loop")
        for r in range(a.repeats):
            loads.append(os.getloadavg()[0])
            order = ("ours", "authors") if r % 2 == 0 else ("authors", "ours")
            for metric in ("train", "eval"):
                for name in order:
                    runs[name][metric].append(sides[name].ask(metric))
            if r < a.loop_repeats and a.root:
                for name in order:
                    runs[name]["loop"].append(sides[name].ask("loop"))
            print(f"repeat {r + 1}/{a.repeats}: load {loads[-1]:.1f} " + " ".join(
                f"{n}:{m}={runs[n][m][-1][0]:.3f}s wall/{runs[n][m][-1][1]:.3f}s cpu" for n in sides
                for m in ("train", "eval")), flush=True)
        memory = {n: sides[n].ask("memory") for n in sides}
    finally:
        for s in sides.values():
            s.close()
    loads.append(os.getloadavg()[0])
    return runs, memory, loads


def side_by_side_row(a, argv, head):
    worker_argv = [x for x in argv if x != "--write" and not x.endswith(".md")]
    runs, memory, loads = side_by_side(a, worker_argv)
    med = {n: {m: [statistics.median(x[k] for x in v) for k in (0, 1)] for m, v in r.items() if v and m != "loop"}
           for n, r in runs.items()}
    loop = {n: (sum(x["n"] for x in r["loop"]) / sum(x["seconds"] for x in r["loop"]) if r["loop"] else math.nan)
            for n, r in runs.items()}

    def cell(m):
        o, t = med["ours"][m], med["authors"][m]
        return f"{o[0]:.3f} / {t[0]:.3f} ({o[0] / t[0]:.2f}x); cpu {o[1]:.3f} / {t[1]:.3f} ({o[1] / t[1]:.2f}x)"
    lx = loop["ours"] / loop["authors"]
    row = "| " + " | ".join(head + [f"{min(loads):.1f}-{max(loads):.1f}", cell("train"), cell("eval"),
                                    f"{loop['ours']:.3f} / {loop['authors']:.3f} ({lx:.2f}x)",
                                    f"{memory['ours']:.0f} / {memory['authors']:.0f}"]) + " |"
    print(f"train step s ours / authors: {cell('train')}\neval forward s ours / authors: {cell('eval')}\n"
          f"eval loop sentences/s ours / authors: {loop['ours']:.3f} / {loop['authors']:.3f}\n"
          f"peak MB ours / authors: {memory['ours']:.0f} / {memory['authors']:.0f}")
    return row


# ----------------------------------------------------------------------------- one configuration

def measure(a, device):
    """Figures of our side for one configuration (see the module docstring); the sections in --skip are NaN."""
    ours = Ours(a, device)
    skip = set(a.skip.split(","))
    for _ in range(a.warmup):  # the first steps pay for autotuning, compilation and allocation
        ours.train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = statistics.median(ours.train_step()[0] for _ in range(a.steps))
    memory = peak_memory_mb(device)
    syncs = host_syncs(ours.step) if device.type == "cuda" else math.nan
    ours.eval_forward()
    evalf = statistics.median(ours.eval_forward()[0] for _ in range(a.steps))
    out = dict(train_img_s=a.batch_size / train, peak_mb=memory, host_syncs=syncs, eval_img_s=a.batch_size / evalf,
               data_img_s=ours.train_with_data(a.steps) if "data" not in skip else math.nan,
               loop_sent_s=math.nan, loader_samples_s=math.nan)
    if "loop" not in skip:
        ours.eval_loop()  # a first pass tunes cuDNN for each number of sentences per batch; the second is timed
        r = ours.eval_loop()
        out["loop_sent_s"] = r["n"] / r["seconds"]
    if "loader" not in skip:
        from dataset import build_dataset
        ds = build_dataset(a.data, "train", root=a.root, input_size=a.input_size, word_len=a.word_len,
                           num_samples=a.batch_size * (a.steps + 1), verbose=False)
        out["loader_samples_s"] = loader_throughput(ds, a.workers, a.batch_size, a.steps)
    if a.profile:
        from torch.profiler import profile
        for name, fn in (("train step", ours.train_step), ("eval forward", ours.eval_forward)):
            with profile() as prof:
                fn()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"--- {name}: top {a.profile} ops\n" + prof.key_averages().table(sort_by=key, row_limit=a.profile))
    if a.syncbn:
        torch.distributed.destroy_process_group()
    return out


def options(a):
    return ",".join(o for o, on in ((a.amp, a.amp != "off"), ("compile", a.compile), ("cudnn off", not a.cudnn),
                                    ("channels-last", a.channels_last), ("grad-ckpt", a.grad_checkpointing),
                                    ("SyncBN forced", a.syncbn))
                    if on) or "fp32 eager"


def write_row(path, header, row):
    """Append a table row under '## benchmark' in path (the section and its table header are created once)."""
    text = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    if "\n## benchmark\n" not in text:
        text = text.rstrip("\n") + "\n\n## benchmark\n\nRows appended by `tools/benchmark.py --write`.\n\n"
    if header not in text:
        text = text.rstrip("\n") + "\n\n" + header + "\n"
    lines = text.split("\n")
    at = max(i for i, line in enumerate(lines) if line == header.split("\n")[0])
    while at + 1 < len(lines) and lines[at + 1].startswith("|"):
        at += 1
    lines.insert(at + 1, row)
    with open(path, "w") as f:
        f.write("\n".join(lines))


OURS_HEADER = ("| date | command | machine | torch | options | load | train img/s (no data) | train img/s (data) | "
               "peak MB | eval fwd img/s | eval loop sent/s | loader samples/s |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|")
SBS_HEADER = ("| date | command | machine | torch | options | load (min-max) | train step s, wall (median) ours / authors "
              "(ratio); cpu | eval fwd s, wall ours / authors (ratio); cpu | eval loop sent/s ours / authors (x) | "
              "peak MB ours / authors |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- activation memory, on any machine

def activation_bytes(backbone, input_size, amp, batch, device=torch.device("cpu")):
    """Bytes of the tensors autograd keeps for backward in one training forward, parameters left out (they are
    kept anyway): the memory that grows with the batch. Counted on whatever device, so it can be estimated for a
    GPU on a CPU (the CPU's autocast keeps bf16 where CUDA's keeps fp16: the same two bytes)."""
    from clip_loader import random_clip_state_dict
    from loss import segmentation_loss
    from model import build_model
    net = build_model(backbone, random_clip_state_dict(backbone), input_size, 17).to(device).train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    a = types.SimpleNamespace(batch_size=batch, input_size=input_size, word_len=17)
    images, tokens, mask = make_inputs(a, device)
    dtype = AMP_DTYPES[amp] if device.type == "cuda" or amp == "off" else torch.bfloat16
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        segmentation_loss(net(images, tokens), mask)
    return sum(saved.values())


def memory_estimate(backbones=("ViT-B/16", "RN50", "RN101"), input_size=416, amp="fp16"):
    """Per backbone: activations per sample, the fixed part (fp32 weights; gradients and two Adam moments of the
    trained ones), and the per-GPU batch that leaves room on 24, 40 and 80 GB cards. An estimate: it leaves out
    the backward pass's transient buffers, cuDNN workspaces and allocator fragmentation (hence the 0.6 margin)."""
    rows = []
    for backbone in backbones:
        one, two = (activation_bytes(backbone, input_size, amp, b) for b in (1, 2))
        from clip_loader import random_clip_state_dict
        from model import build_model, parameter_counts
        counts = parameter_counts(build_model(backbone, random_clip_state_dict(backbone), input_size, 17))
        fixed = 4 * counts["total"] + 3 * 4 * counts["trainable"] + (one - (two - one))
        per_sample = two - one
        fits = {gb: max(0, int((0.6 * gb * 2 ** 30 - fixed) // per_sample)) for gb in (24, 40, 80)}
        rows.append(dict(backbone=backbone, per_sample_mb=per_sample / 2 ** 20, fixed_mb=fixed / 2 ** 20,
                         batch8_gb=(fixed + 8 * per_sample) / 2 ** 30, batch32_gb=(fixed + 32 * per_sample) / 2 ** 30,
                         **{f"batch_{gb}gb": n for gb, n in fits.items()}))
    return rows


# ----------------------------------------------------------------------------- the GPU check

def check_parts(a, device):
    """The GPU check's parts in order of value, each (name, seconds it is expected to take on one H100-class GPU,
    step configuration or None): the CUDA tests, kill-and-resume under torchrun, then the training-step rows people
    quote (ViT-B/16 at the authors' per-GPU batch 8; RN101, the backbone with the most BatchNorms, without and
    with SyncBN's synchronising path, whose difference is what SyncBN costs a multi-GPU step; cuDNN off, as the
    authors' train.py runs; batch 32 in fp16 and bf16), the authors' step side by side, and torch.compile last, the
    slowest to start. A step configuration: (backbone, batch, amp, cuDNN, compile, SyncBN forced). The expected
    seconds are docs/gpus.md's timeline."""
    if device.type != "cuda":  # the plumbing, tested on the CPU
        return [("tests", 30, None), ("resume", 60, None),
                ("step-fp32", 20, (a.backbone, 2, "off", True, False, False)),
                ("step-bf16", 20, (a.backbone, 2, "bf16", True, False, False)), ("authors", 60, None)]
    vit = a.backbone
    return [("tests", 100, None), ("resume", 40, None),
            ("vit8-fp16", 30, (vit, 8, "fp16", True, False, False)),
            ("rn101-fp16", 20, ("RN101", 8, "fp16", True, False, False)),
            ("rn101-fp16-syncbn", 20, ("RN101", 8, "fp16", True, False, True)),
            ("vit8-fp16-cudnn-off", 20, (vit, 8, "fp16", False, False, False)),
            ("vit32-fp16", 25, (vit, 32, "fp16", True, False, False)),
            ("vit32-bf16", 25, (vit, 32, "bf16", True, False, False)),
            ("authors", 60, None),
            ("vit32-bf16-compile", 150, (vit, 32, "bf16", True, True, False))]


def chosen_parts(selection, names, status):
    """The part names that --parts selects: 'all'; 'failed': those of the last runs (the status file) that failed,
    timed out, were skipped for time or never ended (the run was killed); or a comma list of names."""
    if selection == "all":
        return list(names)
    if selection == "failed":
        return [n for n in names if status.get(n, {}).get("status") in ("failed", "timed out", "skipped", "started")]
    asked = selection.split(",")
    unknown = [n for n in asked if n not in names]
    if unknown:
        raise UserError(f"--parts: unknown part(s) {', '.join(unknown)}; the parts are all, failed, or some of "
                         f"{', '.join(names)}")
    return asked


def logged_run(cmd, log, timeout, env=None, cwd=ROOT):
    """Run cmd (in its own process group) with all its output appended to the file `log`; its exit code, or None
    if it ran past `timeout` seconds, when the whole group is killed (mp.spawn's and torchrun's children too)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}   # {datetime.datetime.now():%H:%M:%S}, limit {timeout:.0f} s\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def last_run_of(log):
    """The output of the last logged_run into `log`."""
    text = open(log).read()
    return text[text.rindex("\n$ ") + 1:]


def test_outcomes(xml_file, log):
    """{test id: (outcome, first line of its error or skip reason)}: from pytest's --junitxml file, or, when pytest
    was killed before writing it, from the -v lines of its log (then without the errors)."""
    import xml.etree.ElementTree as ET
    if not os.path.isfile(xml_file):
        lines = re.findall(r"^(tests/\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED)\b", last_run_of(log), re.M)
        return {test: (outcome.lower(), "") for test, outcome in lines}
    out = {}
    for case in ET.parse(xml_file).iter("testcase"):
        test = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        out[test] = ("passed", "")
        for tag, outcome in (("skipped", "skipped"), ("error", "error"), ("failure", "failed")):
            element = case.find(tag)
            if element is not None:
                message = (element.get("message") or element.text or "").strip()
                out[test] = (outcome, message.splitlines()[0] if message else "")
    return out


def cuda_tests_part(log, timeout, env, passed_before):
    """pytest tests/test_cuda.py, less the tests that passed before (a `--parts failed` rerun): (status, lines)."""
    xml_file = log[:-len(".log")] + ".xml"
    if os.path.isfile(xml_file):
        os.remove(xml_file)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml_file}",
           "tests/test_cuda.py"] + [x for test in passed_before for x in ("--deselect", test)]
    t0 = time.time()
    code = logged_run(cmd, log, timeout, env)
    outcomes = test_outcomes(xml_file, log)
    counts = {k: sum(o == k for o, _ in outcomes.values()) for k in ("passed", "failed", "error", "skipped")}
    failed = [(t, m) for t, (o, m) in outcomes.items() if o in ("failed", "error")]
    reasons = sorted({m for o, m in outcomes.values() if o == "skipped"})
    status = "timed out" if code is None else "ok" if code in (0, 5) and not failed else "failed"
    lines = [f"- `pytest tests/test_cuda.py`" + (f" less the {len(passed_before)} tests passed before" if passed_before
                                                 else "") +
             f": {status}, " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" in {time.time() - t0:.0f} s" +
             (f" (stopped at {timeout:.0f} s)" if code is None else "") + f"; full log {os.path.basename(log)}"]
    lines += [f"  - FAILED {t}: {m}" for t, m in failed] + [f"  - skipped: {r}" for r in reasons]
    passed = sorted(set(passed_before) | {t for t, (o, _) in outcomes.items() if o == "passed"})
    return {"status": status, "passed": passed, "failed": [t for t, _ in failed]}, lines


def killed_and_resumed_run(a, folder, log, timeout, env=None):
    """`torchrun --nproc_per_node 1 train.py --data synthetic` on random CLIP weights of the real shapes, killed
    by SIGKILL once it has saved, then resumed with --resume auto to the end: (status, lines)."""
    from clip_loader import random_clip_state_dict
    clip_file, out = os.path.join(folder, "clip.pt"), os.path.join(folder, "run")
    torch.save(random_clip_state_dict(a.backbone), clip_file)
    amp = "fp16" if a.device == "cuda" else "off"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "train.py", "--data", "synthetic",
           "--backbone", a.backbone, "--clip-weights", clip_file, "--input-size", str(a.input_size),
           "--batch-size", "4", "--train-samples", "32", "--val-samples", "4", "--epochs", "2", "--workers", "2",
           "--save-every-steps", "2", "--log-every", "2", "--amp", amp, "--device", a.device, "--output", out,
           "--resume", "auto"]
    last = os.path.join(out, "last.pth")
    deadline = time.time() + timeout
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}   # to be killed after its first save\n")
        f.flush()
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while not os.path.exists(last) and first.poll() is None and time.time() < deadline - timeout / 2:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = torch.load(last, weights_only=True)["progress"]["global_step"] if os.path.exists(last) else None
    code = logged_run(cmd, log, max(30.0, deadline - time.time()), env)
    steps = [json.loads(line)["global_step"] for line in open(os.path.join(out, "metrics.jsonl"))] \
        if code is not None and os.path.isfile(os.path.join(out, "metrics.jsonl")) else None
    ok = code == 0 and "resumed from" in last_run_of(log) and killed_at is not None and killed_at < 16 and \
        steps == [8, 16]
    status = "ok" if ok else "timed out" if code is None else "failed"
    return {"status": status}, [
        f"- `torchrun {' '.join(cmd[3:])}`, killed after its first save, then resumed; full log "
        f"{os.path.basename(log)}", f"  {status}: killed at step {killed_at} of 16, resumed, exit {code}, steps at "
                                    f"the end of each epoch {steps}"]


STEP_HEADER = ("| part | backbone | batch | amp | cuDNN | compile | SyncBN | img/s | peak MB | host syncs/step | "
               "eval fwd img/s | eval loop sent/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def step_row_part(a, name, config, log, timeout, env, first_row):
    """One training-step row (tools/benchmark.py in a subprocess): (status, [table row])."""
    backbone, batch, amp, cudnn, compiled, syncbn = config
    cmd = [sys.executable, os.path.abspath(__file__), "--backbone", backbone, "--input-size", str(a.input_size),
           "--batch-size", str(batch), "--amp", amp, "--device", a.device, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--skip", "data,loader" + ("" if first_row else ",loop"), "--json",
           "--data", a.data, "--split", a.split] + (["--root", a.root] if a.root else []) + \
        (["--no-cudnn"] if not cudnn else []) + (["--compile"] if compiled else []) + (["--syncbn"] if syncbn else [])
    code = logged_run(cmd, log, timeout, env)
    output = last_run_of(log).strip().splitlines()
    results = [json.loads(line) for line in output if line.startswith('{"train_img_s"')]
    r = results[-1] if code == 0 and results else None
    cells = ["-" if math.isnan(r[k]) else f"{r[k]:.{digits}f}" for k, digits in (
        ("train_img_s", 1), ("peak_mb", 0), ("host_syncs", 0), ("eval_img_s", 1), ("loop_sent_s", 1))] if r else \
        [f"timed out after {timeout:.0f} s" if code is None else f"failed: {output[-1][:160] if output else '?'}"]
    first = [name, backbone, str(batch), amp, "on" if cudnn else "off", str(compiled), "forced" if syncbn else "-"]
    status = "ok" if r else "timed out" if code is None else "failed"
    return {"status": status}, ["| " + " | ".join(first + cells) + " |"]


def gpu_check(a, argv):
    """The GPU check: the parts of check_parts that --parts selects, in their order, each appending its figures to
    --out as soon as it ends (a run cut short still reports its first parts) and all its output to logs/<part>.log
    beside it. A part whose expected time no longer fits in --budget is skipped. Each part's outcome goes to
    --status (default: gpu_check_status.json beside --out), so that `--parts failed` reruns only what failed,
    timed out or was skipped (of the CUDA tests, those that did not pass)."""
    start, device = time.time(), torch.device(a.device)
    folder = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    status_file = a.status or os.path.join(folder, "gpu_check_status.json")
    status = json.load(open(status_file)) if os.path.isfile(status_file) else {}
    parts = check_parts(a, device)
    chosen = chosen_parts(a.parts, [n for n, _, _ in parts], status)
    status.update({n: dict(status.get(n, {}), status="started") for n in chosen})
    # a check run on the CPU hides any GPU from its subprocesses, so that the CUDA tests skip there too
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else None

    def report(*lines):
        with open(a.out, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        print(*lines, sep="\n", flush=True)
    report(f"\n## GPU check, {datetime.datetime.now():%Y-%m-%d %H:%M}\n", f"`python tools/benchmark.py "
           f"{' '.join(argv)}` on {machine(device)}, torch {torch.__version__}; parts: {', '.join(chosen)}\n")
    rows, in_table = 0, False
    for name, seconds, config in parts:
        if name not in chosen:
            continue
        log, left = os.path.join(folder, "logs", f"{name}.log"), a.budget - (time.time() - start)
        if config and not in_table:
            report(f"\nTraining steps at {a.input_size} px (median of {a.steps} steps after {a.warmup}; host syncs "
                   f"counted in one step by CUDA's sync debug mode; full logs logs/<part>.log):\n", STEP_HEADER)
        elif in_table and not config:
            report("")
        rows, in_table = rows + bool(config), bool(config)
        if name == "authors" and not a.authors_repo:
            status[name], lines = {"status": "not asked"}, ["- authors: skipped, no --authors-repo (a checkout of "
                                                            "github.com/kkakkkka/ETRIS)"]
        elif left < seconds:
            status[name] = {"status": "skipped"}
            lines = [f"| {name} | skipped: {left:.0f} s left, it takes ~{seconds} s |" if config else
                     f"- {name}: skipped, {left:.0f} s left and it takes ~{seconds} s"]
        else:
            status[name], lines = run_part(a, name, config, log, min(left, 2.5 * seconds), env, status, rows == 1)
        report(*lines)
        with open(status_file, "w") as f:
            json.dump(status, f, indent=1)
    report(f"\n(the check took {time.time() - start:.0f} s; parts not ok: "
           f"{', '.join(n for n in chosen if status[n]['status'] not in ('ok', 'not asked')) or 'none'})")


def run_part(a, name, config, log, timeout, env, status, first_row):
    if name == "tests":
        passed = status.get("tests", {}).get("passed", []) if a.parts == "failed" else []
        return cuda_tests_part(log, timeout, env, passed)
    if name == "resume":
        with tempfile.TemporaryDirectory() as folder:
            return killed_and_resumed_run(a, folder, log, timeout, env)
    if name == "authors":
        code = logged_run([sys.executable, os.path.abspath(__file__), "--backbone", a.backbone, "--input-size",
                           str(a.input_size), "--batch-size", "8", "--amp", "fp16", "--no-cudnn", "--device", a.device,
                           "--authors-repo", a.authors_repo, "--repeats", "3", "--write", a.out], log, timeout, env)
        state = "ok" if code == 0 else "timed out" if code is None else "failed"
        return {"status": state}, [f"- authors' training step side by side (fp16, batch 8, cuDNN off for both; its "
                                   f"row in the benchmark table below): {state}; full log {os.path.basename(log)}"]
    return step_row_part(a, name, config, log, timeout, env, first_row)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="ViT-B/16", help="a backbone name of clip_loader.BACKBONES")
    p.add_argument("--input-size", type=number(int, 16), default=416, help="image side")
    p.add_argument("--word-len", type=number(int, 1, 77), default=17, help="tokens per sentence")
    p.add_argument("--batch-size", type=number(int, 1), default=2, help="training batch of the step rows")
    p.add_argument("--eval-batch-size", type=number(int, 1), default=8, help="refs per evaluate() batch (all their sentences)")
    p.add_argument("--eval-samples", type=number(int, 1), default=16, help="refs in the eval loop")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=number(int, 1), default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=number(int, 0), default=1, help="untimed steps first")
    p.add_argument("--repeats", type=number(int, 1), default=5, help="side by side: ours/theirs alternations")
    p.add_argument("--loop-repeats", type=number(int, 1), default=2, help="side by side: eval-loop alternations")
    p.add_argument("--data", default="synthetic", help="dataset of the data-included figures and the eval loop")
    p.add_argument("--root", default=None, help="its folder (a prepared folder for the authors' eval loop)")
    p.add_argument("--split", default="testA", help="eval-loop split (synthetic: test)")
    p.add_argument("--workers", type=number(int, 0), default=1, help="data loader workers of the data rows")
    p.add_argument("--no-fill", dest="fill", action="store_false", help="keep the random init, not parity.py's")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off", help="autocast dtype (fp16 with GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-cudnn", dest="cudnn", action="store_false", help="cuDNN off, as the authors' train.py")
    p.add_argument("--channels-last", action="store_true", help="channels-last convolutions (CUDA)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the frozen CLIP in backward")
    p.add_argument("--syncbn", action="store_true",
                   help="every BN a SyncBatchNorm on its synchronising path, as under torchrun (CUDA only)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: data,loop,loader")
    p.add_argument("--profile", type=number(int, 0), default=0, help="print the top N ops of one train step and one eval forward")
    p.add_argument("--authors-repo", default=None, help="the authors' ETRIS checkout: side-by-side comparison")
    p.add_argument("--write", default=None, help="append the result row to this markdown file (BENCHMARKS.md)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    p.add_argument("--memory-estimate", action="store_true", help="activation memory per sample, per backbone")
    p.add_argument("--gpu-check", action="store_true", help="the prepared GPU check (see gpu_check)")
    p.add_argument("--out", default="gpu_check.md", help="--gpu-check: the file its figures are appended to")
    p.add_argument("--budget", type=number(float, 0, low_open=True), default=360.0, help="--gpu-check: seconds it may take")
    p.add_argument("--parts", default="all", help="--gpu-check: all, failed (rerun what did not pass), or names")
    p.add_argument("--status", default=None, help="--gpu-check: the parts' outcomes, read by --parts failed "
                                                  "(default: gpu_check_status.json beside --out)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.authors_repo and not os.path.isdir(os.path.join(a.authors_repo, "model")):
        p.error(f"--authors-repo {a.authors_repo} has no model/ folder: give the root of a checkout of "
                f"github.com/kkakkkka/ETRIS")
    a.device = a.device or default_device()
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.enabled = a.cudnn
    torch.backends.cudnn.benchmark = a.cudnn
    if a.worker:
        return worker(a)
    if a.gpu_check:
        return gpu_check(a, argv)
    if a.memory_estimate:
        rows = memory_estimate(input_size=a.input_size, amp=a.amp)
        for r in rows:
            print(json.dumps(r))
        return rows
    device = torch.device(a.device)
    head = [datetime.date.today().isoformat(), f"`python tools/benchmark.py {' '.join(argv)}`", machine(device),
            torch.__version__, options(a)]
    if a.authors_repo:
        row = side_by_side_row(a, argv, head)
        if a.write:
            write_row(a.write, SBS_HEADER, row)
        return
    load0 = os.getloadavg()[0]
    r = measure(a, device)
    load1 = os.getloadavg()[0]
    print(f"{a.backbone} {a.input_size}px batch {a.batch_size} on {machine(device)} ({options(a)}), load "
          f"{load0:.1f}-{load1:.1f}\ntrain {r['train_img_s']:.2f} img/s (data excluded), {r['data_img_s']:.2f} img/s "
          f"(data included), peak memory {r['peak_mb']:.0f} MB\neval forward {r['eval_img_s']:.2f} img/s; eval loop "
          f"{r['loop_sent_s']:.2f} sentences/s; loader {r['loader_samples_s']:.1f} samples/s")
    if a.write:
        write_row(a.write, OURS_HEADER, "| " + " | ".join(head + [f"{load0:.1f}-{load1:.1f}"] + [
            f"{r[k]:.2f}" for k in ("train_img_s", "data_img_s", "peak_mb", "eval_img_s", "loop_sent_s",
                                    "loader_samples_s")]) + " |")
    if a.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    run_cli(main)
