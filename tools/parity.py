"""Deterministic weights for comparing this implementation with the authors' ETRIS code (the golden fixtures of
tests/test_model.py, tools/benchmark.py's side-by-side runs): every parameter and buffer is refilled from a generator
seeded by the CRC32 of its state-dict name (without 'module.'), so two implementations with the same names get the
same numbers whatever their init or construction order.
Scales keep activations O(1) through the frozen CLIP: fan-in scaled weights, norm weights near 1,
positive BN variances, small biases, and small weights on the last BN of each ResNet residual branch
(CLIP zero-inits those) so RN101's 33 residual blocks do not grow the activations. Torch-only, no repo
imports: also used by the script that runs the authors' code."""
import zlib

import torch


def fill_value(name, like):
    """The value the parity rule gives the tensor `name` with the shape and dtype of `like`."""
    if not like.is_floating_point():
        return torch.zeros_like(like)  # num_batches_tracked
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    noise = torch.randn(like.shape, generator=g).to(like.dtype)
    if leaf == "running_var":
        return 0.5 + noise.abs()
    if leaf == "running_mean":
        return 0.1 * noise
    if leaf == "logit_scale":
        return torch.full_like(like, 4.6052)
    if like.dim() <= 1:
        if leaf == "weight":  # LayerNorm / BatchNorm scale
            return (0.1 if ".layer" in name and name.endswith("bn3.weight") else 1.0) * (1 + 0.1 * noise)
        if leaf.endswith("bias"):
            return 0.02 * noise
        return noise * like.numel() ** -0.5  # class_embedding
    return noise * like[0].numel() ** -0.5  # [out, in, ...] weights; embeddings and projections alike


@torch.no_grad()
def fill_(state):
    """Fill every tensor of a state dict (or a module's) in place; names may carry a 'module.' prefix."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    for name, t in state.items():
        t.copy_(fill_value(name[len("module."):] if name.startswith("module.") else name, t))
