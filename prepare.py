"""
Write the authors' prepared data folder from the REFER release, as their tools/data_process.py does:
anns/<dataset>/<split>.json (a list of {bbox, cat, segment_id, img_name, sentences, sentences_num}) and
masks/<dataset>/<ref_id>.png (0/255). dataset.py reads the REFER release directly, so this is optional: it gives
the folder the authors' code and other tools expect, checked as training checks it.

    python prepare.py --root datasets --data refcoco --out datasets        # add --skip-bad to leave bad refs out
"""
import json
import os

import cv2
import numpy as np
from tqdm import tqdm

from coco_mask import segmentation_to_mask
from dataset import (DATASETS, _bad_entry, _image_dir, _raise_bad, _read_refer, _record_problem, _split_size_line,
                     _who, check_image_file)
from errors import ArgumentParser, UserError, run_cli


def _coco_cat(cat):
    # the authors' cat_process: COCO's 91 sparse category ids -> 0..79
    for lo, hi, off in ((1, 11, 1), (13, 25, 2), (27, 28, 3), (31, 44, 5), (46, 65, 6), (67, 67, 7),
                        (70, 70, 9), (72, 82, 10), (84, 90, 11)):
        if lo <= cat <= hi:
            return cat - off
    return cat


def _atomic_write(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def prepare(root, dataset, out_dir, skip_bad=False):
    """Write the authors' prepared folder (anns/<dataset>/<split>.json, masks/<dataset>/<ref_id>.png)
    from the REFER release under root. Resumable: complete masks already written are kept (a truncated
    one is rewritten). Images are not copied: <out_dir>/images/train2014 becomes a link to root's images
    when it does not exist, and each is checked as training checks it.

    Prints each split's found vs published ref count. A bad ref (see RefDataset) raises its error; with
    skip_bad it gets no json entry and no mask, and the skipped refs are printed at the end. Returns
    them: bad_samples entries plus 'split'."""
    if dataset not in DATASETS or dataset == 'synthetic':
        raise UserError(f"cannot prepare {dataset!r}; valid: {', '.join(d for d in DATASETS if d != 'synthetic')}")
    ann_dir, mask_dir = os.path.join(out_dir, 'anns', dataset), os.path.join(out_dir, 'masks', dataset)
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    img_dir = _image_dir(root)
    out_img = os.path.join(out_dir, 'images', 'train2014')
    if not os.path.exists(out_img) and not os.path.isdir(os.path.join(out_dir, 'train2014')):
        os.makedirs(os.path.dirname(out_img), exist_ok=True)
        os.symlink(os.path.abspath(img_dir), out_img)
    bad, checked = [], {}
    for split in DATASETS[dataset]['splits']:
        records = _read_refer(root, dataset, split)
        print(_split_size_line(dataset, split, len(records), f"{root}, refer layout"))
        items, n_bad = [], len(bad)
        for rec in tqdm(records, desc=f"{dataset} {split}"):
            problem = _record_problem(rec, checked)
            if problem is None:
                problem = _write_mask(rec, os.path.join(mask_dir, f"{rec['ref_id']}.png"))
            if problem is not None:
                if not skip_bad:
                    _raise_bad(problem[0])
                bad.append({**_bad_entry(rec, problem[1], problem[0]), 'split': split})
                continue
            x, y, bw, bh = rec['bbox']
            items.append({'bbox': [int(x), int(y), int(x) + int(bw), int(y) + int(bh)],
                          'cat': _coco_cat(rec['category_id']), 'segment_id': rec['ref_id'],
                          'img_name': os.path.basename(rec['image']),
                          'sentences': [{'idx': i, 'sent_id': sid, 'sent': s}
                                        for i, (sid, s) in enumerate(zip(rec['sent_ids'], rec['sentences']))],
                          'sentences_num': len(rec['sentences'])})
        path = os.path.join(ann_dir, f'{split}.json')
        _atomic_write(path, json.dumps(items).encode())
        skipped = f", skipped {len(bad) - n_bad} bad refs" if len(bad) > n_bad else ""
        print(f"{dataset} {split}: wrote {len(items)} refs to {path}{skipped}")
    if bad:
        print(f"{dataset}: skipped {len(bad)} bad refs (no json entry, no mask):")
        for b in bad:
            print(f"  {b['split']}: {b['error']}")
    return bad


def _write_mask(rec, path):
    """Rasterise a record's mask to `path` unless a complete one is there; (error, file) when it fails."""
    if os.path.isfile(path):
        try:
            check_image_file(path)
            return None
        except ValueError:
            pass  # truncated, e.g. by a full disk: written again below
    h, w = rec['size']
    try:
        mask = segmentation_to_mask(rec['segmentation'], h, w)
    except ValueError as e:
        return UserError(f"{_who(rec)}: bad segmentation in {rec['source']}: {e}; fix the annotation"), rec['source']
    _atomic_write(path, cv2.imencode('.png', mask * np.uint8(255))[1].tobytes())  # a killed run leaves no half mask
    return None


def main(argv=None):
    p = ArgumentParser(description='Write the prepared folder (anns/, masks/) from the REFER release.')
    p.add_argument('--root', required=True, help='the folder holding the REFER release and images/train2014')
    p.add_argument('--data', required=True, choices=[d for d in DATASETS if d != 'synthetic'], help='the dataset')
    p.add_argument('--out', required=True, help='the folder to write anns/ and masks/ into')
    p.add_argument('--skip-bad', action='store_true',
                   help='leave out refs with bad data (missing or truncated image, bad segmentation, empty '
                        'sentence) and list them at the end, instead of stopping at the first')
    args = p.parse_args(argv)
    return prepare(args.root, args.data, args.out, args.skip_bad)


if __name__ == '__main__':
    run_cli(main)
