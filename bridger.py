"""
The Bridger of ETRIS (paper Sec. 3.2, Fig. 2 middle): a small trainable network between the frozen CLIP encoders.
After each encoder stage it zooms the visual map and the words into its own width d=64 (ZL_in; a ResNet's maps
also to stride 16), lets each attend to the other (the interactor, ITA), zooms the results back out to the
encoders' widths and resolutions (ZL_out), and returns them as residuals that ETRIS adds back into both streams.

Parameter names are the authors' so their checkpoints load unchanged: zoom_in.i / zoom_out.i (the zoom layers
into and out of width d, not magnifications), linear1.i / linear2.i (the same for the words), fusion_v.i /
fusion_t.i (interactors), ln_v.j / ln_t.j.
"""
import torch.nn as nn
import torch.nn.functional as F

from layers import GatedCrossAttention, TransformerInteractor, flat_to_map

ZOOM_KINDS = ("conv", "linear", "mlp")


def zoom_layer(in_dim, out_dim, stride, up, norm):
    """The paper's zoom-in / zoom-out: a conv (down) or transposed conv (up) with kernel = stride and no bias,
    followed by BN+ReLU in the ViT Bridger (norm=True) and bare in the ResNet Bridger."""
    conv = (nn.ConvTranspose2d if up else nn.Conv2d)(in_dim, out_dim, stride, stride, bias=False)
    if not norm:
        return conv
    return nn.Sequential(conv, nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


class PixelwiseZoom(nn.Module):
    """Zoom layer of the 'linear' and 'mlp' ablations: a per-pixel projection, with the resolution change of the
    paper's strided conv done without parameters (average pooling down, nearest upsampling up)."""

    def __init__(self, in_dim, out_dim, hidden, stride, up, kind):
        super().__init__()
        self.stride, self.up = stride, up
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x):  # [B, C, H, W] -> [B, C', H*s, W*s] (up) or [B, C', H/s, W/s] (down)
        if self.stride > 1 and not self.up:
            x = F.avg_pool2d(x, self.stride)
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.stride > 1 and self.up:
            x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x


class Bridger(nn.Module):
    """Exchanges between the frozen image and text encoders after their stages 0, 1, 2.

    vit: the ViT variant (gated cross-attention interactors, zoom layers with BN+ReLU) or the ResNet one
    (transformer interactors, bare zoom convs). vis_dims: visual channels at the three stages; txt_dim: text
    width; strides: zoom strides (ViT 1,1,1; ResNet 2,1,2, so that every stage fuses at layer3's stride 16);
    stages: the stages that carry a bridge (() = plain CLIP features, an ablation); zoom: 'conv' (the paper's)
    or the 'linear' / 'mlp' ablations.
    """

    def __init__(self, vit, vis_dims, txt_dim, dim=64, heads=8, strides=(1, 1, 1), stages=(0, 1, 2), zoom="conv",
                 dropout=0.1):
        super().__init__()
        if zoom not in ZOOM_KINDS:
            raise ValueError(f"unknown zoom variant {zoom!r}; use one of {ZOOM_KINDS}")
        if not set(stages) <= {0, 1, 2}:
            raise ValueError(f"bridger stages {tuple(stages)} must be a subset of (0, 1, 2)")
        self.stages = tuple(sorted(set(stages)))
        # ModuleDicts keyed '0'..'2' give the authors' names (zoom_in.0.*) and leave out unbridged stages
        self.zoom_in, self.zoom_out = nn.ModuleDict(), nn.ModuleDict()
        self.linear1, self.linear2 = nn.ModuleDict(), nn.ModuleDict()
        self.fusion_v, self.fusion_t = nn.ModuleDict(), nn.ModuleDict()
        self.ln_v, self.ln_t = nn.ModuleDict(), nn.ModuleDict()
        for i in self.stages:
            up = i == 2  # the last stage's map is the coarsest (ResNet layer4), so its zoom-in upsamples
            if zoom == "conv":
                self.zoom_in[str(i)] = zoom_layer(vis_dims[i], dim, strides[i], up, norm=vit)
                self.zoom_out[str(i)] = zoom_layer(dim, vis_dims[i], strides[i], not up, norm=vit)
            else:
                self.zoom_in[str(i)] = PixelwiseZoom(vis_dims[i], dim, dim, strides[i], up, zoom)
                self.zoom_out[str(i)] = PixelwiseZoom(dim, vis_dims[i], dim, strides[i], not up, zoom)
            self.linear1[str(i)] = nn.Linear(txt_dim, dim)
            self.linear2[str(i)] = nn.Linear(dim, txt_dim)
            for fusion in (self.fusion_v, self.fusion_t):
                fusion[str(i)] = GatedCrossAttention(dim, heads) if vit else TransformerInteractor(dim, heads,
                                                                                                   dropout=dropout)
            if i > self.stages[0]:  # later stages also read the previous stage's zoomed-in pair
                self.ln_v[str(i - 1)] = nn.LayerNorm(dim)
                self.ln_t[str(i - 1)] = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, i, vis, txt, prev_zoomed=None):
        """Stage i (0, 1, 2): the image map and the words after it, F_v^{i+2} [B, C, H, W] and F_t^{i+2} [B, L, Dt]
        (the paper's prose counts the stages from 2) -> the residuals added to them (same shapes), and this stage's
        zoomed-in pair (v, t) at width d, which the next stage adds to its own (`prev_zoomed`)."""
        s = str(i)
        v = self.zoom_in[s](vis)  # ZL_in, into the Bridger's width: hat F_v^{i+2} [B, d, h, w]
        h, w = v.shape[-2:]
        v = v.flatten(2).transpose(1, 2)  # [B, hw, d]
        t = self.linear1[s](txt)  # the words into the Bridger's width: [B, L, d]
        if prev_zoomed is not None:  # the stage link, at width d (docs/paper_vs_code.md, entry 5)
            v = self.ln_v[str(i - 1)](v + prev_zoomed[0])
            t = self.ln_t[str(i - 1)](t + prev_zoomed[1])
        zoomed = (v, t)
        v, t = self.fusion_v[s](v, t), self.fusion_t[s](t, v)  # ITA, each reading the same zoomed-in pair
        return self.zoom_out[s](flat_to_map(v, h, w)), self.linear2[s](t), zoomed  # ZL_out: back to C and Dt
