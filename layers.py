"""
Layers shared by the frozen CLIP encoders, the Bridger and the decoder of ETRIS (the authors keep theirs in
model/layers.py): multi-head attention, conv-BN-ReLU, and the two interactors that let one sequence read
another (paper Sec. 3.2): a gated cross-attention and a small transformer decoder layer.

Parameter names are the authors' (torch's nn.MultiheadAttention / nn.TransformerDecoderLayer names), so their
checkpoints load strictly. Everything is batch first: sequences [B, L, D], maps [B, C, H, W].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def multihead_attention(q, k, v, heads, attn_mask=None, dropout_p=0.0):
    """Scaled dot-product attention over already projected q [B, Lq, D], k, v [B, Lk, D] -> [B, Lq, D]."""
    B, Lq, D = q.shape
    q, k, v = (t.reshape(B, t.shape[1], heads, D // heads).transpose(1, 2) for t in (q, k, v))  # [B, h, L, D/h]
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return x.transpose(1, 2).reshape(B, Lq, D)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed in_proj_weight / in_proj_bias, out_proj) and init, batch first,
    on F.scaled_dot_product_attention. Dropout acts on the attention weights, as torch's."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key=None, value=None, attn_mask=None, key_padding_mask=None):
        """query [B, Lq, D]; key, value [B, Lk, D] (None: self-attention through one packed projection);
        attn_mask [Lq, Lk] additive, or key_padding_mask [B, Lk] bool with True = ignore."""
        if key is None:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = (F.linear(x, w, b) for x, w, b in
                       zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)))
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        return self.out_proj(multihead_attention(q, k, v, self.heads, attn_mask, dropout_p))


def conv_bn_relu(in_dim, out_dim, kernel_size=1, padding=0, stride=1):
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


def deconv_bn_relu(in_dim, out_dim, kernel_size=1, stride=1):
    return nn.Sequential(nn.ConvTranspose2d(in_dim, out_dim, kernel_size, stride, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


def flat_to_map(x, h, w):
    """[B, h*w, C] -> [B, C, h, w], NCHW-contiguous: a transposed view would have channels-last strides and send
    the convolutions that follow down their channels-last path (about 2x slower backward on the CPU)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()


class GatedCrossAttention(nn.Module):
    """The query multiplied by what it reads from the memory (no residual add): the ViT Bridger's interactor and
    the sentence gating of HA (the authors' InteractorT)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, heads)

    def forward(self, x, memory):  # x [B, L, D], memory [B, M, D] -> [B, L, D]
        return x * self.multihead_attn(x, memory, memory)


class TransformerInteractor(nn.Module):
    """Post-norm transformer decoder layer: self-attention, cross-attention to the memory, FFN (the ResNet
    Bridger's interactor; the authors' Interactor)."""

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

    def forward(self, x, memory):  # x [B, L, D], memory [B, M, D] -> [B, L, D]
        p = self.dropout if self.training else 0.0
        x = self.norm1(x + F.dropout(self.self_attn(x, x, x), p))
        x = self.norm2(x + F.dropout(self.multihead_attn(x, memory, memory), p))
        h = self.linear2(F.dropout(F.relu(self.linear1(x)), p))
        return self.norm3(x + F.dropout(h, p))
