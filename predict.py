"""
Segment the object a sentence refers to in one image, with the same preprocessing (letterbox to the input
size, CLIP normalisation) and post-processing (the test protocol of evaluate.py: sigmoid, bicubic
upsampling, inverse letterbox warp, threshold 0.35) as training and evaluation.

    python predict.py --checkpoint exp/refcoco/ViT-B-16/best.pth --image photo.jpg --text "the man on the left"

writes photo_the-man-on-the-left_mask.png (0/255, original resolution) and ..._overlay.png next to photo.jpg (or
under --out), never over an earlier result. From Python:

    from predict import predict
    mask = predict("best.pth", "photo.jpg", "the man on the left")   # bool [H, W]
"""
import itertools
import os
import re

import cv2
import numpy as np
import torch

from checkpoint import load_model
from clip_loader import BACKBONES, check_backbone
from dataset import read_image_file, to_input
from distributed import pick_device
from errors import ArgumentParser, UserError, number, run_cli
from evaluate import add_caption, masks_to_original, overlay, overlay_colours
from tokenizer import tokenize


def read_image(image):
    """A path (any format OpenCV reads; a truncated JPEG or PNG is an error, not grey rows) or an RGB uint8
    array [H,W,3] / gray [H,W] -> RGB uint8 [H,W,3]."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise UserError(f"image {os.fspath(image)!r} not found")
        try:
            bgr = read_image_file(os.fspath(image), cv2.IMREAD_COLOR, any_format=True)
        except ValueError as e:
            raise UserError(f"image {e}; give a complete image file") from None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be uint8 RGB [H,W,3] (or gray [H,W], RGBA [H,W,4]); got "
                         f"{image.dtype} {image.shape}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


@torch.no_grad()
def predict(net_or_checkpoint, image, text, threshold=0.35, device=None, backbone=None, clip_weights=None):
    """Bool mask [H, W] at the image's original resolution. `net_or_checkpoint`: an ETRIS net (its .config gives
    the input size and word length) or a checkpoint path (see checkpoint.load_model)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("text is empty: give the referring expression to segment, e.g. 'the man on the left'")
    device = pick_device(device)
    if isinstance(net_or_checkpoint, torch.nn.Module):
        net = net_or_checkpoint.to(device).eval()
    else:
        net = load_model(net_or_checkpoint, backbone=backbone, clip_weights=clip_weights, device=device)
    rgb = read_image(image)
    size, word_len = net.config.input_size, net.config.word_len
    img, _, inverse = to_input(rgb, size)
    tokens = tokenize(text, context_length=word_len, truncate=True)  # [1, L]
    logits = net(img[None].to(device), tokens.to(device))  # [1, 1, S/4, S/4]
    return masks_to_original(logits, [inverse], [rgb.shape[:2]], size, threshold)[0]


def output_paths(image_path, text, out_dir=None, endings=("_mask.png", "_overlay.png")):
    """Where a command line writes: <out_dir, default the image's folder>/<image>_<sentence><ending> for each
    ending, with _2, _3, ... after the sentence rather than replacing an earlier result."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60].rstrip("-") or "text"
    stem = os.path.join(out_dir or os.path.dirname(os.path.abspath(image_path)),
                        f"{os.path.splitext(os.path.basename(image_path))[0]}_{words}")
    for n in itertools.count(1):
        paths = [f"{stem}{'' if n == 1 else f'_{n}'}{ending}" for ending in endings]
        if not any(os.path.exists(p) for p in paths):
            return paths


def main(argv=None):
    p = ArgumentParser(description="Segment what a sentence refers to in an image with ETRIS.")
    p.add_argument("--checkpoint", required=True, help="our checkpoint (best.pth) or an authors' release")
    p.add_argument("--image", required=True, help="an image file (any format OpenCV reads)")
    p.add_argument("--text", required=True, help="the referring expression, e.g. 'the man on the left'")
    p.add_argument("--backbone", default=None, help=f"authors' checkpoints only: one of {', '.join(BACKBONES)}")
    p.add_argument("--clip-weights", default=None, help="CLIP archive (default: resolved by backbone name)")
    p.add_argument("--threshold", type=number(float, 0, 1, low_open=True, high_open=True), default=0.35,
                   help="on the sigmoid of the logits")
    p.add_argument("--out", "--out-dir", dest="out", default=None,
                   help="folder for <image>_<sentence>_mask.png and _overlay.png (default: the image's folder)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    if args.backbone is not None:
        check_backbone(args.backbone)

    rgb = read_image(args.image)
    mask = predict(args.checkpoint, rgb, args.text, args.threshold, args.device, args.backbone, args.clip_weights)
    mask_path, overlay_path = output_paths(args.image, args.text, args.out)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    colours = overlay_colours(bgr, mask)
    for path, picture in ((mask_path, mask.astype(np.uint8) * 255),
                          (overlay_path, add_caption(overlay(bgr, mask, colours=colours), args.text, legend=colours))):
        if not cv2.imwrite(path, picture):
            raise UserError(f"could not write {path}: give a folder you can write to with --out")
    print(f"{mask.mean() * 100:.1f}% of the image selected; wrote {mask_path} and {overlay_path}")
    return mask


if __name__ == "__main__":
    run_cli(main)
