"""Frozen CLIP image and text encoders: the backbone of ETRIS (paper Sec. 3.1, Fig. 2), with
the CRIS/ETRIS modifications, plus loading of OpenAI's released weights.

Parameter and buffer names are exactly OpenAI's (clip/model.py), so OpenAI archives and the
ETRIS checkpoints' `backbone.*` tensors load with strict=True. Differences from OpenAI's code,
all taken from the ETRIS/CRIS code:
- ViT: the visual positional embedding is bicubically resized once at build time from the
  weights' grid (14x14 for ViT-B/16) to (input_size / patch)^2, keeping the class row.
- ModifiedResNet: the attention pool does not pool. It drops the class row of its 7x7(+1)
  positional embedding, resizes the grid bicubically to the feature map at every forward,
  attends over the h*w tokens only, and returns a spatial map [B, out_dim, h, w] plus a residual
  branch `connect` (1x1 conv + BN, not in CLIP's weights, randomly initialised), then ReLU.
- The text transformer's causal mask is built for word_len tokens and cut to the actual length.
Everything is batch-first ([B, L, D]) and fp32; attention uses F.scaled_dot_product_attention.
"""
import hashlib
import math
import os
import tempfile
import urllib.request
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# OpenAI's release; the SHA-256 of each file is the path component before its name.
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
_ALIASES = {"ViT-B-16": "ViT-B/16"}
# scalar attributes stored in OpenAI's TorchScript archives; not weights
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------------------------
# building blocks

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (as OpenAI's, so half-precision inputs stay stable)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def multihead_attention(q, k, v, n_head, attn_mask=None, dropout_p=0.0):
    """Scaled dot-product attention over already projected q [B, Lq, D], k, v [B, Lk, D]."""
    B, Lq, D = q.shape
    q, k, v = (t.reshape(B, t.shape[1], n_head, D // n_head).transpose(1, 2) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [B, h, Lq, D/h]
    return x.transpose(1, 2).reshape(B, Lq, D)


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters (packed in_proj_weight/in_proj_bias, out_proj) and init, batch
    first. CLIP's blocks use it for self-attention; the Bridger and the decoder give it a separate key and
    value. Dropout acts on the attention weights, as torch's."""

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
        """query [B, Lq, D]; key, value [B, Lk, D] (None: self-attention, one packed projection);
        attn_mask [Lq, Lk] additive, or key_padding_mask [B, Lk] bool with True = ignore."""
        if key is None:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = (F.linear(x, w, b) for x, w, b in
                       zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)))
        if key_padding_mask is not None:
            if attn_mask is not None:
                raise ValueError("give attn_mask or key_padding_mask, not both")
            attn_mask = ~key_padding_mask[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        return self.out_proj(multihead_attention(q, k, v, self.heads, attn_mask, dropout_p))


def causal_mask(n):
    """Additive mask [n, n]: token i sees tokens 0..i."""
    return torch.full((n, n), float("-inf")).triu_(1)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block; causal when given a mask (text), full attention otherwise."""

    def __init__(self, d_model, n_head, attn_mask=None):
        super().__init__()
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        # a plain attribute, not a buffer, so it is in no state dict or buffer list (as OpenAI)
        self.attn_mask = attn_mask

    def forward(self, x):  # [B, L, D]
        mask = None
        if self.attn_mask is not None:
            L = x.shape[1]
            if L > self.attn_mask.shape[0]:
                raise ValueError(f"text has {L} tokens but the causal mask was built for "
                                 f"word_len={self.attn_mask.shape[0]}: tokenize to word_len")
            mask = self.attn_mask[:L, :L].to(device=x.device, dtype=x.dtype)
        x = x + self.attn(self.ln_1(x), attn_mask=mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):  # [B, L, D]
        for block in self.resblocks:
            x = block(x)
        return x


# ----------------------------------------------------------------------------------------------
# image encoders

class VisionTransformer(nn.Module):
    def __init__(self, grid, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.grid, self.patch_size, self.width, self.output_dim = grid, patch_size, width, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images):
        """Token sequence entering the first block: [B, 3, H, W] -> [B, 1 + N, width]."""
        size = self.grid * self.patch_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"ViT was built for {size}x{size} images (positional embedding "
                             f"{self.grid}x{self.grid}), got {tuple(images.shape[-2:])}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, images):
        """CLIP image embedding [B, output_dim] from the class token."""
        x = self.transformer(self.embed(images))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        # anti-aliased downsampling: the stride is an avgpool after conv2, never a strided conv
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool as modified by CRIS/ETRIS: a spatial map out, no pooling."""

    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.spacial_dim, self.num_heads = spacial_dim, num_heads
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.connect = nn.Sequential(nn.Conv2d(embed_dim, output_dim, 1, bias=False),
                                     nn.BatchNorm2d(output_dim))

    def forward(self, x):  # [B, C, h, w]
        B, C, h, w = x.shape
        s = self.spacial_dim
        res = self.connect(x)  # [B, out, h, w]
        pos = self.positional_embedding[1:].t().reshape(1, C, s, s)  # class row dropped
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)  # [B, hw, C]
        x = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        x = self.c_proj(x).transpose(1, 2).reshape(B, -1, h, w).contiguous()  # [B, out, h, w], NCHW for the convs
        return F.relu(x + res)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with avgpool, anti-aliased strides, attention pool."""

    def __init__(self, layers, output_dim, heads, spacial_dim=7, width=64):
        super().__init__()
        self.width, self.output_dim = width, output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(spacial_dim, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):  # [B, 3, H, W] -> [B, width, H/4, W/4]
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        return self.avgpool(x)

    def forward(self, images):
        """Image embedding [B, output_dim]: the mean of the attnpool map, since the modified
        attention pool has no class token to read (a stand-in for OpenAI's pooled output)."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(images)))))
        return self.attnpool(x).mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# CLIP

class CLIP(nn.Module):
    def __init__(self, embed_dim, vision_layers, vision_width, vision_patch_size, vision_grid,
                 context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers, word_len):
        super().__init__()
        if not 0 < word_len <= context_length:
            raise ValueError(f"word_len must be in 1..{context_length}, got {word_len}")
        self.word_len, self.embed_dim = word_len, embed_dim
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=vision_width * 32 // 64,
                                         spacial_dim=vision_grid, width=vision_width)
        else:
            self.visual = VisionTransformer(vision_grid, vision_patch_size, vision_width,
                                            vision_layers, max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       attn_mask=causal_mask(word_len))
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (used for the tiny demo CLIP; real weights overwrite it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for layer in (self.visual.layer1, self.visual.layer2, self.visual.layer3,
                          self.visual.layer4):
                for name, param in layer.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)  # each residual block starts as identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def embed_text(self, tokens):  # [B, L] -> [B, L, D]
        L = tokens.shape[1]
        return self.token_embedding(tokens) + self.positional_embedding[:L]

    def encode_text(self, tokens):
        """Sentence embedding [B, embed_dim]: the end token (largest id) of ln_final's output."""
        x = self.ln_final(self.transformer(self.embed_text(tokens)))  # [B, L, D]
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection

    def encode_image(self, images):  # [B, 3, H, W] -> [B, embed_dim]
        return self.visual(images)

    def forward(self, images, tokens):
        """Contrastive logits (logits_per_image [B_img, B_txt], logits_per_text), as OpenAI's."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------
# building from a state dict

def clip_config(state_dict):
    """CLIP constructor arguments (all but word_len) read from the shapes of an OpenAI-style
    state dict, the way OpenAI's build_model does. `vision_grid` is the grid the weights were
    trained at (ViT patches per side, ResNet attnpool side). Raises ValueError if not CLIP."""
    sd = state_dict
    if not isinstance(sd, dict):
        raise ValueError(f"not a CLIP state dict: expected a dict, got {type(sd).__name__}")
    vit = "visual.proj" in sd
    need = ["text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
            "transformer.resblocks.0.attn.in_proj_weight"]
    need += (["visual.conv1.weight", "visual.positional_embedding"] if vit else
             ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a CLIP state dict: missing {missing} "
                         f"(first keys: {list(sd)[:5]})")
    if vit:
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers = len([k for k in sd
                             if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        vision_patch_size = sd["visual.conv1.weight"].shape[-1]
        n_pos = sd["visual.positional_embedding"].shape[0]
    else:
        vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                              for b in (1, 2, 3, 4))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        vision_patch_size = None
        n_pos = sd["visual.attnpool.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError(f"not a CLIP state dict: visual positional embedding has {n_pos} rows, "
                         f"not a square grid plus a class row")
    width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        vision_layers=vision_layers, vision_width=vision_width,
        vision_patch_size=vision_patch_size, vision_grid=grid,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=width, transformer_heads=max(1, width // 64),
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


def resize_pos_embed(pos, grid):
    """ViT positional embedding [1 + g*g, D] -> [1 + grid*grid, D]: the class row is kept, the
    grid part resized bicubically (align_corners=False), as the authors' adapt_position_encoding."""
    g = round((pos.shape[0] - 1) ** 0.5)
    spatial = pos[1:].reshape(g, g, -1).permute(2, 0, 1).unsqueeze(0)  # [1, D, g, g]
    spatial = F.interpolate(spatial, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], spatial[0].flatten(1).t()], dim=0)


def build_clip(state_dict, word_len, input_size):
    """CLIP (fp32) with the architecture and weights of `state_dict` (OpenAI key names), a
    causal text mask for word_len tokens, and a ViT positional embedding for input_size images.
    `visual.attnpool.connect` (ResNet only) is not in CLIP weights and keeps PyTorch's default
    init; ETRIS checkpoints carry it. Train/eval mode is left to the caller (train mode)."""
    cfg = clip_config(state_dict)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()
          if k not in _NON_WEIGHT_KEYS}
    if cfg["vision_patch_size"] is not None:
        patch = cfg["vision_patch_size"]
        if input_size % patch:
            raise ValueError(f"input_size {input_size} is not a multiple of the ViT patch size {patch}")
        if input_size // patch != cfg["vision_grid"]:
            sd["visual.positional_embedding"] = resize_pos_embed(sd["visual.positional_embedding"],
                                                                 input_size // patch)
        cfg["vision_grid"] = input_size // patch
    model = CLIP(**cfg, word_len=word_len)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"not a consistent CLIP state dict: {e}") from e
    missing = [k for k in missing if not k.startswith("visual.attnpool.connect.")]
    if missing or unexpected:
        raise ValueError(f"not a CLIP state dict: missing keys {missing}, unexpected keys {unexpected}")
    return model


def tiny_clip_state_dict(kind, seed=0):
    """A small randomly initialised CLIP state dict with OpenAI key names, for tests and the demo.
    Both kinds: text width 64, 6 blocks, 1 head (OpenAI's head width 64), context 77, vocab 49408.
    'ViT': width 64, 6 blocks, 1 head, patch 16, grid 14 (224 px), embed_dim 64.
    'RN': layers (1,1,1,1), width 16 (layer1..4 channels 64/128/256/512), attnpool 8 heads on a
    7x7 grid, embed_dim 128 (differs from the text width, like RN50)."""
    if kind not in ("ViT", "RN"):
        raise ValueError(f"tiny CLIP kind must be 'ViT' or 'RN', got {kind!r}")
    vit = kind == "ViT"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim=64 if vit else 128,
                     vision_layers=6 if vit else (1, 1, 1, 1), vision_width=64 if vit else 16,
                     vision_patch_size=16 if vit else None, vision_grid=14 if vit else 7,
                     context_length=77, vocab_size=49408, transformer_width=64,
                     transformer_heads=1, transformer_layers=6, word_len=77)
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith("visual.attnpool.connect.")}


# ----------------------------------------------------------------------------------------------
# loading OpenAI weights

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, target, sha):
    """Stream url into a temp file next to target, check its SHA-256, then rename."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha:
            raise ValueError(f"downloaded file has SHA-256 {h.hexdigest()}, expected {sha}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _cached_weights(name, cache_dir):
    url = _MODELS[name]
    sha = url.split("/")[-2]
    root = cache_dir or os.environ.get("ETRIS_CLIP_CACHE") or os.path.expanduser("~/.cache/clip")
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        got = _sha256(target)
        if got != sha:
            raise RuntimeError(
                f"{target} has SHA-256 {got}, expected {sha} for CLIP {name} (partial or wrong "
                f"file): delete it and rerun to download again, or download {url} to {target}")
        return target
    try:
        _download(url, target, sha)
    except Exception as e:
        raise RuntimeError(
            f"CLIP {name} weights are not in {root} and could not be downloaded ({e}). "
            f"Download {url} and save it as {target} (SHA-256 {sha}), or set ETRIS_CLIP_CACHE "
            f"to the folder holding it; --clip-weights PATH uses a weights file directly and "
            f"skips this lookup.") from e
    return target


def _read_state_dict(path):
    try:  # OpenAI's release: TorchScript archives with fp16 weights
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a TorchScript archive (like OpenAI's CLIP .pt "
                             f"files) nor a torch.save'd state dict: {e}") from e
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and "text_projection" not in sd and isinstance(sd.get(key), dict):
                sd = sd[key]
    try:
        clip_config(sd)
    except ValueError as e:
        raise ValueError(f"{path} does not hold CLIP weights: {e}") from e
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def load_clip_state_dict(name_or_path, cache_dir=None):
    """fp32 CLIP state dict from a name ('ViT-B/16' or 'ViT-B-16', 'RN50', 'RN101': OpenAI's
    file, found in cache_dir, default $ETRIS_CLIP_CACHE or ~/.cache/clip, or downloaded there
    and SHA-256 checked) or from a path (OpenAI TorchScript archive, or a torch.save'd dict,
    possibly nested under 'state_dict' or 'model')."""
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in _MODELS:
        return _read_state_dict(_cached_weights(name, cache_dir))
    if os.path.isfile(name_or_path):
        return _read_state_dict(name_or_path)
    valid = ", ".join(list(_MODELS) + list(_ALIASES))
    if os.sep in name_or_path or os.path.splitext(name_or_path)[1]:
        raise FileNotFoundError(f"CLIP weights file {name_or_path} not found "
                                f"(it is not a CLIP name either; names: {valid})")
    raise ValueError(f"unknown CLIP model {name_or_path!r}: valid names are {valid}, "
                     f"or give the path of a weights file")
