"""
ETRIS training loss (paper Sec. 3.4, the authors' code): binary cross-entropy with logits between the stride-4 mask
logits and the ground-truth mask resized to the logits' size with nearest interpolation. The paper calls it
text-to-pixel contrastive: the logits are the text kernel applied to pixel features.
"""
import torch
import torch.nn.functional as F


def segmentation_loss(logits, mask):
    """logits [B, 1, h, w], mask [B, 1, H, W] in [0, 1] -> mean BCE (scalar).

    Computed in the wider of the two dtypes, as autocast computes the authors' loss: half-precision logits meet
    the float32 mask (whose letterboxed edges are soft), never a mask rounded to half precision."""
    if mask.shape[-2:] != logits.shape[-2:]:
        mask = F.interpolate(mask, size=logits.shape[-2:], mode="nearest")
    dtype = torch.promote_types(logits.dtype, mask.dtype)
    return F.binary_cross_entropy_with_logits(logits.to(dtype), mask.to(dtype))
