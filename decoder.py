"""
The ETRIS decoder (paper Sec. 3.3, Fig. 2 right), as in the authors' code (itself from CRIS):
HA, the hierarchical alignment neck that fuses the three visual maps with the sentence vector into one stride-16
map; GA, the global alignment transformer decoder that lets every pixel read the words; and the Projector, which
turns the sentence vector into a dynamic 3x3 kernel applied to the stride-4 pixel features (the "text-to-pixel"
alignment trained with BCE). The model names them `neck`, `decoder`, `proj`, as the authors do.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import GatedCrossAttention, MultiheadAttention, conv_bn_relu, deconv_bn_relu, flat_to_map


class CoordConv(nn.Module):
    """3x3 conv+BN+ReLU over the input with two extra channels: x and y in [-1, 1]."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.conv1 = conv_bn_relu(in_dim + 2, out_dim, 3, 1)

    def forward(self, x):  # [B, C, H, W] -> [B, C', H, W]
        B, _, H, W = x.shape
        # float32 coordinates, as the authors', whatever the input's dtype
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device),
                                torch.linspace(-1, 1, W, device=x.device), indexing="ij")
        coords = torch.stack([xs, ys]).to(x.dtype).expand(B, -1, -1, -1)  # F_coord [B, 2, H, W] (the paper: C channels)
        return self.conv1(torch.cat([x, coords], dim=1))


class HA(nn.Module):
    """Hierarchical alignment: each visual map goes to `dim` channels at stride 16 (strided conv / transposed
    conv), is gated by the projected sentence vector, and the three are merged (F_m), then given their x, y
    coordinates (F_coord) and convolved into F_v."""

    def __init__(self, in_dims, sentence_dim, dim=512, strides=(1, 1, 1), heads=8):
        super().__init__()
        self.fusion3 = GatedCrossAttention(dim, heads)
        self.fusion4 = GatedCrossAttention(dim, heads)
        self.fusion5 = GatedCrossAttention(dim, heads)
        self.txt_proj = nn.Linear(sentence_dim, dim)
        self.f3_proj = conv_bn_relu(in_dims[0], dim, strides[0], 0, strides[0])
        self.f4_proj = conv_bn_relu(in_dims[1], dim, strides[1], 0, strides[1])
        self.f5_proj = deconv_bn_relu(in_dims[2], dim, strides[2], strides[2])
        self.aggr = conv_bn_relu(3 * dim, dim, 1, 0)
        self.coordconv = nn.Sequential(CoordConv(dim, dim), conv_bn_relu(dim, dim, 3, 1))

    def forward(self, maps, sentence):  # maps: f_v^1..3 (after the Bridger), 3 x [B, C_i, h_i, w_i]; f_s [B, E]
        txt = self.txt_proj(sentence).unsqueeze(1)  # [B, 1, dim]
        levels = []
        for proj, fusion, x in zip((self.f3_proj, self.f4_proj, self.f5_proj),
                                   (self.fusion3, self.fusion4, self.fusion5), maps):
            x = proj(x)  # [B, dim, S/16, S/16]
            h, w = x.shape[-2:]
            # one key (the sentence): attention weights of 1, so this gates each channel by the sentence
            levels.append(flat_to_map(fusion(x.flatten(2).transpose(1, 2), txt), h, w))
        fused = self.aggr(torch.cat(levels, dim=1))  # F_m [B, dim, S/16, S/16]
        return self.coordconv(fused)  # F_v: F_m and F_coord (CoordConv), two 3x3 convs [B, dim, S/16, S/16]


def sine_pos_1d(dim, length):
    """Transformer sine/cosine encoding: [length, dim], even channels sin, odd channels cos."""
    if dim % 2:
        raise ValueError(f"1-D sine position encoding needs an even width, got {dim}")
    pos = torch.arange(length, dtype=torch.float).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sine_pos_2d(dim, height, width):
    """2-D sine encoding as CRIS: the first half of the channels encodes x, the second half y, each interleaving
    sin/cos. Returns [height*width, dim], row-major over (y, x)."""
    if dim % 4:
        raise ValueError(f"2-D sine position encoding needs a width divisible by 4, got {dim}")
    half = dim // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))  # [half/2]
    px = torch.arange(0.0, width).unsqueeze(1) * freq  # [W, half/2]
    py = torch.arange(0.0, height).unsqueeze(1) * freq  # [H, half/2]
    pe = torch.zeros(height, width, dim)
    pe[:, :, 0:half:2] = torch.sin(px).unsqueeze(0)
    pe[:, :, 1:half:2] = torch.cos(px).unsqueeze(0)
    pe[:, :, half::2] = torch.sin(py).unsqueeze(1)
    pe[:, :, half + 1::2] = torch.cos(py).unsqueeze(1)
    return pe.reshape(height * width, dim)


class GALayer(nn.Module):
    """Pre-norm decoder layer: pixel self-attention (2-D position on q, k), cross-attention to the words (1-D
    position on keys, padded words masked), FFN with an inner LayerNorm. Every branch output is normalised again
    before its residual add."""

    def __init__(self, dim=512, heads=8, ffn_dim=512, dropout=0.1):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.multihead_attn = MultiheadAttention(dim, heads, dropout)
        # ReLU not in place (the authors': in place): a Linear's 3-D output is a view, and an in-place op on a view
        # makes autograd copy the whole tensor in backward
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.LayerNorm(ffn_dim), nn.Linear(ffn_dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        """vis [B, HW, D], txt [B, L, D], vis_pos [HW, D], txt_pos [L, D], pad_mask [B, L] -> [B, HW, D]"""
        p = self.dropout if self.training else 0.0
        x = self.norm1(vis)
        q = x + vis_pos
        vis = vis + F.dropout(self.self_attn_norm(self.self_attn(q, q, x)), p)
        x = self.norm2(vis)
        x = self.multihead_attn(x + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask)
        vis = vis + F.dropout(self.cross_attn_norm(x), p)
        return vis + F.dropout(self.ffn(self.norm3(vis)), p)


class GA(nn.Module):
    """Global alignment: a stack of GALayers and a final LayerNorm. The position encodings are the authors'
    float32 values (also under AMP), computed once for a grid x grid map and up to word_len words; other map
    sizes get theirs computed on the fly."""

    def __init__(self, num_layers=3, dim=512, heads=8, ffn_dim=512, dropout=0.1, grid=26, word_len=17):
        super().__init__()
        self.layers = nn.ModuleList([GALayer(dim, heads, ffn_dim, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("vis_pos", sine_pos_2d(dim, grid, grid), persistent=False)
        self.register_buffer("txt_pos", sine_pos_1d(dim, word_len), persistent=False)

    def forward(self, vis, txt, pad_mask):
        """vis: F_v [B, C, H, W], txt: the words f_t [B, L, C], pad_mask [B, L] (True at padding) -> [B, C, H, W]"""
        B, C, H, W = vis.shape
        vis_pos = self.vis_pos if self.vis_pos.shape[0] == H * W else sine_pos_2d(C, H, W).to(self.vis_pos)
        txt_pos = self.txt_pos[:txt.shape[1]]
        x = vis.flatten(2).transpose(1, 2)  # [B, HW, C]
        for layer in self.layers:
            x = layer(x, txt, vis_pos, txt_pos, pad_mask)
        return flat_to_map(self.norm(x), H, W)  # F_c [B, C, H, W]


class Projector(nn.Module):
    """Stride 16 -> 4 pixel features (two bilinear x2 + conv steps, 1x1 conv to dim channels) and a per-sample
    dynamic 3x3 conv whose kernel and bias come from the sentence vector."""

    def __init__(self, sentence_dim, dim=256, kernel_size=3):
        super().__init__()
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(dim * 2, dim * 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(dim * 2, dim, 3, padding=1),
            nn.Conv2d(dim, dim, 1))
        self.txt = nn.Linear(sentence_dim, dim * kernel_size * kernel_size + 1)

    def forward(self, x, sentence):  # x: F_c [B, 2*dim, h, w], sentence: f_s [B, E] -> logits [B, 1, 4h, 4w]
        # channels-last through the upsampling and convs: on the CPU, bilinear upsampling of an NCHW map goes through
        # a slow layout copy, and these convs run ~1.5x faster channels-last (equal to 1e-12 in float64, tested)
        x = self.vis(x.contiguous(memory_format=torch.channels_last)).contiguous()  # Z_c [B, dim, 4h, 4w]
        B, C, H, W = x.shape
        kernel = self.txt(sentence)  # Z_t, the text as a kernel and a bias: [B, dim*k*k + 1]
        weight = kernel[:, :-1].reshape(B * C, 1, self.kernel_size, self.kernel_size)
        # sample b's pixels meet sample b's kernel only: the authors' grouped conv (one group per sample), computed
        # channel by channel (a depthwise conv) and summed over channels, which is the same sum in another order
        # and 10x faster on the CPU, where oneDNN is slow at one output channel per group
        out = F.conv2d(x.reshape(1, B * C, H, W), weight, padding=self.kernel_size // 2, groups=B * C)
        return out.reshape(B, C, H, W).sum(1, keepdim=True) + kernel[:, -1, None, None, None]  # [B, 1, H, W]
