"""
The Bridger of ETRIS (paper Sec. 3.2, Fig. 2): a small side network that runs alongside the frozen CLIP
encoders and, after every third of the encoder (text blocks n/3, 2n/3, n; ViT blocks likewise, or ResNet
layer2/3/4), zooms both streams down to d=64 channels, lets them attend to each other and adds the result
back into both streams. It also drives the frozen CLIP stage by stage and returns what the decoder reads:
three visual maps, the word features and the sentence vector.

Parameter names follow the authors' released code so their checkpoints load unchanged:
zoom_in.i / zoom_out.i (Zoom layers), linear1.i / linear2.i (text down/up projections),
fusion_v.i / fusion_t.i (Interactor for ResNet, InteractorT for ViT), ln_v.j / ln_t.j.
All tensors here are batch first: [B, L, D] sequences, [B, C, H, W] maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from clip_loader import MultiheadAttention

ZOOM_KINDS = ("conv", "linear", "mlp")


class InteractorT(nn.Module):
    """Gated cross-attention: the query is multiplied by what it reads from the memory (no residual add).
    The ViT Bridger's fusion, and the text-to-visual fusion of the HA neck."""

    def __init__(self, dim, heads):
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, heads)

    def forward(self, x, memory):  # x [B, L, D], memory [B, M, D]
        return x * self.multihead_attn(x, memory, memory)


class Interactor(nn.Module):
    """Post-norm transformer decoder layer (self-attn, cross-attn, FFN 128): the ResNet Bridger's fusion."""

    def __init__(self, dim, heads, ffn_dim=128, dropout=0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.multihead_attn = MultiheadAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x, memory):  # x [B, L, D], memory [B, M, D]
        p = self.dropout if self.training else 0.0
        x = self.norm1(x + F.dropout(self.self_attn(x, x, x), p))
        x = self.norm2(x + F.dropout(self.multihead_attn(x, memory, memory), p))
        h = self.linear2(F.dropout(F.relu(self.linear1(x)), p))
        return self.norm3(x + F.dropout(h, p))


class Zoom(nn.Module):
    """Zoom layer for the 'linear' and 'mlp' ablations: a per-pixel projection, with the resolution change
    of the paper's strided conv done without parameters (average pooling down, nearest upsampling up)."""

    def __init__(self, in_dim, out_dim, hidden, stride, up, kind):
        super().__init__()
        self.stride, self.up = stride, up
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x):  # [B, C, H, W] -> [B, C', H*s, W*s] (up) or [B, C', H/s, W/s] (down)
        if self.stride > 1 and not self.up:
            x = F.avg_pool2d(x, self.stride)
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.stride > 1 and self.up:
            x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x


def zoom_layer(in_dim, out_dim, hidden, stride, up, kind="conv", norm=True):
    """The paper's zoom-in / zoom-out: conv (down) or transposed conv (up) with kernel = stride, no bias,
    followed by BN+ReLU in the ViT Bridger (norm=True) and bare in the ResNet Bridger."""
    if kind != "conv":
        return Zoom(in_dim, out_dim, hidden, stride, up, kind)
    conv = (nn.ConvTranspose2d if up else nn.Conv2d)(in_dim, out_dim, stride, stride, bias=False)
    if not norm:
        return conv
    return nn.Sequential(conv, nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


class Bridger(nn.Module):
    """Bridges the frozen CLIP encoders at three stages.

    vit: ViT variant (InteractorT fusion, zoom with BN+ReLU, output added to patch tokens only) or ResNet
    variant (Interactor fusion, bare zoom convs). vis_dims: visual channels at the three stages; txt_dim:
    text width; strides: zoom strides per stage (ViT 1,1,1; ResNet 2,1,2 so every stage fuses at the
    layer3 resolution); stages: which stages carry a bridge (() = plain CLIP features).
    """

    def __init__(self, vit, vis_dims, txt_dim, dim=64, heads=8, strides=(1, 1, 1), stages=(0, 1, 2), zoom="conv"):
        super().__init__()
        if zoom not in ZOOM_KINDS:
            raise ValueError(f"unknown zoom variant {zoom!r}; use one of {ZOOM_KINDS}")
        if not set(stages) <= {0, 1, 2}:
            raise ValueError(f"bridger stages {tuple(stages)} must be a subset of (0, 1, 2)")
        self.vit, self.stages = vit, tuple(sorted(set(stages)))
        # recompute the frozen CLIP blocks in backward instead of storing their activations (ETRIS.checkpoint_backbone)
        self.checkpoint_blocks = False
        # ModuleDicts keyed '0'..'2' give the authors' names (zoom_in.0.*) and leave out unbridged stages
        self.zoom_in, self.zoom_out = nn.ModuleDict(), nn.ModuleDict()
        self.linear1, self.linear2 = nn.ModuleDict(), nn.ModuleDict()
        self.fusion_v, self.fusion_t = nn.ModuleDict(), nn.ModuleDict()
        self.ln_v, self.ln_t = nn.ModuleDict(), nn.ModuleDict()
        fusion = InteractorT if vit else Interactor
        for i in self.stages:
            # the last stage's map is the coarsest (ResNet layer4), so its zoom-in upsamples
            up = i == 2
            self.zoom_in[str(i)] = zoom_layer(vis_dims[i], dim, dim, strides[i], up, zoom, norm=vit)
            self.zoom_out[str(i)] = zoom_layer(dim, vis_dims[i], dim, strides[i], not up, zoom, norm=vit)
            self.linear1[str(i)] = nn.Linear(txt_dim, dim)
            self.linear2[str(i)] = nn.Linear(dim, txt_dim)
            self.fusion_v[str(i)] = fusion(dim, heads)
            self.fusion_t[str(i)] = fusion(dim, heads)
            if i > self.stages[0]:  # later stages also see the previous stage's fused input
                self.ln_v[str(i - 1)] = nn.LayerNorm(dim)
                self.ln_t[str(i - 1)] = nn.LayerNorm(dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def bridge(self, i, vis, txt, last):
        """Stage i: vis [B, C, H, W], txt [B, L, Dt] -> residuals of the same shapes."""
        s = str(i)
        v = self.zoom_in[s](vis)  # [B, d, h, w]
        B, d, h, w = v.shape
        v = v.flatten(2).transpose(1, 2)  # [B, hw, d]
        t = self.linear1[s](txt)  # [B, L, d]
        if last is not None:
            v = self.ln_v[str(i - 1)](v + last[0])
            t = self.ln_t[str(i - 1)](t + last[1])
        last = (v, t)
        v, t = self.fusion_v[s](v, t), self.fusion_t[s](t, v)
        # maps are made NCHW-contiguous: a transposed [B, hw, d] view has channels-last strides, which sends the
        # convs down the channels-last path (about 2x slower backward on CPU); --channels-last opts in instead
        v = self.zoom_out[s](v.transpose(1, 2).reshape(B, d, h, w).contiguous())  # [B, C, H, W]
        return v, self.linear2[s](t), last

    def run(self, block, x):
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, images, tokens, clip, image_index=None):
        """images [B, 3, S, S], tokens [B, L] -> ([3 maps [B, C_i, h_i, w_i]], words [B, L, Dt], state [B, E]).
        image_index [B] (optional): images is then [N, 3, S, S] and row b reads images[image_index[b]]; the
        visual stream before the first bridge does not see the text, so it runs once per image."""
        visual = clip.visual
        txt = clip.embed_text(tokens)  # [B, L, Dt]
        txt_blocks = clip.transformer.resblocks
        if self.vit:
            patch = visual.conv1.stride[0]
            gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
            vis = visual.embed(images)  # [B, 1 + gh*gw, C]
            vis_blocks = visual.transformer.resblocks
        else:
            vis = visual.layer1(visual.stem(images))  # [B, C, S/4, S/4]
            vis_layers = (visual.layer2, visual.layer3, visual.layer4)
        outs, last = [], None
        for i in range(3):
            for block in txt_blocks[len(txt_blocks) // 3 * i: len(txt_blocks) // 3 * (i + 1)]:
                txt = self.run(block, txt)
            if self.vit:
                for block in vis_blocks[len(vis_blocks) // 3 * i: len(vis_blocks) // 3 * (i + 1)]:
                    vis = self.run(block, vis)
            else:
                vis = self.run(vis_layers[i], vis)
            if i == 0 and image_index is not None:  # one row per sentence from here on
                vis = vis[image_index]
            # ViT: patch tokens [B, C, gh, gw]
            vmap = vis[:, 1:].transpose(1, 2).reshape(vis.shape[0], -1, gh, gw).contiguous() if self.vit else vis
            if i in self.stages:
                dv, dt, last = self.bridge(i, vmap, txt, last)
                txt = txt + dt
                if self.vit:  # the class token is left as is (a zero row padded in front)
                    vis = vis + F.pad(dv.flatten(2).transpose(1, 2), (0, 0, 1, 0))
                    vmap = vmap + dv
                else:
                    vis = vmap = vis + dv
            if i < 2:
                outs.append(vmap)
        if self.vit:
            vis = visual.ln_post(vis[:, 1:]) @ visual.proj  # [B, gh*gw, E]
            outs.append(vis.transpose(1, 2).reshape(vis.shape[0], -1, gh, gw).contiguous())
        else:
            outs.append(visual.attnpool(vis))  # [B, E, S/32, S/32]
        words = clip.ln_final(txt)  # [B, L, Dt]
        # the end token has the largest id, so argmax finds it
        state = words[torch.arange(words.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection  # [B, E]
        return outs, words, state
