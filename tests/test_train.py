"""Tests of train.py on CPU with synthetic data and the tiny ViT CLIP: a run killed with SIGKILL and resumed
ends with exactly the weights of an uninterrupted run; 2-process gloo DDP matches 1 process at the same
global batch; non-finite losses and gradients are skipped on the device then stop the run; --compile trains
the same weights; wrong files for --clip-weights/--resume and an indivisible batch are clear errors; the
sampler's order is a pure function of (seed, epoch)."""
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train
from clip_loader import random_clip_state_dict
from errors import UserError
from resume import PerSampleSeeds, ResumableSampler

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


def poisoned_loss(real_loss, poisons, good):
    """The loss, with poisons[n] applied at call n (from 1); the losses of the other calls go into `good`."""
    calls = {"n": 0}

    def loss_fn(logits, mask):
        calls["n"] += 1
        loss = real_loss(logits, mask)
        if calls["n"] in poisons:
            return poisons[calls["n"]](loss, logits)
        good.append(loss.item() * len(logits))
        return loss
    return loss_fn


@pytest.fixture
def small_fp16_scale(monkeypatch):
    """fp16 runs start at a loss scale of 2**8 instead of 2**16, at which this tiny model's gradients fit in fp16:
    at 2**16 its first steps overflow, a skip GradScaler makes by design, which would blur the counts here."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(train.torch.amp, "GradScaler", lambda device, init_scale=2.0 ** 16, **kw: real(
        device, init_scale=2.0 ** 8 if init_scale == 2.0 ** 16 else init_scale, **kw))


NAN_GRAD = lambda loss, logits: loss + 0 * torch.sqrt(logits.float().sum() * 0)  # finite loss; sqrt'(0) * 0 = NaN


@pytest.mark.parametrize("amp, first", [("off", "inf loss"), ("bf16", "inf loss"), ("fp16", "overflow")])
def test_every_skipped_step_is_counted_on_every_amp_path(tmp_path, monkeypatch, small_fp16_scale, amp, first):
    """On the CPU as on a GPU: fp16 runs under fp16 autocast with GradScaler('cpu') and fused Adam, the GPU
    default's very path. An overflowing step (a loss x 1e5 times the scale 256 is past fp16's 65504), NaN
    gradients and a NaN loss are each skipped: weights and Adam's step count stay, the fp16 scale halves, and
    each is counted, out of the epoch's means."""
    poisons = {2: (lambda loss, logits: loss * 1e5) if first == "overflow" else (lambda loss, logits: loss * math.inf),
               3: NAN_GRAD, 5: lambda loss, logits: loss * math.nan}
    good = []
    monkeypatch.setattr(train, "segmentation_loss", poisoned_loss(train.segmentation_loss, poisons, good))
    train.main(QUICK + ["--epochs", "1", "--batch-size", "2", "--train-samples", "12", "--amp", amp,
                        "--output", str(tmp_path / "a")])
    (line,) = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert line["nonfinite_skipped"] == 3 and line["global_step"] == 6
    assert line["train_loss"] == pytest.approx(sum(good) / (2 * len(good)), rel=1e-5)  # the 3 good steps only
    ck = torch.load(tmp_path / "a" / "last.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {3.0}  # 6 steps, 3 updates
    assert ck["scaler"]["scale"] == (2.0 ** 8 / 2 ** 3 if amp == "fp16" else 1.0)


def test_a_run_of_skipped_steps_stops_training(tmp_path, monkeypatch):
    real_loss = train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", lambda logits, mask: real_loss(logits, mask) * float("inf"))
    with pytest.raises(UserError, match=r"4 steps in a row had a non-finite loss or gradients \(--max-nonfinite 2\)"):
        train.main(QUICK + ["--epochs", "1", "--batch-size", "2", "--train-samples", "8", "--max-nonfinite", "2",
                            "--output", str(tmp_path / "b")])


@pytest.mark.parametrize("first, then", [("off", "fp16"), ("fp16", "off")])
def test_resume_across_amp_modes_starts_a_fresh_scaler(tmp_path, capsys, small_fp16_scale, first, then):
    args = QUICK + ["--batch-size", "2", "--train-samples", "4", "--output", str(tmp_path)]
    train.main(args + ["--epochs", "1", "--amp", first])
    capsys.readouterr()
    train.main(args + ["--epochs", "2", "--amp", then, "--resume", "auto"])
    printed = capsys.readouterr().out
    assert f"was trained with --amp {first}, this run uses --amp {then}: the loss scaling starts afresh" in printed
    ck = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)
    assert ck["amp"] == then and ck["progress"]["global_step"] == 4
    assert ck["scaler"]["scale"] == (2.0 ** 8 if then == "fp16" else 1.0)  # not the other mode's, loaded


def test_weights_start_a_fresh_run_from_ours_or_the_authors(tmp_path):
    args = QUICK + ["--batch-size", "2", "--train-samples", "4", "--epochs", "1"]
    trained = train.main(args + ["--output", str(tmp_path / "first")])
    theirs = str(tmp_path / "authors.pth")
    torch.save({"epoch": 50, "state_dict": {"module." + k: v for k, v in trained.state_dict().items()}}, theirs)
    for weights in (str(tmp_path / "first" / "last.pth"), theirs):
        net = train.build_net(train.parse_args(args + ["--weights", weights]), train.distributed.Process())
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in net.state_dict().items())
    train.main(args + ["--weights", theirs, "--output", str(tmp_path / "second")])
    ck = torch.load(tmp_path / "second" / "last.pth", map_location="cpu", weights_only=True)
    assert ck["progress"]["epoch"] == 1 and {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {2.0}
    with pytest.raises(UserError, match=r"--weights .*last.pth' does not fit this model \(--backbone tiny-RN"):
        train.build_net(train.parse_args(args + ["--backbone", "tiny-RN", "--weights", str(tmp_path / "first" /
                                                                                             "last.pth")]),
                        train.distributed.Process())


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
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked with the options, before any process group or data
    with pytest.raises(UserError, match="not divisible by 3"):
        train.parse_args(QUICK + ["--batch-size", "4"])


def test_compile_wraps_the_training_forward_only(tmp_path, monkeypatch):
    """--compile hands the training model to torch.compile once, every training step runs through what it returns,
    and validation runs the plain model (Inductor itself takes minutes to build on 2 cores: not run here)."""
    calls = {"compiled": 0, "train": 0}

    def fake_compile(model):
        calls["compiled"] += 1

        def forward(*args, **kwargs):
            calls["train"] += 1
            return model(*args, **kwargs)
        forward.train = model.train
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = train.main(QUICK + ["--epochs", "2", "--batch-size", "2", "--train-samples", "6", "--compile",
                              "--output", str(tmp_path)])
    assert calls == {"compiled": 1, "train": 6} and isinstance(net, nn.Module)


def test_compile_with_grad_checkpointing_trains_what_compile_alone_trains(tmp_path, monkeypatch):
    """The real torch.compile (dynamo and AOTAutograd; the aot_eager backend, since Inductor takes minutes to build
    on 2 cores) with --grad-checkpointing gives, bit for bit, the weights and BN statistics of --compile alone, on
    tiny-RN, whose frozen BNs update in train mode: once per step, not again when backward recomputes them."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    # dynamo saves the CUDA RNG state wherever torch.cuda.is_available(), which would start CUDA on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs = []
    try:
        for option in ([], ["--grad-checkpointing"]):
            out = str(tmp_path / f"run{len(runs)}")
            train.main(QUICK + ["--backbone", "tiny-RN", "--epochs", "1", "--batch-size", "2", "--train-samples", "4",
                                "--dropout", "0", "--compile", "--output", out] + option)
            runs.append(final_weights(out))
    finally:
        torch._dynamo.reset()
    plain, recomputed = runs
    assert plain.keys() == recomputed.keys()
    assert [k for k in plain if not torch.equal(plain[k], recomputed[k])] == []
    assert recomputed["backbone.visual.layer4.0.bn1.num_batches_tracked"].item() == 2  # two steps


def test_an_unknown_backbone_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fetch_openai_weights", lambda name: pytest.fail(f"downloaded {name}"))
    with pytest.raises(UserError, match=r"^unknown backbone 'ViT-Q/99': valid backbones are ViT-B/16, RN50, RN101, "):
        train.main(QUICK + ["--backbone", "ViT-Q/99", "--output", str(tmp_path)])


def test_per_sample_seeds_restore_only_what_they_seed():
    class Draws(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return random.random(), float(np.random.rand()), torch.rand(1).item()
    ds = PerSampleSeeds(Draws(), seed=3)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b, c = ds[(2, 5)], ds[(2, 5)], ds[(3, 5)]
    assert a == b and a != c  # a function of (seed, epoch, index)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_skip_bad_leaves_out_bad_samples_and_reports_them_at_the_end(tmp_path, capsys):
    from fake_refer import fake_refer_release
    fake_refer_release(str(tmp_path / "data"), "refcoco", n_images=4, refs_per_image=2, size=(48, 64))
    image = tmp_path / "data" / "images" / "train2014" / "COCO_train2014_000000001000.jpg"  # refs 100 (train), 101 (val)
    image.write_bytes(image.read_bytes()[:200])
    args = ["--data", "refcoco", "--data-root", str(tmp_path / "data"), "--backbone", "tiny-ViT", "--input-size", "64",
            "--workers", "0", "--device", "cpu", "--batch-size", "1", "--epochs", "1", "--output", str(tmp_path / "run")]
    with pytest.raises(UserError, match=r"ref 100 \(annotation 5000\): image file .*000000001000.jpg is a truncated "
                                        r"JPEG.*--skip-bad"):
        train.main(args)
    capsys.readouterr()
    train.main(args + ["--skip-bad"])
    out = capsys.readouterr().out
    assert "--skip-bad left out 2 bad sample(s); the first ones:\n  ref 100: " in out and "\n  ref 101: " in out
    (record,) = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert record["bad_samples"] == 2 and record["global_step"] == 1 and record["val_n"] == 1


def test_dropout_option_sets_ga_and_bridger_dropout():
    def ps(module):  # every dropout probability in a module: nn.Dropout and the layers that call F.dropout
        return sorted({m.p for m in module.modules() if isinstance(m, nn.Dropout)} |
                      {m.dropout for m in module.modules() if isinstance(getattr(m, 'dropout', None), float)})
    for dropout, expected in ((None, 0.1), ("0", 0.0), ("0.3", 0.3)):
        option = [] if dropout is None else ["--dropout", dropout]
        for backbone in ("tiny-ViT", "tiny-RN"):
            args = train.parse_args(QUICK + ["--backbone", backbone] + option)
            net = train.build_net(args, train.distributed.Process())
            assert net.config.ga_dropout == net.config.bridger_dropout == expected
            assert ps(net.decoder) == [expected]
        # the ResNet Bridger's interactors take it too; the ViT Bridger, like the authors', has no dropout
        assert ps(net.bridger) == [expected]
