"""The CUDA path, which only a GPU can run: AMP numerics against fp32, GradScaler's skipped steps, SyncBN over two
processes against plain BN over their joint batch, a NCCL process group, deterministic attention, the evaluation
protocol on the GPU against the CPU, and kill-and-resume with --deterministic. The GPU check (tools/gpu_check.sh)
runs these; without CUDA they are skipped, with the reason. Each test's docstring says why it passes on one GPU,
from what torch does there. The fp16 tests' logic is device-agnostic and tests/test_cuda_on_cpu.py runs it under
the CPU's fp16 autocast, where it passes on every machine."""
import math
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
from layers import MultiheadAttention, multihead_attention
from loss import segmentation_loss
from model import build_model
from tools.parity import fill_

# read at collection, before conftest fakes CUDA where there is none
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
FP16_MAX = torch.finfo(torch.float16).max  # 65504


@pytest.fixture(autouse=True)
def tf32_settings_restored():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def inputs(batch, size, device=CUDA, word_len=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, word_len, dtype=torch.long)
    for b in range(batch):
        n = 3 + 4 * b % (word_len - 3)
        tokens[b, 0], tokens[b, 1 + n] = 49406, 49407
        tokens[b, 1:1 + n] = torch.randint(1, 49405, (n,), generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return images.to(device), tokens.to(device), mask.to(device)


def filled(backbone, size, device=CUDA, dropout=0.1):
    torch.manual_seed(0)
    net = build_model(backbone, random_clip_state_dict(backbone), size, 17, ga_dropout=dropout,
                      bridger_dropout=dropout)
    fill_(net)  # activations of order 1 through the whole network, as trained weights give
    return net.to(device).train()


def steps_until_one_is_taken(model, batch, opt, scaler, amp, device):
    """Training steps through train.optimizer_step on the same batch until GradScaler takes one, as a run's first
    steps: returns that step's loss and how many were skipped before it. Under fp16 from train.py's scale 2^16
    each skipped step halves the scale (GradScaler.update's backoff), so 16 skips mean a gradient that overflows
    at scale 1: not the scale's doing."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    for skips in range(17):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = segmentation_loss(model(*batch[:2]), batch[2])
        params = [p for group in opt.param_groups for p in group["params"]]
        if train.optimizer_step(loss, opt, scaler, params, amp).item() == 0:
            return loss.item(), skips
    raise AssertionError("17 steps skipped, down to scale 1: a gradient is not finite whatever the scale")


def predicted_fp16_skips(net, batch):
    """How many first steps of a fresh fp16 run GradScaler skips, predicted from the fp32 gradient. Autocast runs
    the Linear, convolution and attention-projection products in fp16, so those layers' weight and bias gradients
    come out of an fp16 kernel before they are cast to the fp32 parameters' .grad: one whose |value| x scale
    passes 65504 becomes inf, _amp_foreach_non_finite_check_and_unscale_ finds it, GradScaler.step skips the step
    and update() halves the scale. The norms' gradients (fp32 ops) and the position embedding's (added in fp32
    to patches that need no gradient) never pass through fp16. Activation gradients may overflow too, and the
    fp16 gradient differs a little from the fp32 one: the prediction is exact to within one step."""
    layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, MultiheadAttention)
    fp16_params = [p for m in net.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)
                   if p.requires_grad]
    net.zero_grad(set_to_none=True)
    segmentation_loss(net(*batch[:2]), batch[2]).backward()
    largest = max(p.grad.abs().max().item() for p in fp16_params)
    net.zero_grad(set_to_none=True)
    return max(0, math.ceil(math.log2(largest * 2.0 ** 16 / FP16_MAX)))


def trained(net):
    return [p for p in net.parameters() if p.requires_grad]


def amp_step_against_fp32(backbone, size, amp, device):
    """(relative loss error, relative gradient error, skipped steps, predicted skips) of one `amp` training step
    against the fp32 step, on the same weights and batch, gradients unscaled by train.optimizer_step; SGD with
    lr 0 changes nothing, so the steps can be repeated until GradScaler takes one (fp16), as a run does."""
    net = filled(backbone, size, device, dropout=0.0)
    batch = inputs(2, size, device)
    predicted = predicted_fp16_skips(net, batch) if amp == "fp16" else 0
    results = {}
    for mode in ("off", amp):
        opt = torch.optim.SGD(trained(net), lr=0.0)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if mode == "fp16" else 1.0)
        loss, skips = steps_until_one_is_taken(net, batch, opt, scaler, mode, device)
        results[mode] = loss, torch.cat([p.grad.flatten() for p in trained(net)]), skips
    (loss32, g32, _), (loss_amp, g_amp, skips) = results["off"], results[amp]
    assert torch.isfinite(g_amp).all()
    return abs(loss_amp - loss32) / abs(loss32), ((g_amp - g32).norm() / g32.norm()).item(), skips, predicted


# 3x the errors of the same step measured on the CPU (its fp16 and bf16 autocast, torch 2.13, this project's 2-core
# VM; tests/test_cuda_on_cpu.py runs this step on tiny-ViT): ViT-B/16, 224 px, batch 2: fp16 loss 1.08e-3,
# gradients 0.046, 3 steps skipped first; bf16 loss 7.7e-3, gradients 0.140. The GPU rounds the same values to the
# same 11 or 8 significant bits but sums in other orders (cuBLAS, cuDNN, flash attention), hence the headroom.
AMP_TOLERANCES = {"fp16": (3 * 1.08e-3, 3 * 0.046), "bf16": (3 * 7.7e-3, 3 * 0.140)}


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_step_stays_close_to_the_fp32_step(amp):
    """Half precision rounds each op's output to 11 (fp16) or 8 (bf16) significant bits, unit roundoffs 4.9e-4 and
    3.9e-3. The loss stays within a few of those; the gradients move far more, by the same amount on any device:
    the trained layers feed train-mode BatchNorms, whose backward subtracts the gradient's mean and its
    projection on the normalised output, so a weight gradient is a small difference of large rounded sums.
    AMP_TOLERANCES gives 3x the errors measured on the CPU. A bug of the AMP path (a scale not undone: off by
    2^13; the mask rounded; an op in the wrong precision) is off by factors, not by these. The fp16 step
    expects what a real run does first: GradScaler starts at 2^16, where the largest gradient computed in
    fp16 (bridger.linear1.0.weight's, 5.9) overflows, and halves the scale at each skipped step until one fits
    (predicted_fp16_skips: 3; on the CPU 3 were skipped). bf16 has fp32's range: its scale stays 1 and no
    step is skipped. Dropout is off: SDPA picks other kernels for fp32 and half precision, which draw other
    dropout masks from the same seed. TF32 is off: a true fp32 reference."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    loss_err, grad_err, skips, predicted = amp_step_against_fp32("ViT-B/16", 224, amp, CUDA)
    assert abs(skips - predicted) <= 1 and (skips >= 1) == (amp == "fp16"), (skips, predicted)
    loss_tol, grad_tol = AMP_TOLERANCES[amp]
    assert loss_err <= loss_tol and grad_err <= grad_tol, (loss_err, grad_err)


def fp16_skips_an_overflowing_or_nan_step(poison, device):
    """tiny-ViT under fp16 with fused Adam and train.py's GradScaler: the first steps of the run are skipped until
    the scale fits, then a poisoned step is skipped, leaving weights and Adam's step count as they were."""
    net = filled("tiny-ViT", 64, device, dropout=0.0)  # the same masks in the fp32 prediction and the fp16 steps
    batch = inputs(2, 64, device)
    predicted = predicted_fp16_skips(net, batch)
    opt = torch.optim.Adam(trained(net), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16)
    _, skips = steps_until_one_is_taken(net, batch, opt, scaler, "fp16", device)
    assert skips >= 1 and abs(skips - predicted) <= 1, (skips, predicted)
    assert scaler.get_scale() == 2.0 ** (16 - skips)  # halved at each skip, kept at the step taken
    assert all(opt.state[p]["step"].item() == 1 for p in trained(net))  # the skipped steps did not count
    before = [p.detach().clone() for p in trained(net)]
    with torch.autocast(device.type, dtype=torch.float16):
        loss = segmentation_loss(net(*batch[:2]), batch[2])
        # x 1e5: at twice this scale a gradient overflowed, so at this one the largest is over 65504 / 2
        loss = loss * 1e5 if poison == "overflow" else loss * float("nan")
    assert train.optimizer_step(loss, opt, scaler, trained(net), "fp16").item() == 1
    assert all(torch.equal(b, p) for b, p in zip(before, trained(net)))
    assert all(opt.state[p]["step"].item() == 1 for p in trained(net))
    assert scaler.get_scale() == 2.0 ** (15 - skips)  # halved


@pytest.mark.parametrize("poison", ["overflow", "nan loss"])
def test_fp16_skips_an_overflowing_or_nan_step(poison):
    """GradScaler.step hands fused Adam its found_inf, and the fused kernel then leaves the weights and moments
    alone and takes back its step-count increment (torch/optim/adam.py, _fused_adam); update() halves the scale.
    A poisoned loss makes every gradient inf or NaN, whatever the device. The run's first steps are skipped as
    on the CPU (tiny-ViT's neck.aggr.0.weight gradient, 2.95, x 2^16 overflows fp16: 2 skips there)."""
    fp16_skips_an_overflowing_or_nan_step(poison, CUDA)


def syncbn_ddp_fp16_steps(device):
    """train.py's multi-GPU wrapping (SyncBN conversion on a GPU, DDP) of tiny-RN in the process group this process
    has started, then fp16 steps with fused Adam from train.py's scale 2^16 until one is taken."""
    net = filled("tiny-RN", 64, device, dropout=0.0)
    batch = inputs(2, 64, device)
    predicted = predicted_fp16_skips(net, batch)
    if device.type == "cuda":  # DDP refuses SyncBN on CPU modules; in one process it is plain BN there anyway
        keys = {k: v.shape for k, v in net.state_dict().items()}
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())
        assert {k: v.shape for k, v in net.state_dict().items()} == keys  # checkpoints stay compatible
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(trained(net), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in trained(net)]
    _, skips = steps_until_one_is_taken(model, batch, opt, scaler, "fp16", device)
    assert skips >= 1 and abs(skips - predicted) <= 1, (skips, predicted)
    assert all(torch.isfinite(p).all() for p in trained(net))
    assert any(not torch.equal(b, p) for b, p in zip(before, trained(net)))  # the step taken moved the weights


def test_a_one_process_nccl_group_runs_a_syncbn_ddp_fp16_step_with_the_same_state_dict_keys(tmp_path):
    """train.py's process group (NCCL, told its device) with the SyncBN conversion, DDP, fp16 and fused Adam. NCCL
    takes one rank on one GPU; DDP's parameter broadcast and gradient all-reduce run in it. In one process
    nn.SyncBatchNorm does not synchronise (world size 1: it falls back to plain batch norm), so NCCL, DDP and
    synchronising SyncBN never run together here: that takes two GPUs. SyncBN's own sums are
    test_syncbn_over_two_processes_is_batchnorm_over_their_joint_batch's. The first steps are skipped as a real
    fp16 run's: tiny-RN's neck.f3_proj.0.weight gradient (1.7) x 2^16 overflows fp16 (1 skip on the CPU)."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        syncbn_ddp_fp16_steps(torch.device("cuda", 0))
    finally:
        dist.destroy_process_group()  # one process: no peer to race at exit


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
    distributed.teardown()  # a barrier first: a gloo rank can abort at exit when its peer has torn the group down


def test_syncbn_over_two_processes_is_batchnorm_over_their_joint_batch(tmp_path):
    """What SyncBN is for: two processes with two samples each normalise with the statistics of all four, so their
    loss, DDP-averaged gradients and running statistics equal one process's plain BN over the four samples (the
    frozen ResNet's BNs are in train mode, as the authors'), up to float32 summation order. On one GPU: gloo
    takes CUDA tensors for all_gather (SyncBN's list path for gloo in torch/nn/modules/_functions.py), all_reduce
    (SyncBN's backward, DDP's buckets) and broadcast (DDP's start), staging them through the host."""
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
    """--deterministic routes attention to SDPA's math kernel (flash, memory-efficient and cuDNN attention off, so
    the math kernel is the only one left): batched matrix products and a softmax, whose backward is matrix
    products too. cuBLAS gives the same bits for the same call on the same GPU and stream; nothing here adds
    atomically (the fused kernels' backward does, in any order). So: the same gradients, bit for bit."""
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
    """fp32 on both, TF32 off: the logits differ by float rounding only (other summation orders, ~1e-6 relative),
    and everything after them (the warp back to the image, the threshold, the IoU) runs on the CPU from the
    same logits' values. Rounding moves a pixel across the 0.35 threshold here and there: per sentence the IoU
    may move by a few such pixels (<= 0.02), on average far less; the same sentences are counted."""
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
    deterministic CUDA kernel: its atomic adds sum in any order, a relative difference of order 1e-7 per step,
    which Adam passes on in proportion. GradScaler's state (scale, growth tracker) is in the checkpoint, so the
    resumed run skips the same fp16 steps. So: the same steps and epochs, losses within 1e-3, and weights within
    1% of the distance training moved them."""
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
