"""
The frozen CLIP image and text encoders of ETRIS (paper Sec. 3.1, the two columns of Fig. 2), with the CRIS/ETRIS
modifications, built from OpenAI's weights. Downloading and caching those weights is clip_loader.py's job.

Both encoders run in three stages, so that the Bridger can exchange between them after each one: the text
transformer and the ViT in thirds of their blocks, the ResNet as layer2, layer3, layer4.

Parameter names are exactly OpenAI's (clip/model.py), so OpenAI's archives and the `backbone.*` tensors of the
authors' checkpoints load with strict=True. Differences from OpenAI's code, all taken from the ETRIS/CRIS code:
- ViT: the visual positional embedding is bicubically resized once, at build time, from the weights' grid
  (14x14 for ViT-B/16) to (input_size / patch)^2, keeping the class row.
- ModifiedResNet: the attention pool does not pool. It drops the class row of its 7x7(+1) positional embedding,
  resizes the grid bicubically to the feature map at every forward, attends over the h*w tokens only, and returns
  a spatial map [B, out_dim, h, w] plus a residual branch `connect` (1x1 conv + BN, not in CLIP's weights,
  randomly initialised), then ReLU.
- The text encoder returns every word's feature (ln_final, not projected) and the sentence vector (the end
  token's feature, projected).
Everything is batch first ([B, L, D]) and fp32.
"""
import contextlib
import functools
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layers import MultiheadAttention, flat_to_map, multihead_attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32 (as OpenAI's, so that half-precision inputs stay stable; fp64 stays)."""

    def forward(self, x):
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block; causal when given the causal mask (text), full attention otherwise (ViT)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x, attn_mask=None):  # [B, L, D]
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def third(self, i):
        """The blocks of stage i: the Bridger taps after every third of the encoder."""
        n = len(self.resblocks) // 3
        return self.resblocks[n * i: n * (i + 1)]


@contextlib.contextmanager
def _buffers_kept(module):
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:  # also when the recomputation is stopped early, which it is by an exception
        for b, value in saved:
            b.copy_(value)


def run_blocks(blocks, x, grad_checkpointing, *args):
    """x through blocks (each called as block(x, *args)). With grad_checkpointing, each block's activations are
    recomputed in backward instead of kept (less memory, same numbers)."""
    for block in blocks:
        if not (grad_checkpointing and torch.is_grad_enabled()):
            x = block(x, *args)
        elif torch.compiler.is_compiling() and next(block.buffers(), None) is None:
            x = checkpoint(block, x, *args, use_reentrant=False)  # a block without state: traced as it is
        else:
            x = _checkpoint_keeping_buffers(block, x, *args)
    return x


@torch.compiler.disable  # dynamo cannot trace the context_fn, so this runs eagerly inside a compiled model too
def _checkpoint_keeping_buffers(block, x, *args):
    """A checkpointed block whose train-mode BatchNorms must not update their running statistics a second time when
    backward recomputes them: its buffers are put back after the recomputation. (Under torch.compile, AOTAutograd
    applies such updates again in the recomputation up to torch 2.7 at least; measured.)"""
    keep = functools.partial(_buffers_kept, block)
    return checkpoint(block, x, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), keep()))


# ----------------------------------------------------------------------------------------------
# image encoders: embed, then stage(0..2), with the Bridger's residual added after each stage

class VisionTransformer(nn.Module):
    def __init__(self, grid, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.grid, self.patch_size, self.width, self.output_dim = grid, patch_size, width, output_dim
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images):  # [B, 3, S, S] -> tokens [B, 1 + g*g, width]
        size = self.grid * self.patch_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"ViT was built for {size}x{size} images (positional embedding "
                             f"{self.grid}x{self.grid}), got {tuple(images.shape[-2:])}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, g*g, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def blocks(self, i):  # stage i's blocks
        return self.transformer.third(i)

    def stage(self, i, x):
        return run_blocks(self.blocks(i), x, self.grad_checkpointing)

    def feature_map(self, x):  # tokens -> a copy of the patch tokens as a map [B, width, g, g]
        return flat_to_map(x[:, 1:], self.grid, self.grid)

    def add_residual(self, x, x_map, residual):
        """The Bridger's residual [B, width, g, g] added to the patch tokens (the class token is left as it is) and
        to their map."""
        return x + F.pad(residual.flatten(2).transpose(1, 2), (0, 0, 1, 0)), x_map + residual

    def output_map(self, x):  # the patch tokens in CLIP's embedding space: [B, output_dim, g, g]
        return flat_to_map(self.ln_post(x[:, 1:]) @ self.proj, self.grid, self.grid)


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
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.connect = nn.Sequential(nn.Conv2d(embed_dim, output_dim, 1, bias=False), nn.BatchNorm2d(output_dim))

    def forward(self, x):  # [B, C, h, w] -> [B, out, h, w]
        B, C, h, w = x.shape
        s = self.spacial_dim
        res = self.connect(x)
        pos = self.positional_embedding[1:].t().reshape(1, C, s, s)  # class row dropped
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)  # [B, hw, C]
        x = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return F.relu(flat_to_map(self.c_proj(x), h, w) + res)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with avgpool, anti-aliased strides, attention pool."""

    def __init__(self, layers, output_dim, heads, spacial_dim=7, width=64):
        super().__init__()
        self.width, self.output_dim = width, output_dim
        self.grad_checkpointing = False
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

    def embed(self, images):  # stem and layer1: [B, 3, S, S] -> [B, 4 * width, S/4, S/4]
        x = images
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        return self.layer1(self.avgpool(x))

    def blocks(self, i):  # layer2, layer3, layer4: strides 8, 16, 32
        return [(self.layer2, self.layer3, self.layer4)[i]]

    def stage(self, i, x):
        return run_blocks(self.blocks(i), x, self.grad_checkpointing)

    def feature_map(self, x):
        return x

    def add_residual(self, x, x_map, residual):  # x is its own map
        x = x + residual
        return x, x

    def output_map(self, x):  # [B, output_dim, S/32, S/32]
        return self.attnpool(x)


# ----------------------------------------------------------------------------------------------
# CLIP: the image encoder (`visual`) and the text encoder (the other top-level modules, OpenAI's layout)

class CLIP(nn.Module):
    def __init__(self, embed_dim, vision_layers, vision_width, vision_patch_size, vision_grid,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.embed_dim = embed_dim
        self.grad_checkpointing = False  # of the text blocks; the image encoder has its own flag
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=vision_width * 32 // 64,
                                         spacial_dim=vision_grid, width=vision_width)
        else:
            self.visual = VisionTransformer(vision_grid, vision_patch_size, vision_width,
                                            vision_layers, max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        # token i sees tokens 0..i; a buffer, so that it moves with the model, and not saved (OpenAI's has none)
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (for the small random CLIPs of tests and the demo; real weights overwrite it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for layer in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
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
        return self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]

    def text_stage(self, i, x):  # [B, L, D]
        L = x.shape[1]
        return run_blocks(self.transformer.third(i), x, self.grad_checkpointing, self.attn_mask[:L, :L])

    def text_output(self, x, tokens):
        """-> word features [B, L, D] (ln_final, not projected) and the sentence vector [B, embed_dim]: the end
        token's feature (the end token has the largest id, so argmax finds it), projected."""
        words = self.ln_final(x)  # f_t
        end = tokens.argmax(dim=-1)
        sentence = words[torch.arange(words.shape[0], device=words.device), end] @ self.text_projection  # f_s
        return words, sentence


# ----------------------------------------------------------------------------------------------
# building from a state dict

# scalar attributes stored in OpenAI's TorchScript archives; not weights
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def clip_config(state_dict):
    """CLIP constructor arguments read from the shapes of an OpenAI-style state dict, the way OpenAI's
    build_model does. `vision_grid` is the grid the weights were trained at (ViT patches per side, ResNet
    attnpool side). Raises ValueError if the dict is not CLIP's."""
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
        raise ValueError(f"not a CLIP state dict: missing {missing} (first keys: {list(sd)[:5]})")
    if vit:
        vision_width = sd["visual.conv1.weight"].shape[0]
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
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
    """ViT positional embedding [1 + g*g, D] -> [1 + grid*grid, D]: the class row is kept, the grid part resized
    bicubically (align_corners=False), as the authors' adapt_position_encoding."""
    g = round((pos.shape[0] - 1) ** 0.5)
    spatial = pos[1:].reshape(g, g, -1).permute(2, 0, 1).unsqueeze(0)  # [1, D, g, g]
    spatial = F.interpolate(spatial, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], spatial[0].flatten(1).t()], dim=0)


def check_image_size(input_size, vision_patch_size):
    """A ViT takes a multiple of its patch size; a ResNet a multiple of 32, its last stage's stride (the Bridger and
    HA zoom layer4 up to layer3's stride 16, which must give layer3's size)."""
    step = vision_patch_size or 32
    what = f"the ViT patch size {step}" if vision_patch_size else "32, the ResNet's stride"
    if input_size < step or input_size % step:
        raise ValueError(f"input size {input_size} is not a multiple of {what}")


def build_clip(state_dict, input_size):
    """CLIP (fp32) with the architecture and weights of `state_dict` (OpenAI key names) and, for a ViT, a
    positional embedding for input_size images. `visual.attnpool.connect` (ResNet only) is not in CLIP weights
    and keeps PyTorch's default init; ETRIS checkpoints carry it."""
    cfg = clip_config(state_dict)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    check_image_size(input_size, cfg["vision_patch_size"])
    if cfg["vision_patch_size"] is not None:
        patch = cfg["vision_patch_size"]
        if input_size // patch != cfg["vision_grid"]:
            sd["visual.positional_embedding"] = resize_pos_embed(sd["visual.positional_embedding"],
                                                                 input_size // patch)
        cfg["vision_grid"] = input_size // patch
    model = CLIP(**cfg)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"not a consistent CLIP state dict: {e}") from e
    missing = [k for k in missing if not k.startswith("visual.attnpool.connect.")]
    if missing or unexpected:
        raise ValueError(f"not a CLIP state dict: missing keys {missing}, unexpected keys {unexpected}")
    return model
