"""distributed.py and the command lines' errors, with real processes: devices named by string, the deterministic
mode's attention kernel, SLURM without torchrun refused, one download per node while the other processes wait on
the job's store (as long as it takes, told of a failure, with no second process group; under mp.spawn and under
torchrun), an output folder that the nodes do not share refused with the ranks named, a NaN on one rank skipping
the step on both, and user errors printed once: by rank 0 when every rank meets them, by the rank that has one
alone, named. Gloo processes on this machine play two nodes (each its own working directory and CLIP cache) or
one."""
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
from checkpoint import save_checkpoint
from clip_loader import random_clip_state_dict
from dataset import build_dataset
from errors import UserError
from fake_refer import fake_refer_release
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--data", "synthetic", "--input-size", "64", "--workers", "0", "--val-samples", "2", "--device", "cpu",
         "--batch-size", "4", "--train-samples", "8", "--epochs", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_DEVICE = distributed.default_device  # as imported, before conftest's guard replaces it in each test


def test_devices_by_name(monkeypatch):
    """Only names are checked: no CUDA call is made, so the machine's own GPUs do not matter."""
    monkeypatch.setattr(distributed, "default_device", DEFAULT_DEVICE)  # conftest refuses the default elsewhere
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


def spawn_within(seconds, fn, *args, nprocs=2):
    """mp.spawn(fn, args) that fails the test, killing the processes, if they have not ended after `seconds`."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the processes still run after {seconds} s: one waits for ever")


def _node_first_rank(rank, port, folder, first_fails):
    """Rank `rank` of 2 on one node, in a gloo group that times out after 2 s, where no second process group may
    be made. Local rank 0's stand-in download takes 3 s and may then fail (first_fails: a UserError, or a bug);
    what each rank got is written to folder/rank<r>."""
    os.environ.update(LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))

    def no_second_group(*args, **kwargs):
        raise AssertionError("a second process group was made")
    dist.new_group = dist.new_subgroups = no_second_group

    def download():
        if rank == 0:
            time.sleep(3)
            if first_fails == "user error":
                raise UserError("cannot download RN50: no network")
            if first_fails == "bug":
                raise KeyError("sha256")
        return f"weights seen by rank {rank}"
    try:
        result = distributed.on_each_node_first(download, poll_s=0.05)
    except (UserError, KeyError) as e:
        result = f"{type(e).__name__}: {e}"
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(result)
    distributed.teardown()


@pytest.mark.parametrize("first_fails", [None, "user error", "bug"])
def test_the_node_first_wait_outlasts_the_groups_timeout_and_hears_of_a_failure(tmp_path, first_fails):
    """The other process waits on the job's store (here rank 0's, as under mp.spawn without torchrun's agent) for
    a download 1.5x the process group's timeout, with no second process group; a failure of the first process,
    a UserError or a bug, reaches it as a UserError instead of a wait for ever."""
    spawn_within(60, _node_first_rank, free_port(), str(tmp_path), first_fails)
    got = [open(tmp_path / f"rank{r}").read() for r in (0, 1)]
    assert got == {None: ["weights seen by rank 0", "weights seen by rank 1"],
                   "user error": ["UserError: cannot download RN50: no network"] * 2,
                   "bug": ["KeyError: 'sha256'", "UserError: rank 0, the first process of this node, failed "
                                                 "(KeyError: 'sha256'); see its traceback"]}[first_fails]


NODE_FIRST_UNDER_TORCHRUN = """
import datetime, os, sys, time
import torch.distributed as dist
sys.path.insert(0, os.getcwd())
import distributed
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
dist.new_group = None  # no second process group
folder = os.path.join(sys.argv[1], f"node{os.environ['GROUP_RANK']}")

def download():
    if os.environ["LOCAL_RANK"] == "0":
        time.sleep(5)
        open(os.path.join(folder, "weights"), "w").write(f"by rank {dist.get_rank()}")
    return open(os.path.join(folder, "weights")).read()
print(f"rank {dist.get_rank()} reads weights {distributed.on_each_node_first(download, poll_s=0.05)}", flush=True)
distributed.teardown()
"""


def test_the_node_first_wait_under_torchrun_on_two_nodes(tmp_path):
    """Two torchrun agents on this machine play two nodes of two processes each; their processes wait on the
    agent's store, which torchrun serves from before the process group exists to the end of the job."""
    (tmp_path / "node_first.py").write_text(NODE_FIRST_UNDER_TORCHRUN)
    port = free_port()
    agents = []
    for node in (0, 1):
        os.makedirs(tmp_path / f"node{node}")
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(tmp_path / "node_first.py"), str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outs = [a.communicate(timeout=120)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    lines = sorted(line for out in outs for line in out.splitlines() if " reads weights " in line)
    assert lines == ["rank 0 reads weights by rank 0", "rank 1 reads weights by rank 0",
                     "rank 2 reads weights by rank 2", "rank 3 reads weights by rank 2"], outs


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
    assert "rank" not in [line for line in (two.stdout + two.stderr).splitlines() if "no refcoco data" in line][0]
    bad_option = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_port()), "train.py", "--batch-size", "0"], cwd=ROOT,
                                capture_output=True, text=True)  # refused before any process group exists
    assert [line for line in (bad_option.stdout + bad_option.stderr).splitlines() if "--batch-size" in line] == [
        "error: argument --batch-size: 0 is not allowed: give an integer >= 1 (see train.py --help)"]


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_a_bad_sample_on_rank_1_alone_is_printed_once_by_rank_1(tmp_path):
    """evaluate.py in two processes under torchrun; rank 1's shard (refs 1, 3, ...) holds an image that passes the
    build-time checks (JPEG start and end markers) but does not decode, so its DataLoader worker raises a
    BadSampleError there and nowhere else."""
    root = str(tmp_path / "refer")
    fake_refer_release(root, n_images=4)
    records = build_dataset("refcoco", "testA", root=root, input_size=64, mode="test", verbose=False).records
    odd_only = [r["image"] for i, r in enumerate(records) if i % 2 and r["image"] not in
                {q["image"] for q in records[::2]}]
    with open(odd_only[0], "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"garbage" * 100 + b"\xff\xd9")
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "best.pth"), build_model("tiny-ViT", input_size=64))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "evaluate.py", "--data", "refcoco", "--split", "testA", "--data-root", root,
                          "--checkpoint", str(tmp_path / "best.pth"), "--workers", "1", "--batch-size", "1",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if "could not be decoded" in line]
    assert run.returncode != 0 and len(lines) == 1, run.stdout + run.stderr
    assert lines[0].startswith(f"error: rank 1: ref ") and odd_only[0] in lines[0], lines
