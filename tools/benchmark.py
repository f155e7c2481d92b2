"""
Speed and memory of ETRIS, beside the recipe: the whole model of paper Fig. 2 on random CLIP weights of the real
shapes (no download), optionally side by side with the authors' released code on the same weights; and the GPU
check, one prepared script for a GPU lease.

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


def forced_sync_batchnorm(net, device):
    """net with every BatchNorm a SyncBatchNorm that takes its synchronising path (all-gather the statistics,
    then drop empty ranks' entries with a mask, which waits for the GPU) even in this one-process NCCL group,
    where nn.SyncBatchNorm would fall back to plain batch norm: what SyncBN costs each step of a multi-GPU run
    (train.py converts the whole model, the frozen backbone's train-mode BNs included), measured on one GPU."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm
    if device.type != "cuda":
        raise SystemExit("--syncbn needs a CUDA device (SyncBatchNorm runs on GPUs only)")

    class ForcedSyncBatchNorm(nn.SyncBatchNorm):
        def forward(self, x):
            if not self.training:
                return super().forward(x)
            self.num_batches_tracked.add_(1)
            return sync_batch_norm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                         self.momentum, dist.group.WORLD, 1)

    index = device.index if device.index is not None else torch.cuda.current_device()
    dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1,
                            device_id=torch.device("cuda", index))
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in net.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = ForcedSyncBatchNorm
    return net


def batchnorm_forwards(backbone, grad_checkpointing, input_size=64):
    """Train-mode BatchNorm forwards in one training step (forward and backward): under torchrun on GPUs each is
    a SyncBatchNorm forward, which makes the host wait for the GPU once."""
    import torch.nn as nn
    from clip_loader import random_clip_state_dict
    from loss import segmentation_loss
    from model import build_model
    net = build_model(backbone, random_clip_state_dict(backbone), input_size, 17).set_grad_checkpointing(
        grad_checkpointing).train()
    calls = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(lambda mod, *_: calls.append(1) if mod.training else None)
    images, tokens, mask = make_inputs(types.SimpleNamespace(batch_size=2, input_size=input_size, word_len=17),
                                       torch.device("cpu"))
    segmentation_loss(net(images, tokens), mask).backward()
    return len(calls)


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

def check_configs(a, device):
    """(backbone, batch, amp, cuDNN, compile, SyncBN forced) of the training-step figures: the ViT at the authors'
    per-GPU batch 8 and at 32, fp16 and bf16, cuDNN off (as the authors' train.py runs) and on; RN101, the
    backbone with the most BatchNorms, without and with SyncBN's synchronising path (what torchrun's SyncBN costs
    a step); torch.compile last (the slowest to start)."""
    if device.type != "cuda":  # the plumbing, tested on the CPU
        return [(a.backbone, 2, "off", True, False, False), (a.backbone, 2, "bf16", True, False, False)]
    vit = a.backbone
    return [(vit, 8, "fp16", True, False, False), ("RN101", 8, "fp16", True, False, False),
            ("RN101", 8, "fp16", True, False, True), (vit, 8, "fp16", False, False, False),
            (vit, 32, "fp16", True, False, False), (vit, 32, "bf16", True, False, False),
            (vit, 32, "bf16", True, True, False)]


def run_logged(cmd, report, timeout, **kwargs):
    """Run cmd; its output's last lines go into the report. Returns the CompletedProcess (None on timeout)."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        report(f"    (stopped after {timeout:.0f} s)")
        return None
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    report("    " + "\n    ".join(tail))
    return done


def killed_and_resumed_run(a, folder, report, timeout, env=None):
    """`torchrun --nproc_per_node 1 train.py --data synthetic` on random CLIP weights of the real shapes, killed
    by SIGKILL once it has saved, then resumed with --resume auto to the end."""
    from clip_loader import random_clip_state_dict
    clip_file, out = os.path.join(folder, "clip.pt"), os.path.join(folder, "run")
    torch.save(random_clip_state_dict(a.backbone), clip_file)
    amp = "fp16" if a.device == "cuda" else "off"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "train.py", "--data", "synthetic",
           "--backbone", a.backbone, "--clip-weights", clip_file, "--input-size", str(a.input_size),
           "--batch-size", "4", "--train-samples", "32", "--val-samples", "4", "--epochs", "2", "--workers", "2",
           "--save-every-steps", "2", "--log-every", "2", "--amp", amp, "--device", a.device, "--output", out,
           "--resume", "auto"]
    report(f"- `{' '.join(cmd[3:])}` (via torchrun), killed after its first save, then resumed:")
    last = os.path.join(out, "last.pth")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env=env)
    deadline = time.time() + timeout / 2
    while not os.path.exists(last) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = torch.load(last, weights_only=True)["progress"]["global_step"] if os.path.exists(last) else None
    done = run_logged(cmd, report, max(30.0, deadline + timeout / 2 - time.time()), env=env)
    if done is not None:
        steps = [json.loads(line)["global_step"] for line in open(os.path.join(out, "metrics.jsonl"))]
        ok = done.returncode == 0 and "resumed from" in done.stdout and killed_at is not None and \
            killed_at < 16 and steps == [8, 16]
        report(f"  {'ok' if ok else 'FAILED'}: killed at step {killed_at} of 16, resumed, exit {done.returncode}, "
               f"steps at the end of each epoch {steps}")


def gpu_check(a, argv):
    """The GPU check, in this order so that a run cut off by the lease still reports the first parts: the CUDA
    tests; a short torchrun run killed and resumed; the training step's throughput and peak memory over
    check_configs; evaluation sentences/s for the full protocol; the authors' step when their checkout is given.
    Every part appends to --out as soon as it ends; parts that no longer fit in --budget are skipped."""
    start = time.time()
    device = torch.device(a.device)

    def report(line):
        with open(a.out, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def left():
        return a.budget - (time.time() - start)
    # a check run on the CPU hides any GPU from its subprocesses, so that the CUDA tests skip there too
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else None
    report(f"\n## GPU check, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n`python tools/benchmark.py {' '.join(argv)}` "
           f"on {machine(device)}, torch {torch.__version__}\n\n1. CUDA tests (`pytest tests/test_cuda.py`):")
    run_logged([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"], report,
               min(150.0, left()), env=env)
    report("\n2. Kill and resume under torchrun:")
    with tempfile.TemporaryDirectory() as folder:
        killed_and_resumed_run(a, folder, report, min(120.0, left()), env)
    report(f"\n3. Training step at {a.input_size} px (median of {a.steps} steps after {a.warmup}; host syncs: "
           f"counted in one step by CUDA's sync debug mode):\n\n"
           "| backbone | batch | amp | cuDNN | compile | SyncBN | img/s | peak MB | host syncs/step | eval fwd img/s | "
           "eval loop sent/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (backbone, batch, amp, cudnn, compiled, syncbn) in enumerate(check_configs(a, device)):
        first = [backbone, str(batch), amp, "on" if cudnn else "off", str(compiled), "forced" if syncbn else "-"]
        if left() < (150 if compiled else 40):
            report("| " + " | ".join(first + ["skipped: out of time"] + [""] * 4) + " |")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--backbone", backbone, "--input-size", str(a.input_size),
               "--batch-size", str(batch), "--amp", amp, "--device", a.device, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--skip", "data,loader" + ("" if i == 0 else ",loop"), "--json",
               "--data", a.data, "--split", a.split] + (["--root", a.root] if a.root else []) + \
              (["--no-cudnn"] if not cudnn else []) + (["--compile"] if compiled else []) + \
              (["--syncbn"] if syncbn else [])
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, left()), env=env)
            r = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
            r, done = None, None
        cells = [f"{r['train_img_s']:.1f}", f"{r['peak_mb']:.0f}",
                 "-" if math.isnan(r["host_syncs"]) else f"{r['host_syncs']:.0f}", f"{r['eval_img_s']:.1f}",
                 f"{r['loop_sent_s']:.1f}"] if r else \
            ["failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120] if done else "timed out"]
        report("| " + " | ".join(first + cells) + " |")
    if a.authors_repo and left() > 90:
        report("\n4. The authors' training step, side by side (fp16, batch 8, their cuDNN setting off for both):")
        run_logged([sys.executable, os.path.abspath(__file__), "--backbone", a.backbone, "--input-size",
                    str(a.input_size), "--batch-size", "8", "--amp", "fp16", "--no-cudnn", "--device", a.device,
                    "--authors-repo", a.authors_repo, "--repeats", "3", "--write", a.out], report, left())
    elif a.authors_repo:
        report("\n4. The authors' training step: skipped, out of time")
    else:
        report("\n4. The authors' training step: skipped, no --authors-repo (a checkout of github.com/kkakkkka/ETRIS)")
    report(f"\n(the check took {time.time() - start:.0f} s)")


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--input-size", type=int, default=416)
    p.add_argument("--word-len", type=int, default=17)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--eval-batch-size", type=int, default=8, help="refs per evaluate() batch (all their sentences)")
    p.add_argument("--eval-samples", type=int, default=16, help="refs in the eval loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="side by side: ours/theirs alternations")
    p.add_argument("--loop-repeats", type=int, default=2, help="side by side: eval-loop alternations")
    p.add_argument("--data", default="synthetic", help="dataset of the data-included figures and the eval loop")
    p.add_argument("--root", default=None, help="its folder (a prepared folder for the authors' eval loop)")
    p.add_argument("--split", default="testA", help="eval-loop split (synthetic: test)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-fill", dest="fill", action="store_false", help="keep the random init, not parity.py's")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="off", help="autocast dtype (fp16 with GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-cudnn", dest="cudnn", action="store_false", help="cuDNN off, as the authors' train.py")
    p.add_argument("--channels-last", action="store_true", help="channels-last convolutions (CUDA)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the frozen CLIP in backward")
    p.add_argument("--syncbn", action="store_true",
                   help="every BN a SyncBatchNorm on its synchronising path, as under torchrun (CUDA only)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: data,loop,loader")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of one train step and one eval forward")
    p.add_argument("--authors-repo", default=None, help="the authors' ETRIS checkout: side-by-side comparison")
    p.add_argument("--write", default=None, help="append the result row to this markdown file (BENCHMARKS.md)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    p.add_argument("--memory-estimate", action="store_true", help="activation memory per sample, per backbone")
    p.add_argument("--gpu-check", action="store_true", help="the prepared GPU check (see gpu_check)")
    p.add_argument("--out", default="gpu_check.md", help="--gpu-check: the file its figures are appended to")
    p.add_argument("--budget", type=float, default=400.0, help="--gpu-check: seconds it may take")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.authors_repo and not os.path.isdir(os.path.join(a.authors_repo, "model")):
        p.error(f"--authors-repo {a.authors_repo} has no model/ folder: give the root of a checkout of "
                f"github.com/kkakkkka/ETRIS")
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
    main()
