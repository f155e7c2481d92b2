"""Tests of train.py on CPU with synthetic data and the tiny ViT CLIP: a run killed with SIGKILL and resumed
ends with exactly the weights of an uninterrupted run; 2-process gloo DDP matches 1 process at the same
global batch; non-finite losses and gradients are skipped on the device then stop the run; --compile trains
the same weights; wrong files for --clip-weights/--resume and an indivisible batch are clear errors; the
sampler's order is a pure function of (seed, epoch)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train
from clip_loader import random_clip_state_dict
from errors import UserError
from resume import ResumableSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--data", "synthetic", "--backbone", "tiny-ViT", "--input-size", "64", "--workers", "0",
         "--val-samples", "2", "--device", "cpu"]


def final_weights(out):
    return torch.load(os.path.join(out, "last.pth"), map_location="cpu", weights_only=True)["model"]


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    full = ResumableSampler(10, 4, rank=0, world=1, seed=3)
    assert full.steps == 2 and len(full) == 8  # the incomplete last global batch is dropped
    full.set_epoch(5)
    keys = list(full)
    assert [e for e, _ in keys] == [5] * 8 and len({i for _, i in keys}) == 8
    assert keys == list(full)                                       # same epoch, same order
    full.set_epoch(6)
    assert [i for _, i in full] != [i for _, i in keys]             # reshuffled per epoch
    full.set_epoch(5, start_step=1)
    assert list(full) == keys[4:]                                   # mid-epoch resume
    halves = [ResumableSampler(10, 4, rank=r, world=2, seed=3) for r in (0, 1)]
    for h in halves:
        h.set_epoch(5)
    ranks = [list(h) for h in halves]
    # each global batch holds the same samples whatever the world size
    assert ranks[0][:2] + ranks[1][:2] == keys[:4] and ranks[0][2:] + ranks[1][2:] == keys[4:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, 4, 0, 1, 0)


def test_kill_and_resume_gives_identical_weights(tmp_path):
    args = QUICK + ["--epochs", "2", "--batch-size", "2", "--train-samples", "4", "--save-every-steps", "1"]
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train.main(args + ["--output", ref_out])                 # uninterrupted, in this process
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + args + ["--output", out, "--resume", "auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, "last.pth")
    deadline = time.time() + 120
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = torch.load(last, weights_only=True)
    assert killed["progress"]["global_step"] < 4             # really interrupted (4 steps in all)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    ref, got = final_weights(ref_out), final_weights(out)
    assert ref.keys() == got.keys()
    torch.manual_seed(0)
    init = train.build_model("tiny-ViT", input_size=64, word_len=17).state_dict()
    assert any(not torch.equal(ref[k], init[k]) for k in ref)  # training moved the weights
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ck = torch.load(last, weights_only=True)
    assert (ck["progress"]["epoch"], ck["progress"]["step"], ck["progress"]["global_step"]) == (2, 0, 4)
    # one metrics line per epoch even though part of an epoch was redone
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    ref_lines = [json.loads(x) for x in open(os.path.join(ref_out, "metrics.jsonl"))]
    assert [r["val_mIoU"] for r in lines] == [r["val_mIoU"] for r in ref_lines]
    assert lines[-1]["train_loss"] == pytest.approx(ref_lines[-1]["train_loss"], rel=1e-6)
    assert os.path.isfile(os.path.join(out, "best.pth"))


def _deterministic_build(build):
    """build_model with dropout off and BatchNorm on its running statistics. Without SyncBN (CUDA only) each
    process normalises by its own half-batch statistics and draws its own dropout masks, so DDP can only
    equal a 1-process run once those two cross-sample couplings are removed; what is left to compare is
    exactly DDP's job: data sharding and gradient averaging."""
    def wrapped(*args, **kwargs):
        net = build(*args, **kwargs)
        for m in net.modules():
            if isinstance(getattr(m, "dropout", None), float):
                m.dropout = 0.0
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = lambda x, m=m: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                                        False, 0.0, m.eps)
        return net
    return wrapped


def _sgd(params, lr, weight_decay, fused):
    """Adam's first steps are ~lr * sign(grad): on elements whose gradient is float noise (e.g. attention key
    biases, mathematically zero) it turns a 1e-9 difference into a 2*lr one. SGD keeps the comparison about
    the gradients, which is what DDP is responsible for; Adam itself is elementwise and the same either way."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _ddp_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.build_model = _deterministic_build(train.build_model)
    torch.optim.Adam = _sgd
    train.main(argv)


def test_two_process_ddp_matches_one_process(tmp_path, monkeypatch):
    args = QUICK + ["--epochs", "1", "--batch-size", "4", "--train-samples", "8", "--lr", "0.1", "--val-samples", "3"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, args + ["--output", str(tmp_path / "ddp")]), nprocs=2, join=True)
    monkeypatch.setattr(train, "build_model", _deterministic_build(train.build_model))
    monkeypatch.setattr(torch.optim, "Adam", _sgd)
    train.main(args + ["--output", str(tmp_path / "one")])
    ddp, one = final_weights(str(tmp_path / "ddp")), final_weights(str(tmp_path / "one"))
    torch.manual_seed(0)  # as train.main before building: the same initial weights
    init = train.build_model("tiny-ViT", input_size=64, word_len=17).state_dict()
    for k in one:
        if one[k].is_floating_point():
            # compare what training changed (2 steps, each over the global batch of 4 = 2 x 2 in DDP)
            # (tolerance: 1e-4 of the largest update, plus the float32 rounding of the weights themselves)
            upd_one, upd_ddp = one[k] - init[k], ddp[k] - init[k]
            atol = 1e-4 * upd_one.abs().max().item() + 4 * torch.finfo(torch.float32).eps * one[k].abs().max().item()
            torch.testing.assert_close(upd_ddp, upd_one, rtol=1e-3, atol=atol, msg=k)
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], init[k])]
    assert any(k.startswith("bridger.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    assert torch.load(str(tmp_path / "ddp" / "last.pth"), weights_only=True)["world_size"] == 2
    # validation sharded 2 + 1 over the ranks and gathered: every val sample once, none padded in twice
    (val_ddp,) = [json.loads(x) for x in open(tmp_path / "ddp" / "metrics.jsonl")]
    (val_one,) = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    assert val_ddp["val_n"] == val_one["val_n"] == 3
    assert val_ddp["train_loss"] == pytest.approx(val_one["train_loss"], rel=1e-5)


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train.segmentation_loss

    def flaky(logits, mask):
        calls["n"] += 1
        loss = real_loss(logits, mask)
        if calls["n"] == 2:  # step 2: non-finite loss
            return loss * float("nan")
        if calls["n"] == 3:  # step 3: finite loss, NaN gradients (sqrt'(0) = inf, times the 0 above it)
            return loss + 0 * torch.sqrt(logits.sum() * 0)
        return loss

    monkeypatch.setattr(train, "segmentation_loss", flaky)
    args = QUICK + ["--epochs", "1", "--batch-size", "2", "--train-samples", "8"]
    train.main(args + ["--output", str(tmp_path / "a")])
    (line,) = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert line["nonfinite_skipped"] == 2 and line["global_step"] == 4
    ck = torch.load(tmp_path / "a" / "last.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # the two skipped steps left Adam's step count (and so its moments) alone: 4 steps, 2 updates
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {2.0}

    monkeypatch.setattr(train, "segmentation_loss", lambda logits, mask: real_loss(logits, mask) * float("inf"))
    with pytest.raises(UserError, match=r"4 steps in a row had a non-finite loss or gradients \(--max-nonfinite 2\)"):
        train.main(args + ["--output", str(tmp_path / "b"), "--max-nonfinite", "2"])


def test_wrong_files_and_batch_are_clear_errors(tmp_path, monkeypatch):
    clip_file = str(tmp_path / "clip.pt")
    torch.save(random_clip_state_dict("tiny-ViT"), clip_file)
    ours = str(tmp_path / "ours.pth")
    torch.save({"config": {}, "model": {}}, ours)
    with pytest.raises(UserError, match="pass it as --clip-weights"):
        train.main(QUICK + ["--resume", clip_file, "--output", str(tmp_path / "x")])
    with pytest.raises(UserError, match="pass it as --weights"):
        train.main(QUICK + ["--clip-weights", ours, "--output", str(tmp_path / "x")])
    with pytest.raises(UserError, match="missing.pth"):
        train.main(QUICK + ["--resume", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x")])
    with pytest.raises(UserError, match="not divisible by 3"):
        train.build_data(train.parse_args(QUICK + ["--batch-size", "4"]), train.distributed.Process(world=3))


def test_compile_trains_the_same_weights(tmp_path, monkeypatch):
    # --compile wraps the training forward in torch.compile. Inductor takes minutes to build on 2 CPU cores,
    # so the test uses Dynamo with the eager backend: the model is really traced (graph breaks included),
    # then runs the same kernels, so the weights must equal an uncompiled run's.
    real_compile, compiled = torch.compile, []

    def eager_compile(model):
        compiled.append(model)
        return real_compile(model, backend="eager")

    args = QUICK + ["--epochs", "1", "--batch-size", "2", "--train-samples", "6"]
    train.main(args + ["--output", str(tmp_path / "eager")])
    monkeypatch.setattr(torch, "compile", eager_compile)
    train.main(args + ["--output", str(tmp_path / "compiled"), "--compile"])
    assert len(compiled) == 1
    eager, comp = final_weights(str(tmp_path / "eager")), final_weights(str(tmp_path / "compiled"))
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)  # as train.main before building: the initial weights, which training must have moved
    init = train.build_model("tiny-ViT", input_size=64, word_len=17).state_dict()
    assert any(not torch.equal(eager[k], init[k]) for k in eager if k.startswith("decoder."))
