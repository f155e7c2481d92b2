"""The CUDA path, which only a GPU can run: AMP numerics against fp32, GradScaler's skipped steps, SyncBN over two
processes against plain BN over their joint batch, a NCCL process group, deterministic attention, the evaluation
protocol on the GPU against the CPU, and kill-and-resume with --deterministic. The GPU check (tools/gpu_check.sh)
runs these; without CUDA they are skipped, with the reason."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import distributed
import train
from clip_loader import random_clip_state_dict
from dataset import build_dataset, build_loader
from evaluate import evaluate
from layers import multihead_attention
from loss import segmentation_loss
from model import build_model
from tools.parity import fill_

# read at collection, before conftest fakes CUDA where there is none
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def tf32_settings_restored():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def inputs(batch, size, word_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, word_len, dtype=torch.long)
    for b in range(batch):
        n = 3 + 4 * b % (word_len - 3)
        tokens[b, 0], tokens[b, 1 + n] = 49406, 49407
        tokens[b, 1:1 + n] = torch.randint(1, 49405, (n,), generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return images.to(CUDA), tokens.to(CUDA), mask.to(CUDA)


def filled(backbone, size, dropout=0.1):
    torch.manual_seed(0)
    net = build_model(backbone, random_clip_state_dict(backbone), size, 17, ga_dropout=dropout,
                      bridger_dropout=dropout)
    fill_(net)  # activations of order 1 through the whole network, as trained weights give
    return net.to(CUDA).train()


def grads_of(net, amp, batch):
    """Loss and gradients of one training step under `amp`, through train.optimizer_step's scaling (unscaled)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # a step that changes nothing: only the gradients are compared
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16 if amp == "fp16" else 1.0)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        loss = segmentation_loss(net(*batch[:2]), batch[2])
    skipped = train.optimizer_step(loss, opt, scaler, params, amp)
    assert skipped.item() == 0
    return loss.item(), torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("amp, loss_tol, grad_tol", [("fp16", 5e-3, 5e-2), ("bf16", 3e-2, 2e-1)])
def test_amp_step_stays_close_to_the_fp32_step(amp, loss_tol, grad_tol):
    """Half precision rounds each op to 11 (fp16) or 8 (bf16) significant bits: unit roundoffs 4.9e-4 and 3.9e-3.
    Through ~40 layers of ViT-B/16 and its decoder the loss stays within ~10x that, the gradients (a sum over
    every pixel's path) within ~100x. A bug of the AMP path (a scale not undone, the mask rounded, an op in the
    wrong precision) is off by factors, not by these. Dropout is off: SDPA picks other kernels for fp32 and half
    precision, which draw other dropout masks from the same seed."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    net = filled("ViT-B/16", 224, dropout=0.0)
    batch = inputs(2, 224)
    loss32, g32 = grads_of(net, "off", batch)
    loss_amp, g_amp = grads_of(net, amp, batch)
    assert abs(loss_amp - loss32) <= loss_tol * abs(loss32)
    assert torch.isfinite(g_amp).all()
    assert (g_amp - g32).norm() <= grad_tol * g32.norm()


@pytest.mark.parametrize("poison", ["overflow", "nan loss"])
def test_fp16_skips_an_overflowing_or_nan_step(poison):
    net = filled("tiny-ViT", 64)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    images, tokens, mask = inputs(2, 64)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = segmentation_loss(net(images, tokens), mask)
    assert train.optimizer_step(loss, opt, scaler, params, "fp16").item() == 0  # a normal step first
    before = [p.detach().clone() for p in params]
    steps = {id(p): opt.state[p]["step"].item() for p in params}
    with torch.autocast("cuda", dtype=torch.float16):
        loss = segmentation_loss(net(images, tokens), mask)
        loss = loss * 1e5 if poison == "overflow" else loss * float("nan")  # x 65536: past fp16's 65504
    assert train.optimizer_step(loss, opt, scaler, params, "fp16").item() == 1
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(opt.state[p]["step"].item() == steps[id(p)] for p in params)
    assert scaler.get_scale() == 2.0 ** 15  # halved


def test_a_one_process_nccl_group_runs_a_syncbn_ddp_fp16_step_with_the_same_state_dict_keys(tmp_path):
    """train.py's process group (NCCL, told its device) with the SyncBN conversion, DDP, fp16 and fused Adam. In one
    process SyncBN does not synchronise: test_syncbn_over_two_processes_is_batchnorm_over_their_joint_batch does."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        net = filled("tiny-RN", 64)
        keys = {k: v.shape for k, v in net.state_dict().items()}
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())
        assert {k: v.shape for k, v in net.state_dict().items()} == keys
        model = nn.parallel.DistributedDataParallel(net, device_ids=[0])
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
        images, tokens, mask = inputs(2, 64)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = segmentation_loss(model(images, tokens), mask)
        scaler = torch.amp.GradScaler("cuda")
        assert train.optimizer_step(loss, opt, scaler, params, "fp16").item() == 0
        assert all(torch.isfinite(p).all() for p in params)
    finally:
        dist.destroy_process_group()


def _syncbn_rank(rank, port, folder):
    """One of two processes on the one GPU (gloo carries CUDA tensors; NCCL refuses two ranks on one device): half
    the batch each, SyncBN and DDP as train.py sets them up; its loss, gradients and buffers go to folder."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = nn.SyncBatchNorm.convert_sync_batchnorm(filled("tiny-RN", 64, dropout=0.0))
    model = nn.parallel.DistributedDataParallel(net, device_ids=[0])
    images, tokens, mask = (t[2 * rank:2 * rank + 2] for t in inputs(4, 64))
    loss = segmentation_loss(model(images, tokens), mask)
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in net.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.item(), "grads": grads, "buffers": {n: b.cpu() for n, b in net.named_buffers()}},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_syncbn_over_two_processes_is_batchnorm_over_their_joint_batch(tmp_path):
    """What SyncBN is for: two processes with two samples each normalise with the statistics of all four, so their
    loss, DDP-averaged gradients and running statistics equal one process's plain BN over the four samples (the
    frozen ResNet's BNs are in train mode, as the authors'), up to float32 summation order."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_syncbn_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = filled("tiny-RN", 64, dropout=0.0)
    images, tokens, mask = inputs(4, 64)
    loss = segmentation_loss(net(images, tokens), mask)
    loss.backward()
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss.item()) <= 1e-5 * abs(loss.item())
    grads = {n: p.grad.cpu() for n, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    for r in ranks:
        got, want = (torch.cat([g[n].flatten() for n in grads]) for g in (r["grads"], grads))
        assert (got - want).norm() <= 1e-4 * want.norm()
    for n, b in net.named_buffers():
        for r in ranks:
            if b.is_floating_point():
                torch.testing.assert_close(r["buffers"][n], b.cpu(), rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(r["buffers"][n], b.cpu()), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_backward_is_deterministic_under_deterministic(dtype, kernel_settings_restored):
    """--deterministic routes attention to SDPA's math kernel, whose backward sums in a fixed order: the same
    gradients, bit for bit, on every run (the fused kernels' backward adds atomically, in any order)."""
    distributed.seed_and_configure(0, True, CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(4, 677, 768, device=CUDA, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    upstream = torch.randn(4, 677, 768, device=CUDA, generator=g, dtype=dtype)
    grads = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        multihead_attention(q, k, v, 12).backward(upstream)
        grads.append(torch.cat([q.grad, k.grad, v.grad]))
    assert all(torch.equal(grads[0], x) for x in grads[1:])


def test_evaluation_on_cuda_gives_the_cpus_ious():
    """fp32 on both, TF32 off: the logits differ by float rounding only, which moves a pixel across the 0.35
    threshold here and there. Per sentence the IoU may move by a few such pixels (<= 0.02), on average far less."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = build_model("tiny-ViT", input_size=64).eval()
    fill_(net)
    ds = build_dataset("synthetic", "test", input_size=64, num_samples=12)
    cpu = evaluate(net, build_loader(ds, 4), torch.device("cpu"))
    gpu = evaluate(net.to(CUDA), build_loader(ds, 4), CUDA)
    assert [r[:2] for r in cpu["per_sample"]] == [r[:2] for r in gpu["per_sample"]]
    diffs = [abs(a[2] / (a[3] + 1e-6) - b[2] / (b[3] + 1e-6)) for a, b in zip(cpu["per_sample"], gpu["per_sample"])]
    assert max(diffs) <= 0.02 and sum(diffs) / len(diffs) <= 2e-3
    assert abs(cpu["mIoU"] - gpu["mIoU"]) <= 0.2 and cpu["n"] == gpu["n"] > 12


def test_kill_and_resume_on_cuda_with_deterministic(tmp_path):
    """Expected: the resumed run ends where the uninterrupted one does, up to float nondeterminism. --deterministic
    makes cuDNN, cuBLAS and most kernels deterministic, but bilinear upsampling's backward (the Projector) has no
    deterministic CUDA kernel: its atomic adds sum in any order. So: the same steps and epochs, losses within
    1e-3, and weights within 1% of the distance training moved them."""
    args = ["train.py", "--data", "synthetic", "--backbone", "tiny-ViT", "--input-size", "64", "--workers", "0",
            "--val-samples", "2", "--device", "cuda", "--deterministic", "--amp", "fp16", "--epochs", "2",
            "--batch-size", "2", "--train-samples", "8", "--save-every-steps", "1"]
    ref = subprocess.run([sys.executable] + args + ["--output", str(tmp_path / "ref")], cwd=ROOT,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cmd = [sys.executable] + args + ["--output", str(tmp_path / "killed"), "--resume", "auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pth"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(last, map_location="cpu", weights_only=True)["progress"]["global_step"] < 8
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "last.pth", map_location="cpu", weights_only=True) for d in ("ref", "killed"))
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 8
    losses = [[r["train_loss"] for r in c["progress"]["history"]] for c in (a, b)]
    assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(*losses))
    torch.manual_seed(0)
    init = build_model("tiny-ViT", input_size=64).state_dict()
    moved = torch.cat([(a["model"][k] - init[k]).flatten() for k in a["model"] if a["model"][k].is_floating_point()])
    gap = torch.cat([(a["model"][k] - b["model"][k]).flatten() for k in a["model"] if a["model"][k].is_floating_point()])
    assert moved.norm() > 0 and gap.norm() <= 1e-2 * moved.norm()
