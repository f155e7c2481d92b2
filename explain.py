"""
Look inside ETRIS: where each word looks in the image, stage by stage, and which words each pixel reads in GA,
for one image and one sentence, from any checkpoint (ours, the authors' release, the demo's).

    python explain.py --checkpoint exp/refcoco/ViT-B-16/best.pth --image photo.jpg --text "the man on the left"
    python explain.py --checkpoint refcoco_vit.pth --backbone ViT-B/16 --clip-weights ViT-B-16.pt --image ...

writes photo_the-man-on-the-left_explain.png (next to the image, or under --out; _2, _3, ... are added rather than
overwrite an earlier result), with one row per attention site of Fig. 2 and one column per word:
- stage i, Bridger ITA: where the word looks in the image (fusion_t, the words read the zoomed image hat F_v^{i+1},
  the paper counting the tapped stages from 2; in the ResNet Bridger this is the interactor's cross-attention,
  after its self-attention over the words);
- GA layer k: how much the pixels read the word (GA's pixel-to-word cross-attention; its output after layer 3,
  normalised, is F_c);
- the Projector's map sigmoid(logits), the mask at the evaluation threshold, and the overlay.
Heads are averaged; a word made of several BPE pieces is one column (its pieces' image maps averaged, the
attention the pixels give its pieces summed); the start and end tokens are shown once, labelled. Each row has
one colour scale, 0 to the row's largest value, printed in the row's title.

Padding: GA masks the padded word positions (they get zero weight). The authors' Bridger uses no padding mask:
padded positions read the image and are read by it like words (and, in the ResNet Bridger's self-attention, by
the words). They are not drawn; the figure's header prints the share of the image's attention that goes to them
(fusion_v, the image reading the words), and the .npz keeps every position. The .npz next to the PNG holds the
raw maps, named by site, each [heads, queries, keys] as the model computed them (eval mode: no dropout), the
per-word tiles as drawn, the tokens, words, logits, sigmoid map and mask.

The maps are the model's own: forward hooks on its attention modules recompute the weights from the inputs those
modules received and from their own parameters (layers.MultiheadAttention), beside the model; the forward pass is
unchanged, so the logits are bit-identical with and without capture (tested).

The paper's appendix Figs. 5 and 6 draw image-text cross-attention maps. Their captions could not be read here;
asked for the code (github.com/kkakkkka/ETRIS, issue 20), the authors point to the Bridger's interactors and to
GA's cross-attention, GA's being the most interpretable. Which stage, layer, head or word each panel shows could
not be told, so the figure draws every Bridger stage and GA layer, heads averaged, for every word.
"""
import inspect
import math
import os
import re
from contextlib import contextmanager

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clip_loader import BACKBONES, check_backbone
from dataset import CLIP_MEAN, letterbox_matrix, to_input
from errors import ArgumentParser, UserError, number, run_cli
from evaluate import masks_to_original, overlay
from tokenizer import default_tokenizer, tokenize

START, END = "<start>", "<end>"


# ----------------------------------------------------------------------------------------------
# capture: hooks beside the model

def attention_weights(attn, query, key=None, value=None, attn_mask=None, key_padding_mask=None):
    """The attention weights [B, heads, Lq, Lk] that layers.MultiheadAttention `attn` used for these inputs (its
    own projections, scale 1/sqrt(head width), masks), recomputed outside its forward; value is not needed."""
    w, b = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q, k = F.linear(query, w[0], b[0]), F.linear(query if key is None else key, w[1], b[1])
    (B, Lq, D), Lk, h = q.shape, k.shape[1], attn.heads
    q = q.reshape(B, Lq, h, D // h).transpose(1, 2)  # [B, h, Lq, D/h]
    k = k.reshape(B, Lk, h, D // h).transpose(1, 2)  # [B, h, Lk, D/h]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // h)  # [B, h, Lq, Lk]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    elif attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1)


def attention_sites(net):
    """The cross-attentions between image and words, in the order of Fig. 2: name -> attention module. ViT Bridger:
    the gated cross-attention's; ResNet Bridger: the transformer interactor's cross-attention (both named
    `multihead_attn`)."""
    sites = {}
    for i in net.bridger.stages:
        sites[f"bridger_stage{i + 1}_words_read_image"] = net.bridger.fusion_t[str(i)].multihead_attn
        sites[f"bridger_stage{i + 1}_image_reads_words"] = net.bridger.fusion_v[str(i)].multihead_attn
    for k, layer in enumerate(net.decoder.layers):
        sites[f"ga_layer{k + 1}_pixels_read_words"] = layer.multihead_attn
    return sites


@contextmanager
def capture_attention(net):
    """with capture_attention(net) as maps: net(images, tokens); then maps[site] = weights [B, heads, Lq, Lk] of
    the last forward (see attention_sites). The hooks return nothing, so the forward pass is unchanged."""
    maps, handles = {}, []
    for name, module in attention_sites(net).items():
        signature = inspect.signature(module.forward)

        def hook(module, args, kwargs, output, name=name, signature=signature):
            with torch.no_grad():
                maps[name] = attention_weights(module, **signature.bind(*args, **kwargs).arguments).detach()
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# words and per-word maps

def word_groups(token_ids):
    """Token ids [L] (0 = padding) -> [(label, (start, end))]: the start token, each word of the sentence with its
    BPE pieces grouped back together (a word ends with the piece that closes it), the end token."""
    tok, ids = default_tokenizer(), [int(t) for t in token_ids]
    n = next((i for i, t in enumerate(ids) if t == 0), len(ids))
    groups, start = [(START, (0, 1))], 1
    for i in range(1, n - 1):
        if tok.decoder[ids[i]].endswith("</w>") or i == n - 2:  # i == n-2: a word cut by truncation ends there
            groups.append((tok.decode(ids[start:i + 1]).strip(), (start, i + 1)))
            start = i + 1
    return groups + [(END, (n - 1, n))]


def per_word_maps(weights, groups, words_are_queries):
    """weights [heads, Lq, Lk] of one sample -> [n_words, g, g], heads averaged. words_are_queries (the words read
    the image, keys = g*g image positions): the mean of the word's pieces' maps. Else (the pixels read the words,
    queries = g*g pixels): the weight the pixels give the word's pieces, summed."""
    w = np.asarray(weights, dtype=np.float64).mean(axis=0)  # [Lq, Lk]
    w = w if words_are_queries else w.T  # [L, g*g]
    g = math.isqrt(w.shape[1])
    if g * g != w.shape[1]:
        raise ValueError(f"{w.shape[1]} image positions are not a square grid")
    reduce = np.mean if words_are_queries else np.sum
    return np.stack([reduce(w[a:b], axis=0).reshape(g, g) for _, (a, b) in groups]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# one image, one sentence

@torch.no_grad()
def explain(net, rgb, text, threshold=0.35):
    """Run `net` (in eval mode, on its device) on one RGB image [H, W, 3] and sentence, capturing its attention.
    Returns a dict: image, tokens, words (word_groups), maps (site -> [heads, Lq, Lk] float32), logits,
    probability (sigmoid of the logits), mask (bool, original resolution, the evaluation protocol), threshold."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("text is empty: give the referring expression to explain, e.g. 'the man on the left'")
    device, size, was_training = next(net.parameters()).device, net.config.input_size, net.training
    image, _, inverse = to_input(rgb, size)
    tokens = tokenize(text, context_length=net.config.word_len, truncate=True)  # [1, L]
    with capture_attention(net.eval()) as maps:
        logits = net(image[None].to(device), tokens.to(device))  # [1, 1, S/4, S/4]
    net.train(was_training)
    mask = masks_to_original(logits, [inverse], [rgb.shape[:2]], size, threshold)[0]
    return dict(image=rgb, text=text, tokens=tokens[0].numpy(), words=word_groups(tokens[0]), input_size=size,
                maps={k: v[0].float().cpu().numpy() for k, v in maps.items()}, threshold=threshold,
                logits=logits[0, 0].float().cpu().numpy(), mask=mask, backbone=net.config.backbone,
                probability=torch.sigmoid(logits[0, 0]).float().cpu().numpy())


def padded_share(expl, stage):
    """The share of the image's attention (fusion_v at this Bridger stage, mean over heads and pixels) that goes to
    the padded word positions, which the authors' Bridger does not mask."""
    w = expl["maps"][f"bridger_stage{stage}_image_reads_words"]  # [heads, g*g, L]
    return float(w[:, :, np.asarray(expl["tokens"]) == 0].sum(axis=-1).mean())


def figure_rows(expl):
    """The attention rows of the figure: dicts with site, title (lines), maps [n_words, g, g]."""
    rows, kind = [], "gated x-attn" if "ViT" in expl["backbone"] else "interactor x-attn"
    for site, w in expl["maps"].items():
        n = int(re.search(r"\d+", site).group())
        if site.endswith("words_read_image"):
            title = [f"stage {n}, Bridger ITA:", "each word reads the image", f"(fusion_t.{n - 1}, {kind},",
                     f"F_t^{n + 1} reads hat F_v^{n + 1})"]
        elif site.endswith("pixels_read_words"):
            title = [f"GA layer {n}: how much", "the pixels read each word", "(pixel-to-word x-attn,",
                     "F_v -> ... -> F_c)" if n == 1 else "-> F_c)"]
        else:
            continue  # the Bridger's image-reads-words maps go to the .npz only
        maps = per_word_maps(w, expl["words"], site.endswith("words_read_image"))
        g = maps.shape[-1]
        rows.append(dict(site=site, maps=maps,
                         title=title + [f"{w.shape[0]} heads, {g}x{g}; 0 .. {float(maps.max()):.3g}"]))
    return rows


# ----------------------------------------------------------------------------------------------
# the figure (OpenCV only)

FONT, LABEL_W, GAP, HEAD_LINE, LINE = cv2.FONT_HERSHEY_SIMPLEX, 200, 4, 17, 15


def _text(img, text, x, y, scale=0.4, colour=(20, 20, 20), max_w=None):
    text = str(text).encode("ascii", "replace").decode()
    while max_w and scale > 0.25 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > max_w:
        scale -= 0.02
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, colour, 1, cv2.LINE_AA)


def letterboxed(rgb, tile, interpolation=cv2.INTER_AREA):
    """The image as the model sees it (letterboxed into a square, CLIP-mean border), at tile x tile, BGR."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    mat = letterbox_matrix(h, w, side)[0]
    square = cv2.warpAffine(rgb, mat, (side, side), flags=cv2.INTER_NEAREST,
                            borderValue=[round(m * 255) for m in CLIP_MEAN])
    return cv2.cvtColor(cv2.resize(square, (tile, tile), interpolation=interpolation), cv2.COLOR_RGB2BGR)


def heat_tile(background, heat, scale):
    """A g x g map drawn over the tile (nearest: one block per cell): inferno colours from 0 (black) to `scale`
    (pale yellow; brightness grows with the value), over the image in grey."""
    tile = background.shape[0]
    value = np.clip(np.nan_to_num(heat / scale) if scale > 0 else np.zeros_like(heat), 0, 1)
    colour = cv2.applyColorMap(np.round(cv2.resize(value.astype(np.float32), (tile, tile),
                                                   interpolation=cv2.INTER_NEAREST) * 255).astype(np.uint8),
                               cv2.COLORMAP_INFERNO)
    grey = cv2.cvtColor(cv2.cvtColor(background, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colour, 0.75, grey, 0.25, 0)


def final_tiles(expl, tile):
    """The last row: the input, sigmoid(logits), the mask at the threshold, the overlay; short captions, and the
    lines that explain them."""
    rgb, prob, size = expl["image"], expl["probability"], expl["input_size"]
    mask_rgb = cv2.cvtColor(expl["mask"].astype(np.uint8) * 255, cv2.COLOR_GRAY2RGB)
    over = cv2.cvtColor(overlay(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), expl["mask"]), cv2.COLOR_BGR2RGB)
    prob_tile = cv2.resize(prob, (tile, tile), interpolation=cv2.INTER_NEAREST)
    tiles = [(letterboxed(rgb, tile), "input"),
             (cv2.applyColorMap(np.round(prob_tile * 255).astype(np.uint8), cv2.COLORMAP_INFERNO), "P"),
             (letterboxed(mask_rgb, tile, cv2.INTER_NEAREST), "mask"), (letterboxed(over, tile), "overlay")]
    lines = ["output: the input (letter-", f"boxed to {size} px); P =", "sigmoid(Z_c * Z_t), the",
             f"Projector's {prob.shape[0]}x{prob.shape[1]} map, 0..1;", f"mask: P > {expl['threshold']:g}, the",
             "evaluation protocol;", "overlay: the mask filled"]
    return tiles, lines


def _wrapped(text, width, scale):
    """`text` in lines no wider than `width` pixels at this font scale."""
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if lines[-1] and cv2.getTextSize(line, FONT, scale, 1)[0][0] > width:
            lines.append(word)
        else:
            lines[-1] = line
    return lines


def _header(expl, rows):
    lines = [f"ETRIS, {expl['backbone']}: \"{expl['text']}\"",
             "rows: Fig. 2's attention sites, heads averaged; columns: the words (BPE pieces grouped);"
             " colours 0 (black) .. row max (yellow)"]
    stages = [int(re.search(r"\d+", r["site"]).group()) for r in rows if "bridger" in r["site"]]
    n_pad = int((np.asarray(expl["tokens"]) == 0).sum())
    if stages and n_pad:
        shares = ", ".join(f"{100 * padded_share(expl, s):.0f}% at stage {s}" for s in stages)
        lines.append(f"Bridger: no padding mask (the authors' code): the image reads the {n_pad} padded positions "
                     f"too ({shares}); they are not drawn. GA masks them.")
    elif stages:
        lines.append("no padded positions: the sentence fills every token of the word length")
    return lines


def draw_figure(expl, tile=128):
    """The figure (BGR uint8) and its layout: {'columns': word labels, 'tiles': {(site, column): (y, x, size)}}."""
    rows, columns = figure_rows(expl), [label for label, _ in expl["words"]]
    outputs, output_lines = final_tiles(expl, tile)
    width = LABEL_W + max(len(columns), len(outputs)) * (tile + GAP) + GAP
    header = [line for text in _header(expl, rows) for line in _wrapped(text, width - 12, 0.45)]
    row_h = max(tile, LINE * max(len(r["title"]) for r in rows) + 6) + GAP
    top = HEAD_LINE * len(header) + 10 + 22  # the header lines, then the column labels
    end_h = max(tile + LINE, LINE * len(output_lines) + 6)
    fig = np.full((top + len(rows) * row_h + end_h + GAP, width, 3), 255, np.uint8)
    for i, line in enumerate(header):
        _text(fig, line, 6, HEAD_LINE * (i + 1), 0.45)
    layout = {"columns": columns, "tiles": {}}
    for c, label in enumerate(columns):
        _text(fig, label, LABEL_W + c * (tile + GAP) + GAP, top - 8, 0.5, max_w=tile)
    background = letterboxed(expl["image"], tile)
    for r, row in enumerate(rows):
        y = top + r * row_h
        for i, line in enumerate(row["title"]):
            _text(fig, line, 6, y + 13 + i * LINE)
        for c, heat in enumerate(row["maps"]):
            x = LABEL_W + c * (tile + GAP) + GAP
            fig[y:y + tile, x:x + tile] = heat_tile(background, heat, float(row["maps"].max()))
            layout["tiles"][(row["site"], columns[c])] = (y, x, tile)
    y = top + len(rows) * row_h
    for i, line in enumerate(output_lines):
        _text(fig, line, 6, y + 13 + i * LINE)
    for c, (img, caption) in enumerate(outputs):
        x = LABEL_W + c * (tile + GAP) + GAP
        fig[y:y + tile, x:x + tile] = img
        _text(fig, caption, x, y + tile + 13, 0.42, max_w=tile)
    return fig, layout


# ----------------------------------------------------------------------------------------------
# files

def save(expl, stem, tile=128):
    """Writes stem.png (the figure) and stem.npz (the raw maps); returns the npz's {name: shape}."""
    fig, _ = draw_figure(expl, tile)
    arrays = dict(image=expl["image"], tokens=expl["tokens"], padding=np.asarray(expl["tokens"]) == 0,
                  words=np.array([label for label, _ in expl["words"]]),
                  word_tokens=np.array([span for _, span in expl["words"]]), logits=expl["logits"],
                  probability=expl["probability"], mask=expl["mask"], threshold=np.float32(expl["threshold"]))
    for site, w in expl["maps"].items():
        arrays[site] = w  # [heads, Lq, Lk], every position, padding included
        arrays[site + "_per_word"] = per_word_maps(w, expl["words"], site.endswith("words_read_image"))
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    if not cv2.imwrite(stem + ".png", fig, [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise UserError(f"could not write {stem}.png: check that the folder is writable")
    np.savez_compressed(stem + ".npz", **arrays)
    return {k: tuple(np.shape(v)) for k, v in arrays.items()}


def parse_args(argv=None):
    p = ArgumentParser(description="Draw where each word looks, stage by stage, in an ETRIS model: the Bridger's and "
                                   "GA's cross-attention for one image and sentence (PNG + .npz of the raw maps).")
    p.add_argument("--checkpoint", required=True, help="our checkpoint (best.pth, the demo's last.pth) or an "
                                                       "authors' release (then also --backbone, --clip-weights)")
    p.add_argument("--image", required=True, help="any image file OpenCV reads")
    p.add_argument("--text", required=True, help="the referring sentence")
    p.add_argument("--out", default=None, help="folder for the PNG and .npz (default: the image's folder)")
    p.add_argument("--backbone", default=None, help=f"authors' checkpoints only: one of {', '.join(BACKBONES)}")
    p.add_argument("--clip-weights", default=None, help="CLIP archive (default: resolved by backbone name)")
    p.add_argument("--input-size", type=number(int, 1), default=None,
                   help="authors' checkpoints only, default 416 (ours carry theirs)")
    p.add_argument("--word-len", type=number(int, 2, 77), default=17, help="authors' checkpoints only (G-Ref: 22)")
    p.add_argument("--threshold", type=number(float, 0, 1, low_open=True, high_open=True), default=0.35,
                   help="the mask is sigmoid(logits) > threshold, as in evaluate.py")
    p.add_argument("--tile", type=number(int, 48, 512), default=128, help="side of one map in the figure, pixels")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    if args.backbone is not None:
        check_backbone(args.backbone, args.input_size, args.clip_weights)
    return args


def main(argv=None):
    from checkpoint import load_model
    from distributed import pick_device
    from predict import output_paths, read_image
    args = parse_args(argv)
    rgb = read_image(args.image)
    net = load_model(args.checkpoint, args.backbone, args.clip_weights, args.input_size, args.word_len,
                     pick_device(args.device))
    expl = explain(net, rgb, args.text, args.threshold)
    stem = output_paths(args.image, args.text, args.out, endings=("_explain.png", "_explain.npz"))[0][:-len(".png")]
    shapes = save(expl, stem, args.tile)
    print(f"wrote {stem}.png and {stem}.npz:")
    for name, shape in shapes.items():
        print(f"  {name:44} {list(shape)}")
    return stem


if __name__ == "__main__":
    run_cli(main)
