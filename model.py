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

    python model.py --backbone RN101     # Fig. 2 block by block: symbols, shapes, parameters (random weights)

The walk takes 12-14 s for any of the three backbones at 416 px on a 2-core CPU VM with torch 2.13.0+cpu (11-13 s
of CPU time; up to twice the wall time when the cores are shared): building the model on random weights of the
real shapes, then one forward pass.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
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
        # `decoder` is the authors' name for GA alone; the paper's task-specific decoder is HA + GA + Projector
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
        vis = clip.visual.embed(images)  # ViT: tokens [N, 1 + hw, C]; ResNet: stem and layer1, [N, C, S/4, S/4]
        txt = clip.embed_text(tokens)  # [B, L, Dt]
        maps, zoomed = [], None
        # stage i = 0, 1, 2: each encoder's thirds (ResNet: layer2, layer3, layer4). The paper's prose counts these
        # stages from 2 (F_v^2 .. F_v^4), its figure labels HA's inputs from 1 (f_v^1 .. f_v^3)
        for i in range(3):
            vis = clip.visual.stage(i, vis)
            txt = clip.text_stage(i, txt)  # F_t^{i+2}: the words after text stage i, to the Bridger [B, L, Dt]
            if i == 0 and image_index is not None:
                vis = vis[image_index]  # one row per sentence from here on
            vis_map = clip.visual.feature_map(vis)  # F_v^{i+2}: stage i's image, to the Bridger [B, C_i, h_i, w_i]
            if i in self.bridger.stages:  # the two streams exchange through the Bridger
                dv, dt, zoomed = self.bridger(i, vis_map, txt, zoomed)
                vis, vis_map = clip.visual.add_residual(vis, vis_map, dv)  # the residuals go into the next stage
                txt = txt + dt
            if i < 2:
                maps.append(vis_map)  # f_v^{i+1}, HA's input: stage i's image after the Bridger's residual
        maps.append(clip.visual.output_map(vis))  # f_v^3, HA's third: CLIP's output head on the last stage [B, E, h, w]
        words, sentence = clip.text_output(txt, tokens)  # f_t, the words [B, L, Dt]; f_s, the sentence [B, E]
        x = self.neck(maps, sentence)  # HA: F_v [B, Dt, S/16, S/16]
        x = self.decoder(x, words, tokens == 0)  # GA, padded words masked: F_c [B, Dt, S/16, S/16]
        return self.proj(x, sentence)  # Projector: mask logits [B, 1, S/4, S/4]

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
    """Parameter counts. bridger_pct is the Bridger's size as a percentage of the CLIP image encoder's: the paper's
    "1.61% to 3.38% backbone parameter updates" are its Bridger counts over the tuned image encoders of other
    methods (Table 3), which are CLIP's image encoders (docs/paper_vs_code.md)."""
    def count(params):
        return sum(p.numel() for p in params)
    total = count(net.parameters())
    trainable = count(p for p in net.parameters() if p.requires_grad)
    bridger = count(net.bridger.parameters())
    image_encoder = count(net.backbone.visual.parameters())
    decoder = count(net.neck.parameters()) + count(net.decoder.parameters()) + count(net.proj.parameters())
    return dict(total=total, frozen=total - trainable, trainable=trainable, bridger=bridger, decoder=decoder,
                image_encoder=image_encoder, bridger_pct=100.0 * bridger / image_encoder)


def format_parameter_counts(counts):
    return (f"parameters: total {counts['total']:,} | frozen {counts['frozen']:,} | trainable {counts['trainable']:,}\n"
            f"  Bridger {counts['bridger']:,} ({counts['bridger_pct']:.2f}% of the image encoder's "
            f"{counts['image_encoder']:,}) | decoder (HA + GA + Projector) {counts['decoder']:,}")


# ----------------------------------------------------------------------------------------------
# a walk through Fig. 2:  python model.py --backbone ViT-B/16 --input-size 416

def fig2_blocks(net):
    """Fig. 2's blocks in order, each a dict: block, symbol, the module whose input ("in") or output ("out") shows
    it (pick: which tensor of that input or output), and the parameters it owns (owners: modules or parameters;
    rest_of: what a module has left)."""
    clip, vis, c = net.backbone, net.backbone.visual, net.config
    vit = "ViT" in c.backbone
    rows = []

    def add(block, symbol, module=None, side="out", owners=(), rest_of=None, pick=None):
        rows.append(dict(block=block, symbol=symbol, module=module, side=side, owners=owners, rest_of=rest_of,
                         pick=pick or (lambda x: x[0] if side == "in" else x)))
    add("image encoder: patch embedding, class token, positions" if vit else "image encoder: stem and layer1", "",
        vis.blocks(0)[0], "in", rest_of=vis)
    add("text encoder: token and position embedding", "", clip.transformer.third(0)[0], "in",
        (clip.token_embedding, clip.positional_embedding))
    for i in range(3):
        stage_rows(net, i, add)
    add("image encoder: output head on stage 3, HA's 3rd input", "f_v^3", net.neck, "in",
        (vis.ln_post, vis.proj) if vit else (vis.attnpool,), pick=lambda args: args[0][2])
    add("text encoder: words (ln_final)", "f_t", clip.ln_final, owners=(clip.ln_final,))
    add("text encoder: sentence (end token, projected)", "f_s", net.neck.txt_proj, "in", (clip.text_projection,))
    ha = net.neck
    add("HA: levels gated by f_s, concatenated, 1x1 conv", "F_m", ha.aggr, owners=(
        ha.f3_proj, ha.f4_proj, ha.f5_proj, ha.fusion3, ha.fusion4, ha.fusion5, ha.txt_proj, ha.aggr))
    add("HA: x, y coordinates, appended to F_m", "F_coord", ha.coordconv[0].conv1, "in",
        pick=lambda args: args[0][:, -2:])
    add("HA: 3x3 conv (CoordConv), 3x3 conv", "F_v", ha, owners=(ha.coordconv,))
    add("GA reads the words (Fig. 2 draws f_s)", "f_t", net.decoder, "in", pick=lambda args: args[1])
    add("GA: global alignment (`decoder`)", "F_c", net.decoder, owners=(net.decoder,))
    add("Projector: pixel features", "Z_c", net.proj.vis, owners=(net.proj.vis,))
    add("Projector: text kernel and bias", "Z_t", net.proj.txt, owners=(net.proj.txt,))
    add("Projector: mask logits", "", net.proj)
    add("CLIP's logit_scale, which ETRIS does not use", "", owners=(clip.logit_scale,))
    return rows


def stage_rows(net, i, add):
    """Stage i's rows of fig2_blocks: both encoders' blocks, the Bridger, and the map HA reads."""
    bridger, vis, s = net.bridger, net.backbone.visual, str(i)
    text_blocks, n = net.backbone.transformer.third(i), len(vis.blocks(i))
    t0 = i * len(text_blocks)
    where = f"layer{i + 2}" if "ViT" not in net.config.backbone else f"blocks {i * n + 1}-{i * n + n}"
    bridged = i in bridger.stages
    add(f"stage {i + 1}: image encoder {where}", f"F_v^{i + 2}", bridger.zoom_in[s] if bridged else
        vis.blocks(i)[-1], "in" if bridged else "out", vis.blocks(i))
    add(f"stage {i + 1}: text encoder blocks {t0 + 1}-{t0 + len(text_blocks)}", f"F_t^{i + 2}", text_blocks[-1],
        owners=text_blocks)
    if bridged:  # from the second bridged stage on, a LayerNorm of this stage's + the previous zoomed-in pair
        norms = [(m[str(i - 1)],) if str(i - 1) in m else () for m in (bridger.ln_v, bridger.ln_t)]
        link = " (+ stage link)" if norms[0] else ""
        add(f"  Bridger ZL_in: image into width d{link}", f"hat F_v^{i + 2}", bridger.zoom_in[s],
            owners=(bridger.zoom_in[s], *norms[0]))
        add(f"  Bridger: words into width d{link}", "", bridger.linear1[s], owners=(bridger.linear1[s], *norms[1]))
        add("  Bridger ITA: image reads words", "", bridger.fusion_v[s], owners=(bridger.fusion_v[s],))
        add("  Bridger ITA: words read image", "", bridger.fusion_t[s], owners=(bridger.fusion_t[s],))
        add("  Bridger ZL_out: residual into the image", "", bridger.zoom_out[s], owners=(bridger.zoom_out[s],))
        add("  Bridger: residual into the words", "", bridger.linear2[s], owners=(bridger.linear2[s],))
    if i < 2:
        add(f"stage {i + 1}: image{' + residual' if bridged else ''}, HA's {('1st', '2nd')[i]} input",
            f"f_v^{i + 1}", net.neck, "in", pick=lambda args: args[0][i])


def shape_walk(net, sentence="the man on the left", image=None):
    """Fig. 2 block by block, for one image (default: seeded noise) and `sentence`: a list of dicts (block, symbol,
    shape, tensor, trainable, frozen). Each tensor is recorded by a hook on the model's own module during one
    forward pass; each parameter is counted in exactly one block."""
    from tokenizer import tokenize
    rows, c = fig2_blocks(net), net.config

    def params(owners):
        return [p for o in owners for p in ([o] if isinstance(o, nn.Parameter) else o.parameters())]
    claimed = {id(p) for r in rows for p in params(r["owners"])}
    hooks, seen = [], {}
    for k, r in enumerate(rows):
        if r["rest_of"] is not None:
            r["owners"] = [p for p in r["rest_of"].parameters() if id(p) not in claimed]
            claimed |= {id(p) for p in r["owners"]}
        ps = params(r["owners"])
        r["trainable"] = sum(p.numel() for p in ps if p.requires_grad)
        r["frozen"] = sum(p.numel() for p in ps if not p.requires_grad)

        def record(x, k=k, pick=r["pick"]):  # returns None: a hook's return value would replace the module's input
            seen.setdefault(k, pick(x).detach().clone())
        if r["module"] is not None and r["side"] == "in":
            hooks.append(r["module"].register_forward_pre_hook(lambda m, args, record=record: record(args)))
        elif r["module"] is not None:
            hooks.append(r["module"].register_forward_hook(lambda m, args, out, record=record: record(out)))
    if image is None:
        image = torch.randn(1, 3, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(image, tokenize(sentence, c.word_len, truncate=True))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return [dict(block=r["block"], symbol=r["symbol"], tensor=seen.get(k), trainable=r["trainable"],
                 shape=None if k not in seen else tuple(seen[k].shape), frozen=r["frozen"])
            for k, r in enumerate(rows)]


WALK_NOTES = """
F_v^k, F_t^k: the image and the words after stage k-1, before the Bridger, as the paper's prose counts stages (from
2). f_v^1..f_v^3: HA's inputs as Fig. 2 labels them, after the Bridger's residual (f_v^3: CLIP's output head on
stage 3). Rows that hold more than they say: "(+ stage link)" rows also own the LayerNorm over this stage's and the
previous stage's zoomed-in input (the code's link between stages); a ResNet's "stem and layer1" row runs before any Bridger;
logit_scale is CLIP's and unused."""


def print_shape_walk(net, sentence="the man on the left"):
    c = net.config
    print(f"ETRIS with {c.backbone} at {c.input_size} px, one image and the sentence {sentence!r} in {c.word_len} "
          f"tokens\n\n{'block':55} {'symbol':11} {'shape':19} {'trainable':>11} {'frozen':>12}")
    for r in shape_walk(net, sentence):
        shape = "" if r["shape"] is None else "[" + ", ".join(map(str, r["shape"])) + "]"
        print(f"{r['block']:55} {r['symbol']:11} {shape:19} {r['trainable']:>11,} {r['frozen']:>12,}")
    print(WALK_NOTES + "\n\n" + format_parameter_counts(parameter_counts(net)))


def main(argv=None):
    from clip_loader import BACKBONES, random_clip_state_dict
    from errors import ArgumentParser, number
    p = ArgumentParser(description="Print Fig. 2 block by block: symbols, shapes, parameters.")
    p.add_argument("--backbone", default="ViT-B/16", help=f"one of {', '.join(BACKBONES)}")
    p.add_argument("--input-size", type=number(int, 1), default=416, help="the square the image is letterboxed to")
    p.add_argument("--word-len", type=number(int, 1, 77), default=17, help="tokens per sentence")
    p.add_argument("--sentence", default="the man on the left", help="the sentence tokenized for the walk")
    p.add_argument("--clip-weights", default=None, help="default: random weights of the real shapes (no download)")
    args = p.parse_args(argv)
    check_backbone(args.backbone, args.input_size, args.clip_weights)
    weights = args.clip_weights or random_clip_state_dict(args.backbone)
    print_shape_walk(build_model(args.backbone, weights, args.input_size, args.word_len), args.sentence)


if __name__ == "__main__":
    from errors import run_cli
    run_cli(main)
