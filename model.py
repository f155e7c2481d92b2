"""
ETRIS (Xu et al., ICCV 2023), Fig. 2: the frozen CLIP image and text encoders (`backbone`) advance side by side,
one stage at a time, and the trainable Bridger (`bridger`) exchanges between them after each stage; then the
hierarchical alignment neck HA (`neck`), the global alignment decoder GA (`decoder`) and the Projector (`proj`)
turn the three visual maps, the words and the sentence into mask logits at stride 4. Only the Bridger, the decoder
side and CLIP's positional embeddings are trained. Module and parameter names are the authors', so their released
checkpoints load strictly.

    from model import build_model
    net = build_model("ViT-B/16", input_size=416, word_len=17)   # OpenAI's ViT-B/16 weights, from the cache
    logits = net(images, tokens)                                 # [B, 3, 416, 416], [B, 17] -> [B, 1, 104, 104]
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch.nn as nn

from bridger import Bridger
from clip import build_clip
from clip_loader import backbone_state_dict, check_backbone
from decoder import GA, HA, Projector
from errors import UserError


@dataclass
class ETRISConfig:
    """Every hyper-parameter of an ETRIS model. Saved with our checkpoints, it rebuilds the model from them (with
    the CLIP weights it names). The defaults are the paper's ViT-B/16 model; build_model reads the widths from
    the CLIP weights."""
    backbone: str = "ViT-B/16"            # one of clip_loader.BACKBONES
    clip_weights: Optional[str] = None    # the CLIP weights file; None: OpenAI's, found by backbone name
    input_size: int = 416
    word_len: int = 17                    # tokens per sentence: 17 for RefCOCO/+, 22 for G-Ref
    # read from the CLIP weights
    vision_dims: tuple = (768, 768, 768)  # visual channels after the image encoder's three stages
    text_dim: int = 512                   # text width: the word features, and the width of GA
    embed_dim: int = 512                  # CLIP's joint space: the sentence vector and the last visual map
    bridger_heads: int = 8                # 8 for ViT, 4 for ResNet (the authors')
    zoom_strides: tuple = (1, 1, 1)       # ViT 1,1,1; ResNet 2,1,2, so that every stage fuses at stride 16
    # Bridger
    bridger_dim: int = 64                 # d, the Bridger's width
    bridger_stages: tuple = (0, 1, 2)     # the stages with a bridge; () gives plain CLIP features (ablation)
    zoom: str = "conv"                    # the paper's zoom layers; 'linear' | 'mlp' are ablations
    bridger_dropout: float = 0.1          # in the ResNet Bridger's interactors (hard-coded by the authors)
    # GA
    ga_layers: int = 3
    ga_heads: int = 8
    ga_ffn_dim: int = 512
    ga_dropout: float = 0.1
    frozen_bn_stats: bool = False         # keep the frozen ResNet's BN statistics (the authors let them move)

    def __post_init__(self):
        self.vision_dims, self.zoom_strides = tuple(self.vision_dims), tuple(self.zoom_strides)
        self.bridger_stages = tuple(sorted(set(self.bridger_stages)))


def widths_from_clip(state_dict):
    """The ETRISConfig fields that CLIP's weights decide. For the paper's backbones this gives the authors' configs
    (ViT-B/16: fpn_in 768,768,512; RN50: 512,1024,1024; RN101: 512,1024,512)."""
    sd = state_dict
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        vision_dims, heads, strides = (width,) * 3, 8, (1, 1, 1)
        blocks = {"image": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})}
    else:
        vision_dims = tuple(sd[f"visual.layer{i}.0.conv3.weight"].shape[0] for i in (2, 3, 4))
        heads, strides, blocks = 4, (2, 1, 2), {}  # layer2 (stride 8) zooms down, layer4 (stride 32) up
    blocks["text"] = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for name, n in blocks.items():
        if n < 3 or n % 3:
            raise ValueError(f"the Bridger taps the CLIP {name} encoder after every third of its blocks, so it "
                             f"needs a multiple of 3 blocks; these weights have {n}")
    return dict(vision_dims=vision_dims, text_dim=sd["ln_final.weight"].shape[0],
                embed_dim=sd["text_projection"].shape[1], bridger_heads=heads, zoom_strides=strides)


class ETRIS(nn.Module):
    """images [B, 3, S, S] + tokens [B, L] (L <= word_len, 0 = padding) -> mask logits [B, 1, S/4, S/4]."""

    def __init__(self, config, clip):
        super().__init__()
        c = self.config = config
        self.backbone = clip
        for name, p in clip.named_parameters():
            p.requires_grad_("positional_embedding" in name)  # the authors train CLIP's position embeddings
        self.bridger = Bridger("ViT" in c.backbone, c.vision_dims, c.text_dim, c.bridger_dim, c.bridger_heads,
                               c.zoom_strides, c.bridger_stages, c.zoom, c.bridger_dropout)
        fpn_in = (c.vision_dims[0], c.vision_dims[1], c.embed_dim)
        self.neck = HA(fpn_in, c.embed_dim, dim=c.text_dim, strides=c.zoom_strides)
        self.decoder = GA(c.ga_layers, c.text_dim, c.ga_heads, c.ga_ffn_dim, c.ga_dropout,
                          grid=c.input_size // 16, word_len=c.word_len)
        self.proj = Projector(c.embed_dim, c.text_dim // 2)
        self.train()  # puts the backbone BNs in the mode frozen_bn_stats asks for

    def forward(self, images, tokens, image_index=None):
        """image_index [B] (optional, for evaluating several sentences per image): images is then [N, 3, S, S] and
        sentence b is segmented in images[image_index[b]]; the same logits as repeating the images, with the
        first stage of the image encoder, which has not met the text yet, run once per image."""
        self.check_inputs(tokens, image_index)
        clip = self.backbone
        vis = clip.visual.embed(images)  # ViT: tokens [N, 1 + hw, C]; ResNet: [N, C, S/4, S/4]
        txt = clip.embed_text(tokens)  # [B, L, Dt]
        maps, fused = [], None
        for i in range(3):  # each encoder's thirds (ResNet: layer2, layer3, layer4)
            vis = clip.visual.stage(i, vis)
            txt = clip.text_stage(i, txt)
            if i == 0 and image_index is not None:
                vis = vis[image_index]  # one row per sentence from here on
            vis_map = clip.visual.feature_map(vis)  # [B, C_i, h_i, w_i]
            if i in self.bridger.stages:  # the two streams exchange through the Bridger
                dv, dt, fused = self.bridger(i, vis_map, txt, fused)
                vis, vis_map = clip.visual.add_residual(vis, vis_map, dv)
                txt = txt + dt
            if i < 2:
                maps.append(vis_map)
        maps.append(clip.visual.output_map(vis))  # [B, E, h, w], in CLIP's joint space
        words, sentence = clip.text_output(txt, tokens)  # [B, L, Dt], [B, E]
        x = self.neck(maps, sentence)  # HA: [B, Dt, S/16, S/16]
        x = self.decoder(x, words, tokens == 0)  # GA, padded words masked
        return self.proj(x, sentence)  # Projector: [B, 1, S/4, S/4]

    def check_inputs(self, tokens, image_index):
        if tokens.dim() != 2 or tokens.shape[1] > self.config.word_len:
            raise ValueError(f"tokens must be [B, L] with L <= word_len={self.config.word_len}, got "
                             f"{tuple(tokens.shape)}: tokenize with context_length=word_len")
        if image_index is not None and image_index.shape != tokens.shape[:1]:
            raise ValueError(f"image_index must have one entry per token row ({tokens.shape[0]}), "
                             f"got shape {tuple(image_index.shape)}")

    def train(self, mode=True):
        # like the authors', the frozen ResNet's BatchNorms follow the train/eval mode (their running statistics
        # move during training); frozen_bn_stats keeps them in eval mode instead
        super().train(mode)
        if self.config.frozen_bn_stats:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_grad_checkpointing(self, enabled=True):
        """Recompute the frozen CLIP blocks' activations in backward instead of keeping them: less memory, the
        same numbers (BN statistics included)."""
        self.backbone.grad_checkpointing = self.backbone.visual.grad_checkpointing = enabled
        return self


# the ETRISConfig fields that the CLIP weights decide (widths_from_clip); never set by hand
CLIP_DECIDED = ("vision_dims", "text_dim", "embed_dim", "bridger_heads", "zoom_strides")


def build_model(backbone="ViT-B/16", clip_weights=None, input_size=416, word_len=17, **options):
    """ETRIS on a CLIP backbone. backbone: one of clip_loader.BACKBONES ('tiny-*' are small random CLIPs for tests).
    clip_weights: None (OpenAI's file for the name, from the cache), a path, or a state dict. options: the other
    ETRISConfig fields (bridger_dim, bridger_stages, zoom, ...), except CLIP_DECIDED."""
    check_backbone(backbone)
    if set(options) & set(CLIP_DECIDED):
        raise UserError(f"{sorted(set(options) & set(CLIP_DECIDED))} are read from the CLIP weights, not set")
    sd = clip_weights if isinstance(clip_weights, dict) else backbone_state_dict(backbone, clip_weights)
    if ("visual.proj" in sd) != ("ViT" in backbone):
        raise UserError(f"backbone {backbone!r} is a {'ViT' if 'ViT' in backbone else 'ResNet'} but the CLIP weights "
                         f"given are a {'ViT' if 'visual.proj' in sd else 'ResNet'}: pass matching weights")
    if not 0 < word_len <= sd["positional_embedding"].shape[0]:
        raise UserError(f"word_len must be in 1..{sd['positional_embedding'].shape[0]}, got {word_len}")
    path = None if clip_weights is None or isinstance(clip_weights, dict) else str(clip_weights)
    try:
        config = ETRISConfig(backbone=backbone, clip_weights=path, input_size=input_size, word_len=word_len,
                             **widths_from_clip(sd), **options)
        return ETRIS(config, build_clip(sd, input_size))
    except ValueError as e:  # an option these weights cannot be built with
        raise UserError(str(e)) from None


def model_from_config(config, clip_weights=None):
    """ETRIS rebuilt from a saved ETRISConfig (as a dict); clip_weights replaces the CLIP file it names."""
    saved = ETRISConfig(**config)
    chosen = {f.name: getattr(saved, f.name) for f in fields(ETRISConfig) if f.name not in CLIP_DECIDED}
    if clip_weights is not None:
        chosen["clip_weights"] = clip_weights
    net = build_model(**chosen)
    got, want = ({k: getattr(c, k) for k in CLIP_DECIDED} for c in (net.config, saved))
    if got != want:
        raise UserError(f"the CLIP weights {net.config.clip_weights or net.config.backbone} give widths {got}, "
                         f"but the model was trained with {want}: pass the CLIP weights it was trained with")
    return net


def parameter_counts(net):
    """Parameter counts; updated_backbone_pct is the Bridger's size as a percentage of the CLIP backbone's (the
    paper's "updated backbone parameters": the authors count the Bridger as the backbone update)."""
    def count(params):
        return sum(p.numel() for p in params)
    total = count(net.parameters())
    trainable = count(p for p in net.parameters() if p.requires_grad)
    bridger = count(net.bridger.parameters())
    decoder = count(net.neck.parameters()) + count(net.decoder.parameters()) + count(net.proj.parameters())
    return dict(total=total, frozen=total - trainable, trainable=trainable, bridger=bridger, decoder=decoder,
                updated_backbone_pct=100.0 * bridger / count(net.backbone.parameters()))


def format_parameter_counts(counts):
    return (f"parameters: total {counts['total']:,} | frozen {counts['frozen']:,} | trainable {counts['trainable']:,}\n"
            f"  bridger {counts['bridger']:,} ({counts['updated_backbone_pct']:.2f}% of the backbone) | "
            f"decoder (neck + GA + projector) {counts['decoder']:,}")
