"""distributed.py and the command lines' errors, with real processes: devices named by string, the deterministic
mode's attention kernel, SLURM without torchrun refused, one download per node while the other processes wait (as
long as it takes), an output folder that the nodes do not
share refused with the ranks named, a NaN on one rank skipping the step on both, and user errors printed as one
line, once, also under torchrun. Two gloo processes on this machine play two nodes (each its own working
directory and CLIP cache) or one."""
import datetime
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clip_loader
import distributed
import train
from clip_loader import random_clip_state_dict
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--data", "synthetic", "--input-size", "64", "--workers", "0", "--val-samples", "2", "--device", "cpu",
         "--batch-size", "4", "--train-samples", "8", "--epochs", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_devices_by_name(monkeypatch):
    """Only names are checked: no CUDA call is made, so the machine's own GPUs do not matter."""
    assert distributed.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="'gpu' is not a device: use cpu, cuda or cuda:N"):
        distributed.pick_device("gpu")
    with pytest.raises(UserError, match="only cpu and cuda"):
        distributed.pick_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.pick_device(None) == torch.device("cpu")
    with pytest.raises(UserError, match="'cuda:1': this machine has no CUDA device"):
        distributed.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.pick_device(None) == torch.device("cuda", 0)
    assert distributed.pick_device("cuda", local_rank=1, world=2) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="cuda:2 does not exist: this machine has 2 CUDA device"):
        distributed.pick_device("cuda:2")
    with pytest.raises(UserError, match="under torchrun each process uses its own GPU, cuda:LOCAL_RANK"):
        distributed.pick_device("cuda:0", local_rank=0, world=2)


def test_deterministic_mode_computes_attention_with_the_math_kernel(kernel_settings_restored):
    """torch's fused attention kernels have a non-deterministic backward under warn_only; only the math kernel is
    left on (the flags are global settings: nothing runs on a GPU here)."""
    distributed.seed_and_configure(0, True, torch.device("cuda", 0))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled() or
                torch.backends.cuda.cudnn_sdp_enabled())
    assert torch.backends.cuda.math_sdp_enabled()


def test_slurm_tasks_without_torchrun_are_refused(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="started by SLURM as 8 tasks without torchrun.*srun --ntasks-per-node 1"):
        distributed.setup("cpu")


# ----------------------------------------------------------------------------- two processes

def serve_clip_file(monkeypatch_target, folder):
    """OpenAI's RN50 URL answered from a local tiny-RN file; every download leaves a line in folder/downloads."""
    buf = io.BytesIO()
    torch.save(random_clip_state_dict("tiny-RN"), buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch_target._MODELS["RN50"] = f"https://example.invalid/clip/{sha}/RN50.pt"

    def urlopen(url, *args, **kwargs):
        with open(os.path.join(folder, "downloads"), "a") as f:
            f.write(f"{os.environ['RANK']}\n")
        return io.BytesIO(data)
    monkeypatch_target.urllib.request.urlopen = urlopen


def _process(rank, world, port, folder, nodes, argv):
    """Rank `rank` of `world`, on node rank * nodes // world: its own working directory and CLIP cache."""
    node = rank * nodes // world
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank - node * world // nodes),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ETRIS_CLIP_CACHE=os.path.join(folder, f"node{node}", "cache"))
    os.makedirs(os.path.join(folder, f"node{node}"), exist_ok=True)
    os.chdir(os.path.join(folder, f"node{node}"))
    torch.set_num_threads(1)
    serve_clip_file(clip_loader, folder)
    if "--nan-on-rank-1" in argv:  # rank 1's second loss is NaN; rank 0's are all finite
        argv = [a for a in argv if a != "--nan-on-rank-1"]
        real, calls = train.segmentation_loss, []

        def loss_fn(logits, mask):
            calls.append(1)
            return real(logits, mask) * (float("nan") if rank == 1 and len(calls) == 2 else 1.0)
        train.segmentation_loss = loss_fn
    train.main(argv)


def spawn(folder, nodes, argv):
    mp.spawn(_process, args=(2, free_port(), str(folder), nodes, argv), nprocs=2, join=True)


def test_one_node_downloads_once_and_a_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    out = str(tmp_path / "run")
    spawn(tmp_path, 1, QUICK + ["--backbone", "RN50", "--output", out, "--nan-on-rank-1"])
    assert open(tmp_path / "downloads").read().split() == ["0"]  # rank 1 waited, then read rank 0's file
    (record,) = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert record["global_step"] == 2 and record["nonfinite_skipped"] == 1
    ck = torch.load(os.path.join(out, "last.pth"), map_location="cpu", weights_only=True)
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {1.0}  # 2 steps, 1 update


def _slow_first(rank, port, folder):
    """Rank `rank` of 2 on one node, in a process group that times out after 2 s; local rank 0's stand-in download
    takes 5 s."""
    os.environ.update(LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))

    def download():
        if rank == 0:
            time.sleep(5)
        return f"weights seen by rank {rank}"
    result = distributed.on_each_node_first(download)
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(result)
    distributed.teardown()


def test_a_download_longer_than_the_process_groups_timeout_is_waited_for(tmp_path):
    mp.spawn(_slow_first, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [open(tmp_path / f"rank{r}").read() for r in (0, 1)] == ["weights seen by rank 0", "weights seen by rank 1"]


def test_an_output_folder_the_nodes_do_not_share_is_refused(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match=r"--output run is not shared: rank\(s\) \[1\] do not see"):
        spawn(tmp_path, 2, QUICK + ["--backbone", "RN50", "--output", "run"])  # relative: one folder per node
    assert sorted(open(tmp_path / "downloads").read().split()) == ["0", "1"]  # one download per node


def test_resume_auto_on_two_processes(tmp_path):
    out = str(tmp_path / "run")
    spawn(tmp_path, 1, QUICK + ["--backbone", "tiny-ViT", "--output", out])
    spawn(tmp_path, 1, QUICK[:-2] + ["--epochs", "2", "--backbone", "tiny-ViT", "--output", out, "--resume", "auto"])
    history = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["global_step"] == 4


# ----------------------------------------------------------------------------- one line per error

def test_a_user_error_is_one_line_once_also_under_torchrun(tmp_path):
    argv = ["train.py", "--data", "refcoco", "--data-root", str(tmp_path / "nowhere"), "--device", "cpu"]
    one = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert one.stderr.strip().splitlines() == [one.stderr.strip()] and one.stderr.startswith(
        f"error: no refcoco data under '{tmp_path / 'nowhere'}'")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port())] + argv, cwd=ROOT, capture_output=True, text=True)
    assert two.returncode != 0 and (two.stdout + two.stderr).count("error: no refcoco data under") == 1
