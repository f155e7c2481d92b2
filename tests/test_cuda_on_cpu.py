"""tests/test_cuda.py's AMP tests, run on the CPU: the same functions under the CPU's fp16 and bf16 autocast, which
runs the same products in half precision, with the same GradScaler, fused Adam, SyncBN conversion and DDP (gloo
here, NCCL there). So the skips those tests expect and their predictions from the fp32 gradient are checked on
every machine, not first on a GPU. On the small backbones: ViT-B/16 takes minutes per fp16 step on a CPU."""
import pytest
import torch
import torch.distributed as dist

from test_cuda import amp_step_against_fp32, fp16_skips_an_overflowing_or_nan_step, syncbn_ddp_fp16_steps

CPU = torch.device("cpu")


@pytest.mark.parametrize("amp, skips, loss_err, grad_err", [("fp16", 2, 8.9e-4, 0.073), ("bf16", 0, 0.013, 0.32)])
def test_amp_step_against_fp32_on_the_cpu(amp, skips, loss_err, grad_err):
    """tiny-ViT, 64 px: fp16 skips the 2 steps predicted from the fp32 gradient (neck.aggr.0.weight's 2.95 x 2^16
    and x 2^15 pass 65504), bf16 none. The errors measured on this project's 2-core VM (torch 2.13 CPU) are in the
    parameters; other CPUs sum in other orders, hence the 1.5x."""
    got_loss_err, got_grad_err, got_skips, predicted = amp_step_against_fp32("tiny-ViT", 64, amp, CPU)
    assert got_skips == predicted == skips
    assert got_loss_err <= 1.5 * loss_err and got_grad_err <= 1.5 * grad_err, (got_loss_err, got_grad_err)


@pytest.mark.parametrize("poison", ["overflow", "nan loss"])
def test_fp16_skips_an_overflowing_or_nan_step_on_the_cpu(poison):
    fp16_skips_an_overflowing_or_nan_step(poison, CPU)


def test_a_one_process_group_runs_a_syncbn_ddp_fp16_step_on_the_cpu(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        syncbn_ddp_fp16_steps(CPU)
    finally:
        dist.destroy_process_group()
