"""A tiny REFER-format release (refs pickle, instances.json, JPEGs), written for tests and the GPU check:

    python tests/fake_refer.py --out /tmp/fake_refer [--prepare]     # --prepare: also the prepared folder
"""
import argparse
import json
import os
import pickle
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coco_mask import rle_encode, rle_to_string, segmentation_to_mask  # noqa: E402
from dataset import DATASETS  # noqa: E402
from prepare import prepare  # noqa: E402


def fake_refer_release(root, dataset='refcoco', n_images=8, refs_per_image=2, size=(480, 640), seed=0):
    """Write a small REFER-format release (refs pickle, instances.json, JPEGs) under root.

    Annotations cycle through polygon (sometimes two polygons), compressed RLE and uncompressed RLE;
    refs cycle through the dataset's splits. Returns the list of refs written.
    """
    info = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    h, w = size
    img_dir = os.path.join(root, 'images', 'train2014')
    folder = os.path.join(root, info['folder'])
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    splits = list(info['splits'])
    images, anns, refs = [], [], []
    for i in range(n_images):
        img_id = 1000 + i
        name = f'COCO_train2014_{img_id:012d}.jpg'
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, 90)], -1).astype(np.float64)
        img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
        for j in range(refs_per_image):
            k = len(anns)
            cx, cy = rng.uniform(.2, .8) * w, rng.uniform(.2, .8) * h
            rad = rng.uniform(.08, .18) * min(h, w)
            ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
            poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).round(2).ravel().tolist()
            seg = [poly]
            if k % 4 == 3:  # a second, disjoint part
                seg.append([cx + rad * 1.2, cy, cx + rad * 1.6, cy, cx + rad * 1.4, cy + rad * .5])
            if k % 3 == 1:
                seg = {'size': [h, w], 'counts': rle_to_string(rle_encode(segmentation_to_mask(seg, h, w)))}
            elif k % 3 == 2:
                seg = {'size': [h, w], 'counts': rle_encode(segmentation_to_mask(seg, h, w))}
            m = segmentation_to_mask(seg, h, w)
            colour = rng.integers(0, 256, 3).tolist()
            img[m > 0] = colour
            ys, xs = np.nonzero(m)
            bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
            cat = int(rng.integers(1, 91))
            anns.append({'id': 5000 + k, 'image_id': img_id, 'category_id': cat, 'segmentation': seg,
                         'area': float(m.sum()), 'bbox': bbox, 'iscrowd': int(isinstance(seg, dict))})
            sents = [{'sent_id': 9000 + 3 * k + s, 'sent': f' object {k} number {s} ', 'raw': f'Object {k} #{s}',
                      'tokens': ['object', str(k), 'number', str(s)]} for s in range(1 + k % 3)]
            refs.append({'ref_id': 100 + k, 'ann_id': 5000 + k, 'image_id': img_id, 'category_id': cat,
                         'split': splits[k % len(splits)], 'sentences': sents,
                         'sent_ids': [s['sent_id'] for s in sents], 'file_name': name.replace('.jpg', f'_{k}.jpg')})
        cv2.imwrite(os.path.join(img_dir, name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append({'id': img_id, 'file_name': name, 'height': h, 'width': w})
    with open(os.path.join(folder, f"refs({info['split_by']}).p"), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(folder, 'instances.json'), 'w') as f:
        cats = [{'id': c, 'name': f'category {c}'} for c in range(1, 91)]
        json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
    return refs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="refcoco", choices=[d for d in DATASETS if d != "synthetic"])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--refs-per-image", type=int, default=2)
    p.add_argument("--prepare", action="store_true", help="also write the prepared folder under OUT/prepared")
    args = p.parse_args(argv)
    release = os.path.join(args.out, "release") if args.prepare else args.out
    refs = fake_refer_release(release, args.data, args.images, args.refs_per_image)
    if args.prepare:
        prepare(release, args.data, os.path.join(args.out, "prepared"))
    print(f"wrote {len(refs)} refs on {args.images} images under {args.out}")


if __name__ == "__main__":
    main()
