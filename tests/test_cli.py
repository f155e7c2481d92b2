"""The command lines meet a mistyped option or a wrong file with one line that names the option, the value and what
is allowed, exit status 2, no traceback and no warning before it; --help shows every default."""
import argparse
import os
import re
import socket
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch

import demo
import evaluate
import explain
import model
import predict
import prepare
import train
from tools import benchmark
from errors import ArgumentParser, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED_CHECKPOINTS = r"give a checkpoint that train.py writes \(best.pth or last.pth, in exp/<data>/<backbone>/\)"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A corrupt checkpoint (the first half of a real one), a torch file of something else, an image."""
    d = tmp_path_factory.mktemp("files")
    torch.save({"config": {}, "model": {"w": torch.zeros(1000)}}, d / "whole.pth")
    data = (d / "whole.pth").read_bytes()
    (d / "corrupt.pth").write_bytes(data[:len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, d / "other.pth")
    cv2.imwrite(str(d / "photo.png"), np.zeros((20, 30, 3), np.uint8))
    return d


def run_command(monkeypatch, capsys, main, argv):
    """main() as its command line runs it (errors.run_cli): (exit status, stdout, stderr, warnings shown)."""
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as stop:
        warnings.simplefilter("always")
        run_cli(main)
    out, err = capsys.readouterr()
    return stop.value.code, out, err, [str(w.message) for w in caught]


TRAIN = ["train.py", "--data", "synthetic", "--backbone", "tiny-ViT", "--input-size", "64", "--device", "cpu"]
EVALUATE = ["evaluate.py", "--data", "synthetic", "--device", "cpu"]
PREDICT = ["predict.py", "--text", "the red circle", "--device", "cpu"]
CASES = [  # (main, argv, the one line it must print)
    (train.main, TRAIN + ["--batch-size", "0"], r"argument --batch-size: 0 is not allowed: give an integer >= 1"),
    (train.main, TRAIN + ["--lr", "-1"], r"argument --lr: -1 is not allowed: give a number > 0"),
    (train.main, TRAIN + ["--lr", "-1e-4"], r"argument --lr: -1e-4 is not allowed: give a number > 0"),
    (train.main, TRAIN + ["--lr", "fast"], r"argument --lr: 'fast' is not a number: give a number > 0"),
    (train.main, TRAIN + ["--lr", "nan"], r"argument --lr: nan is not allowed: give a number > 0"),
    (train.main, TRAIN + ["--workers", "-1"], r"argument --workers: -1 is not allowed: give an integer >= 0"),
    (train.main, TRAIN + ["--epochs", "2.5"], r"argument --epochs: '2.5' is not an integer: give an integer >= 1"),
    (train.main, TRAIN + ["--dropout", "1"], r"argument --dropout: 1 is not allowed: give a number >= 0 and < 1"),
    (train.main, TRAIN + ["--input-size", "10"],
     r"--input-size 10 does not fit backbone tiny-ViT: input size 10 is not a multiple of the ViT patch size 16"),
    (train.main, TRAIN + ["--backbone", "RN50", "--input-size", "400"],
     r"--input-size 400 does not fit backbone RN50: input size 400 is not a multiple of 32, the ResNet's stride"),
    (train.main, TRAIN + ["--backbone", "ViT-Q/99", "--workers", "4"],
     r"unknown backbone 'ViT-Q/99': valid backbones are ViT-B/16, RN50, RN101, tiny-ViT, tiny-RN"),
    (train.main, TRAIN + ["--weights", "{files}/missing.pth"], r"--weights {files}/missing.pth: no such file"),
    (train.main, TRAIN + ["--weights", "{files}/corrupt.pth"],
     r"--weights '{files}/corrupt.pth' is not an ETRIS checkpoint .*not a readable torch file .*: " +
     ALLOWED_CHECKPOINTS),
    (train.main, TRAIN + ["--batch-size", "3"], None),  # divisible by one process: no error (see below)
    (evaluate.main, EVALUATE + ["--batch-size", "0"], r"argument --batch-size: 0 is not allowed"),
    (evaluate.main, EVALUATE + ["--workers", "-1"], r"argument --workers: -1 is not allowed: give an integer >= 0"),
    (evaluate.main, EVALUATE + ["--lr", "-1"], r"unrecognized arguments: --lr -1 \(see evaluate.py --help\)"),
    (evaluate.main, EVALUATE + ["--threshold", "1.5"],
     r"argument --threshold: 1.5 is not allowed: give a number > 0 and < 1"),
    (evaluate.main, EVALUATE + ["--split", "testA"], r"--split 'testA' is not a split of synthetic: train, val, test"),
    (evaluate.main, EVALUATE + ["--backbone", "RN50", "--input-size", "10"],
     r"--input-size 10 does not fit backbone RN50"),
    (evaluate.main, EVALUATE + ["--backbone", "RN5O"], r"unknown backbone 'RN5O'"),
    (evaluate.main, EVALUATE + ["--checkpoint", "{files}/missing.pth"],
     r"--checkpoint {files}/missing.pth: no such file; " + ALLOWED_CHECKPOINTS),
    (evaluate.main, EVALUATE + ["--checkpoint", "{files}/corrupt.pth"],
     r"cannot read checkpoint {files}/corrupt.pth: not a complete torch file: a truncated download or copy, or no "
     r"checkpoint at all; copy it again, or " + ALLOWED_CHECKPOINTS),
    (evaluate.main, EVALUATE + ["--checkpoint", "{files}/other.pth"],
     r"'{files}/other.pth' is a torch file but not a trained ETRIS model: " + ALLOWED_CHECKPOINTS),
    (evaluate.main, EVALUATE, r"no checkpoint at exp/synthetic/ViT-B-16/best.pth: train one first \(python train.py "
                              r"--data synthetic ...\), or pass --checkpoint PATH"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "{files}/missing.pth"],
     r"checkpoint {files}/missing.pth not found: " + ALLOWED_CHECKPOINTS),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "{files}/corrupt.pth"],
     r"cannot read checkpoint {files}/corrupt.pth: not a complete torch file"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "x.pth", "--backbone", "RN5O"],
     r"unknown backbone 'RN5O'"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "x.pth", "--threshold", "0"],
     r"argument --threshold: 0 is not allowed: give a number > 0 and < 1"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "x.pth", "--batch-size", "0"],
     r"unrecognized arguments: --batch-size 0 \(see predict.py --help\)"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png", "--checkpoint", "x.pth", "--input-size", "10"],
     r"unrecognized arguments: --input-size 10 \(see predict.py --help\)"),
    (predict.main, PREDICT + ["--image", "{files}/photo.png"], r"the following arguments are required: --checkpoint"),
]


@pytest.mark.parametrize("main, argv, message", CASES, ids=[" ".join(c[1][1:]) for c in CASES])
def test_a_mistake_is_one_line_and_exit_status_2(main, argv, message, files, monkeypatch, capsys):
    argv = [a.replace("{files}", str(files)) for a in argv]
    if message is None:  # a valid command: stopped right after its arguments are checked
        monkeypatch.setattr(train.distributed, "setup", lambda device: (_ for _ in ()).throw(SystemExit(0)))
        status, out, err, shown = run_command(monkeypatch, capsys, main, argv)
        assert (status, err, shown) == (0, "", [])
        return
    status, out, err, shown = run_command(monkeypatch, capsys, main, argv)
    assert status == 2 and out == "" and shown == []
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert re.fullmatch("error: " + message.replace("{files}", str(files)) + ".*\n", err), err


def test_a_batch_that_the_processes_cannot_share_is_refused_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train.distributed, "setup", lambda device: pytest.fail("set up before the check"))
    status, out, err, shown = run_command(monkeypatch, capsys, train.main, TRAIN + ["--batch-size", "3"])
    assert (status, shown) == (2, [])
    assert err == "error: --batch-size 3 (global) is not divisible by 2 processes: give a multiple of 2\n"


def test_negative_numbers_in_any_notation_are_values():
    p = ArgumentParser(prog="t")
    p.add_argument("--x", type=float)
    p.add_argument("--n", type=int, nargs="+")
    assert p.parse_args(["--x", "-1e-4"]).x == -1e-4
    assert p.parse_args(["--x", "-.5"]).x == -0.5
    assert p.parse_args(["--x=-2E3"]).x == -2000.0
    assert p.parse_args(["--n", "3", "--x", "-1e-4"]).n == [3]


def parser_of(main, argv, monkeypatch):
    """The ArgumentParser that main builds, caught when it parses."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(ArgumentParser, "parse_known_args", catch)
    with pytest.raises(SystemExit):
        main(argv)
    return caught[0]


@pytest.mark.parametrize("main", [train.main, evaluate.main, predict.main, explain.main, demo.main, model.main,
                                  prepare.main, benchmark.main])
def test_help_shows_every_default(main, monkeypatch):
    parser = parser_of(main, [], monkeypatch)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:
            continue
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        says_it = "default" in (action.help or "") and shown in " ".join((action.help % vars(action)).split())
        assert f"(default: {shown})" in text or says_it, (action.option_strings, shown)


def test_help_of_train_and_evaluate_names_the_recipe_defaults(monkeypatch):
    text = " ".join(parser_of(train.main, [], monkeypatch).format_help().split())
    for expected in ("passes over the training refs (default: 50)", "Adam's learning rate (default: 0.0001)",
                     "split across processes (default: 32)", "letterboxed to this square (default: 416)"):
        assert expected in text
    text = " ".join(parser_of(evaluate.main, [], monkeypatch).format_help().split())
    assert "on the sigmoid of the logits (default: 0.35)" in text


def test_workers_default_to_the_cpus_each_process_may_use(monkeypatch):
    from dataset import default_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers() == 2


def test_a_mistake_is_one_line_also_under_torchrun():
    """Every process meets the same mistake before any process group exists; one line is printed in all."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "train.py"] + TRAIN[1:] + ["--batch-size", "0"], cwd=ROOT, capture_output=True,
                         text=True)
    printed = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert run.returncode != 0 and "Warning:" not in run.stderr, run.stderr  # (torchrun adds its own traceback)
    assert printed == ["error: argument --batch-size: 0 is not allowed: give an integer >= 1 (see train.py --help)"]
