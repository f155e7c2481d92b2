"""
Speed and memory benchmarks of ETRIS (the whole model of paper Fig. 2 on random CLIP weights of the real
shapes: no download), optionally side by side with the authors' released code on the same weights.

Measured for one backbone / input size / batch / device:
- train: a training step (forward, BCE loss, backward, Adam step) in images/s, on fixed tensors (data
  excluded) and through build_loader (data included); peak memory (CUDA: max allocated; CPU: peak RSS);
- eval forward: images/s of net(images, tokens) under no_grad;
- eval loop: sentences/s of evaluate.evaluate, the full test protocol (every sentence, warp back to the
  original size, IoU against the original mask) on a small fake REFER split written by dataset.py;
- loader: dataset.loader_throughput samples/s.

    python benchmark.py --backbone tiny-ViT --input-size 128 --batch-size 4             # quick
    python benchmark.py --backbone ViT-B/16 --threads 2 --write BENCHMARKS.md            # 416 px, batch 2
    python benchmark.py --backbone ViT-B/16 --authors-repo ~/ETRIS --repeats 5 --write BENCHMARKS.md

--authors-repo PATH runs the authors' model (their checkout, imported at run time from PATH; nothing of it is
part of this repository) in a second process, with the same weights (tests/parity_fill.py), and alternates
ours / theirs measurements (A B A B ...) so that load changes hit both; medians are reported. Their training
step is their ETRIS.forward in train mode (loss inside) + backward + their optimizer (plain Adam); their eval
loop is their engine.inference on their RefDataset in test mode (batch 1, one forward per sentence, CPU warps),
its LMDB replaced by an in-memory dict of the same records. Their modules that the timed code does not use
(loguru, wandb, lmdb, pyarrow, PIL) are stubbed where not installed.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# OpenAI's architectures: CLIP(embed_dim, vision_layers, vision_width, patch, grid, context, vocab, text width,
# text heads, text layers); the authors' CLIP constructor takes the same numbers plus a resolution
CLIP_SHAPES = {
    "ViT-B/16": (512, 12, 768, 16, 14, 77, 49408, 512, 8, 12),
    "RN50": (1024, (3, 4, 6, 3), 64, None, 7, 77, 49408, 512, 8, 12),
    "RN101": (512, (3, 4, 23, 3), 64, None, 7, 77, 49408, 512, 8, 12),
}
# the authors' config/refcoco/bridge_*.yaml values for the side-by-side model
AUTHORS_CFG = {
    "ViT-B/16": dict(word_dim=512, nhead=8, stride=[1, 1, 1], fpn_in=[768, 768, 512]),
    "RN50": dict(word_dim=1024, nhead=4, stride=[2, 1, 2], fpn_in=[512, 1024, 1024]),
    "RN101": dict(word_dim=512, nhead=4, stride=[2, 1, 2], fpn_in=[512, 1024, 512]),
}


def random_clip_state_dict(backbone, seed=0):
    """A CLIP state dict with OpenAI's key names and the real shapes of `backbone` (random values; fill with
    tests/parity_fill.py for comparisons), or the tiny test CLIP for 'tiny-*'."""
    from clip_loader import CLIP, tiny_clip_state_dict
    if backbone.startswith("tiny-"):
        return tiny_clip_state_dict(backbone[len("tiny-"):], seed)
    if backbone not in CLIP_SHAPES:
        raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(CLIP_SHAPES)}, tiny-ViT, tiny-RN")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIP(*CLIP_SHAPES[backbone], word_len=77)
    return {k: v for k, v in clip.state_dict().items() if ".connect." not in k}


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


def fake_split(root, input_size, n_images=4):
    """A small REFER release (640x480 JPEGs) and its prepared folder under root; returns the prepared folder."""
    from dataset import fake_refer_release, prepare
    release, prepared = os.path.join(root, "release"), os.path.join(root, "prepared")
    if not os.path.isdir(os.path.join(prepared, "anns", "refcoco")):
        fake_refer_release(release, "refcoco", n_images=n_images, refs_per_image=4, size=(480, 640))
        prepare(release, "refcoco", prepared)
    return prepared


# ----------------------------------------------------------------------------- the two sides

class Ours:
    """Our model with the fast-path options; every method returns seconds (or a dict)."""

    def __init__(self, a, device):
        from model import build_model
        self.a, self.device = a, device
        net = build_model(a.backbone, clip_weights=random_clip_state_dict(a.backbone), input_size=a.input_size,
                          word_len=a.word_len)
        if a.fill:
            from tests.parity_fill import fill_
            fill_(net)
        net.to(device)
        if a.channels_last:
            net.to(memory_format=torch.channels_last)
        if a.checkpoint_backbone:
            net.checkpoint_backbone()
        self.net = net
        self.fwd = torch.compile(net) if a.compile else net
        params = [p for p in net.parameters() if p.requires_grad]
        # fused Adam: one kernel over all parameters instead of ~6 per parameter tensor (CPU and CUDA)
        self.opt = torch.optim.Adam(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))
        self.inputs = make_inputs(a, device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.a.bf16)

    def train_step(self, images=None, tokens=None, mask=None):
        from loss import segmentation_loss
        if images is None:
            images, tokens, mask = self.inputs
        if self.a.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.net.train()
        with Timer(self.device) as t:
            with self.autocast():
                loss = segmentation_loss(self.fwd(images, tokens).float(), mask)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
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
                           word_len=self.a.word_len, num_samples=self.a.batch_size * (steps + 1))
        it = iter(build_loader(ds, self.a.batch_size, train=True, workers=self.a.workers))
        n, elapsed = 0, 0.0
        for i in range(steps + 1):
            t0 = time.perf_counter()
            b = next(it)
            self.train_step(*(b[k].to(self.device, non_blocking=True) for k in ("image", "tokens", "mask")))
            if i:  # the first step waits for the workers to start
                elapsed += time.perf_counter() - t0
                n += b["image"].shape[0]
        return n / elapsed

    def eval_loop(self, prepared, split):
        from dataset import build_dataset, build_loader
        from evaluate import evaluate
        ds = build_dataset("refcoco", split, root=prepared, input_size=self.a.input_size, word_len=self.a.word_len)
        loader = build_loader(ds, self.a.eval_batch_size, train=False, workers=self.a.workers)
        t0 = time.perf_counter()
        with self.autocast():
            out = evaluate(self.fwd, loader, self.device)
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
        stub_modules("loguru", "wandb", "lmdb", "pyarrow", "PIL")
        sys.path.insert(0, repo)
        import torch.nn as nn
        from model.bridger import Bridger_RN, Bridger_ViT
        from model.clip import CLIP, build_model
        from model.layers import GA, HA, Projector
        from model.segmenter import ETRIS
        from tests.parity_fill import fill_
        if a.backbone not in AUTHORS_CFG:
            raise ValueError(f"--authors-repo compares {', '.join(AUTHORS_CFG)} only (the authors' Bridger taps "
                             f"fixed blocks 4/8/12), not {a.backbone}")
        self.a, self.device = a, device
        s = CLIP_SHAPES[a.backbone]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sd = CLIP(s[0], s[4] * (s[3] or 32), s[1], s[2], s[3], s[5], a.word_len, *s[6:]).state_dict()
        sd = {k: v for k, v in sd.items() if ".connect." not in k}
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
        # their train.py: Adam over the trainable parameters, no fused/foreach option
        self.opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        self.inputs = make_inputs(a, device)
        self.repo = repo

    def train_step(self):
        images, tokens, mask = self.inputs
        self.net.train()
        with Timer(self.device) as t:
            _, _, loss = self.net(images, tokens, mask)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return t.wall, t.cpu

    @torch.no_grad()
    def eval_forward(self):
        images, tokens, _ = self.inputs
        self.net.eval()
        with Timer(self.device) as t:
            self.net(images, tokens)
        return t.wall, t.cpu

    def eval_loop(self, prepared, split):
        """Their test.py: RefDataset(mode='test') in a DataLoader(batch_size=1, num_workers=1), then
        engine.inference. Their LMDB (tools/folder2lmdb.py records) is an in-memory dict here."""
        import utils.dataset as their_data
        from engine import engine
        records = json.load(open(os.path.join(prepared, "anns", "refcoco", f"{split}.json")))
        db = {b"__len__": len(records), b"__keys__": [str(i).encode() for i in range(len(records))]}
        for i, item in enumerate(records):
            read = lambda path: open(path, "rb").read()
            db[str(i).encode()] = dict(
                img=read(os.path.join(prepared, "images", "train2014", item["img_name"])),
                mask=read(os.path.join(prepared, "masks", "refcoco", f"{item['segment_id']}.png")),
                cat=item["cat"], seg_id=item["segment_id"], img_name=item["img_name"],
                num_sents=item["sentences_num"], sents=[s["sent"] for s in item["sentences"]])
        their_data.lmdb = types.SimpleNamespace(open=lambda *a, **k: _FakeEnv(db))
        their_data.loads_pyarrow = lambda x: x
        ds = their_data.RefDataset(lmdb_dir="memory", mask_dir=os.path.join(prepared, "masks", "refcoco"),
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


# ----------------------------------------------------------------------------- side-by-side driver

def worker(a):
    """Subprocess loop: builds one side, then answers 'train' / 'eval' / 'loop' requests on stdin with JSON."""
    out = sys.stdout
    sys.stdout = sys.stderr  # their code prints; keep the reply channel clean
    device = torch.device(a.device)
    side = Authors(a, device, a.authors_repo) if a.worker == "authors" else Ours(a, device)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "train":
            reply = side.train_step()
        elif cmd[0] == "eval":
            reply = side.eval_forward()
        elif cmd[0] == "loop":
            reply = side.eval_loop(cmd[1], cmd[2])
        elif cmd[0] == "memory":
            reply = peak_memory_mb(device)
        else:
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Remote:
    def __init__(self, kind, argv):
        env = dict(os.environ, PYTHONPATH=HERE)
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind] + argv,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE, env=env)
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
    """Alternate ours / theirs: returns {metric: (our median, their median, our runs, their runs)}, loads."""
    prepared = fake_split(a.data_dir, a.input_size)
    sides = {"ours": Remote("ours", argv), "authors": Remote("authors", argv)}
    runs = {k: {"train": [], "eval": [], "loop": []} for k in sides}
    loads = []
    try:
        for name in sides:  # warm-up (allocator, oneDNN primitive caches, compile)
            sides[name].ask("train")
            sides[name].ask("eval")
        for r in range(a.repeats):
            loads.append(os.getloadavg()[0])
            order = ("ours", "authors") if r % 2 == 0 else ("authors", "ours")
            for metric in ("train", "eval"):
                for name in order:
                    runs[name][metric].append(sides[name].ask(metric))
            if r < a.loop_repeats:
                for name in order:
                    runs[name]["loop"].append(sides[name].ask(f"loop {prepared} {a.split}"))
            print(f"repeat {r + 1}/{a.repeats}: load {loads[-1]:.1f} " + " ".join(
                f"{n}:{m}={runs[n][m][-1][0]:.2f}s wall/{runs[n][m][-1][1]:.2f}s cpu" for n in sides
                for m in ("train", "eval")), flush=True)
        memory = {n: sides[n].ask("memory") for n in sides}
    finally:
        for s in sides.values():
            s.close()
    loads.append(os.getloadavg()[0])
    return runs, memory, loads


# ----------------------------------------------------------------------------- reporting

def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch threads {torch.get_num_threads()} of {os.cpu_count()} cores"


def options(a):
    return ",".join(o for o, on in (("bf16", a.bf16), ("compile", a.compile), ("channels-last", a.channels_last),
                                    ("ckpt-backbone", a.checkpoint_backbone)) if on) or "fp32 eager"


def write_row(path, header, row):
    """Append a table row under '## benchmark' in path (the section and its table header are created once)."""
    text = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    if "\n## benchmark\n" not in text:
        text = text.rstrip("\n") + "\n\n## benchmark\n\nRows appended by `benchmark.py --write`.\n\n"
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--input-size", type=int, default=416)
    p.add_argument("--word-len", type=int, default=17)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--eval-batch-size", type=int, default=8, help="refs per evaluate() batch (all their sentences)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="side-by-side: ours/theirs alternations")
    p.add_argument("--loop-repeats", type=int, default=2, help="side-by-side: eval-loop alternations")
    p.add_argument("--data", default="synthetic", help="dataset for the data-included figures")
    p.add_argument("--root", default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "etris-bench-data"),
                   help="where the fake REFER split for the eval loop is written (once)")
    p.add_argument("--split", default="testA")
    p.add_argument("--no-fill", dest="fill", action="store_false",
                   help="keep the random init instead of the parity fill (tests/parity_fill.py)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA; slow on CPUs without bf16 units)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", help="channels-last convolutions (CUDA)")
    p.add_argument("--checkpoint-backbone", action="store_true", help="activation checkpointing of frozen CLIP")
    p.add_argument("--skip", default="", help="comma list of sections to skip: data,loop,loader")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of one train step and one eval forward")
    p.add_argument("--authors-repo", default=None, help="the authors' ETRIS checkout: side-by-side comparison")
    p.add_argument("--write", default=None, help="append the result row to this markdown file (BENCHMARKS.md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.authors_repo and not os.path.isdir(os.path.join(a.authors_repo, "model")):
        raise FileNotFoundError(f"--authors-repo {a.authors_repo} has no model/ folder: give the root of a "
                                f"checkout of github.com/kkakkkka/ETRIS")
    if a.worker:
        return worker(a)
    device = torch.device(a.device)
    command = "python benchmark.py " + " ".join(argv)
    stamp = datetime.date.today().isoformat()
    head = [stamp, f"`{command}`", machine(device), torch.__version__, options(a)]

    if a.authors_repo:
        worker_argv = [x for x in argv if x != "--write" and not x.endswith(".md")]
        runs, memory, loads = side_by_side(a, worker_argv)
        # medians of wall [0] and CPU [1] seconds
        med = {n: {m: [statistics.median(x[k] for x in v) for k in (0, 1)] for m, v in r.items() if v and m != "loop"}
               for n, r in runs.items()}
        loop = {n: sum(x["n"] for x in r["loop"]) / sum(x["seconds"] for x in r["loop"]) for n, r in runs.items()}
        for n in runs:
            print(f"{n}: train step runs (wall, cpu) {[(round(w, 2), round(c, 2)) for w, c in runs[n]['train']]}, "
                  f"eval fwd runs {[(round(w, 2), round(c, 2)) for w, c in runs[n]['eval']]}, loop (s, sentences, mIoU) "
                  f"{[(round(x['seconds'], 2), x['n'], round(x['mIoU'], 2)) for x in runs[n]['loop']]}")
        ratio = {m: [med["ours"][m][k] / med["authors"][m][k] for k in (0, 1)] for m in ("train", "eval")}
        lx = loop["ours"] / loop["authors"]

        def cell(m):
            o, t, r = med["ours"][m], med["authors"][m], ratio[m]
            return f"{o[0]:.2f} / {t[0]:.2f} ({r[0]:.2f}x); cpu {o[1]:.2f} / {t[1]:.2f} ({r[1]:.2f}x)"
        print(f"train step s ours / authors: {cell('train')}\neval forward s ours / authors: {cell('eval')}\n"
              f"eval loop: ours {loop['ours']:.3f} sent/s, authors {loop['authors']:.3f} sent/s ({lx:.2f}x)\n"
              f"load average {min(loads):.1f}-{max(loads):.1f}")
        row = "| " + " | ".join(head + [
            f"{min(loads):.1f}-{max(loads):.1f}", cell("train"), cell("eval"),
            f"{loop['ours']:.3f} / {loop['authors']:.3f} ({lx:.2f}x)",
            f"{memory['ours']:.0f} / {memory['authors']:.0f}"]) + " |"
        if a.write:
            write_row(a.write, SBS_HEADER, row)
        return

    load0 = os.getloadavg()[0]
    ours = Ours(a, device)
    ours.train_step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = statistics.median(ours.train_step()[0] for _ in range(a.steps))
    memory = peak_memory_mb(device)
    ours.eval_forward()
    evalf = statistics.median(ours.eval_forward()[0] for _ in range(a.steps))
    skip = set(a.skip.split(","))
    data = ours.train_with_data(a.steps) if "data" not in skip else float("nan")
    loop = float("nan")
    if "loop" not in skip:
        r = ours.eval_loop(fake_split(a.data_dir, a.input_size), a.split)
        loop = r["n"] / r["seconds"]
    loader = float("nan")
    if "loader" not in skip:
        from dataset import build_dataset, loader_throughput
        ds = build_dataset(a.data, "train", root=a.root, input_size=a.input_size, word_len=a.word_len,
                           num_samples=a.batch_size * (a.steps + 1))
        loader = loader_throughput(ds, a.workers, a.batch_size, a.steps)
    load1 = os.getloadavg()[0]
    if a.profile:
        from torch.profiler import profile
        for name, fn in (("train step", ours.train_step), ("eval forward", ours.eval_forward)):
            with profile() as prof:
                fn()
            print(f"--- {name}: top {a.profile} ops by self CPU time\n"
                  + prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                              else "self_cpu_time_total", row_limit=a.profile))
    B = a.batch_size
    print(f"{a.backbone} {a.input_size}px batch {B} on {machine(device)} ({options(a)}), load {load0:.1f}-{load1:.1f}\n"
          f"train step {train:.3f}s = {B / train:.2f} img/s (data excluded), {data:.2f} img/s (data included), "
          f"peak memory {memory:.0f} MB\neval forward {evalf:.3f}s = {B / evalf:.2f} img/s; eval loop {loop:.2f} "
          f"sentences/s; loader {loader:.1f} samples/s")
    row = "| " + " | ".join(head + [f"{load0:.1f}-{load1:.1f}", f"{B / train:.2f}", f"{data:.2f}", f"{memory:.0f}",
                                    f"{B / evalf:.2f}", f"{loop:.2f}", f"{loader:.1f}"]) + " |"
    if a.write:
        write_row(a.write, OURS_HEADER, row)


if __name__ == "__main__":
    main()
