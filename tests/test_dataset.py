"""Tests for dataset.py: COCO masks vs pycocotools' rules, both layouts, the authors' transform, bad data, loaders."""
import json
import os
import pickle
import warnings

import cv2
import numpy as np
import pytest
import torch

import dataset as D
from tokenizer import tokenize

H, W = 48, 64  # fixture images: small and not square, so the letterbox pads


# ----------------------------------------------------------------------------- fixtures

def _rect_counts(h, w, r0, r1, c0, c1):
    """Column-major RLE counts of the rectangle rows r0..r1-1, cols c0..c1-1, built by hand."""
    counts, zeros = [], c0 * h + r0
    for _ in range(c0, c1):
        counts += [zeros, r1 - r0]
        zeros = h - (r1 - r0)
    counts.append(h * w - sum(counts))
    return counts


def _rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


# annotation id -> (segmentation, expected mask)
def _fixture_anns():
    tri = np.zeros((H, W), np.uint8)
    for r in range(9):
        tri[30 + r, 40:40 + 9 - r] = 1  # polygon (40,30),(50,30),(40,40): pixel centres strictly inside
    return {
        1: ([[4, 5, 20, 5, 20, 15, 4, 15]], _rect(H, W, 5, 15, 4, 20)),
        2: ([[4, 5, 20, 5, 20, 15, 4, 15], [40, 30, 50, 30, 40, 40]], _rect(H, W, 5, 15, 4, 20) | tri),
        3: ({'size': [H, W], 'counts': D.rle_to_string(_rect_counts(H, W, 10, 20, 30, 40))}, _rect(H, W, 10, 20, 30, 40)),
        4: ({'size': [H, W], 'counts': _rect_counts(H, W, 0, 48, 60, 64)}, _rect(H, W, 0, 48, 60, 64)),
    }


def _sent(i, text):
    return {'sent_id': i, 'sent': text, 'raw': text, 'tokens': text.split()}


def write_refer(root, splits=('train', 'train', 'val', 'testA', 'testB', 'testAB'), image_dir='images/train2014'):
    """A hand-made REFER release: 2 JPEG images, 4 annotations (polygon, 2 polygons, RLE str, RLE list)."""
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    os.makedirs(os.path.join(root, 'refcoco'), exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for img_id in (10, 11):
        name = f'COCO_train2014_{img_id:012d}.jpg'
        img = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
        img[:, :W // 2, 2] = 250  # a red left half once converted to RGB (cv2 writes BGR)
        cv2.imwrite(os.path.join(root, image_dir, name), img)
        images.append({'id': img_id, 'file_name': name, 'height': H, 'width': W})
    anns = [{'id': k, 'image_id': 10 + k % 2, 'category_id': 1 + k, 'segmentation': seg, 'bbox': [1.5, 2.7, 10.2, 5.9],
             'area': float(m.sum()), 'iscrowd': 0} for k, (seg, m) in _fixture_anns().items()]
    sents = [[_sent(0, ' the left thing '), _sent(1, 'red box'), _sent(2, 'top left')], [_sent(3, 'two parts')],
             [_sent(4, 'rle string')], [_sent(5, 'right edge'), _sent(6, 'stripe')], [_sent(7, 'again a box')],
             [_sent(8, 'testab ref')]]
    refs = [{'ref_id': 100 + i, 'ann_id': [1, 2, 3, 4, 1, 3][i], 'image_id': 10 + [1, 2, 3, 4, 1, 3][i] % 2,
             'category_id': 2, 'split': split, 'sentences': sents[i], 'sent_ids': [s['sent_id'] for s in sents[i]],
             'file_name': 'x.jpg'} for i, split in enumerate(splits)]
    with open(os.path.join(root, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(root, 'refcoco', 'instances.json'), 'w') as f:
        json.dump({'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'person'}]}, f)
    return refs


@pytest.fixture
def refer_root(tmp_path):
    root = str(tmp_path / 'refer')
    write_refer(root)
    return root


def build(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fixture split sizes are not the paper's
        return D.build_dataset(*args, **kw)


def authors_sample(img_path, mask_u8, size):
    """The authors' getTransformMat + warps + convert, written out from their formulas."""
    img = cv2.cvtColor(cv2.imdecode(np.fromfile(img_path, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = h * scale, w * scale
    bx, by = (size - nw) / 2., (size - nh) / 2.
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [nw + bx, by], [bx, nh + by]], np.float32)
    mat = cv2.getAffineTransform(src, dst)
    out = cv2.warpAffine(img, mat, (size, size), flags=cv2.INTER_CUBIC,
                         borderValue=[0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
    t = torch.from_numpy(out.transpose((2, 0, 1))).float()
    t.div_(255.).sub_(torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1))
    t.div_(torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1))
    m = cv2.warpAffine(mask_u8, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.) / 255.
    return t, torch.from_numpy(m).float(), cv2.getAffineTransform(dst, src)


# ----------------------------------------------------------------------------- names, splits, constants

def test_tables():
    assert D.WORD_LEN == {'refcoco': 17, 'refcoco+': 17, 'refcocog_u': 22, 'refcocog_g': 22, 'synthetic': 17}
    assert D.DATASETS['refcoco']['splits'] == {'train': 42404, 'val': 3811, 'testA': 1975, 'testB': 1810}
    assert D.DATASETS['refcoco+']['splits'] == {'train': 42278, 'val': 3805, 'testA': 1975, 'testB': 1798}
    assert D.DATASETS['refcocog_u']['splits'] == {'train': 42226, 'val': 2573, 'test': 5023}
    assert D.DATASETS['refcocog_g']['splits'] == {'train': 44822, 'val': 5000}
    assert [D.DATASETS[n]['split_by'] for n in ('refcoco', 'refcoco+', 'refcocog_u', 'refcocog_g')] == \
        ['unc', 'unc', 'umd', 'google']
    assert D.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert D.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_unknown_names(refer_root):
    with pytest.raises(ValueError, match="valid: refcoco, refcoco\\+, refcocog_u, refcocog_g, synthetic"):
        D.build_dataset('refclef', 'train', root=refer_root)
    with pytest.raises(ValueError, match="valid: train, val$"):
        D.build_dataset('refcocog_g', 'test', root=refer_root)
    with pytest.raises(ValueError, match="testA, testB"):
        D.build_dataset('refcoco', 'testC', root=refer_root)
    with pytest.raises(ValueError, match="mode"):
        D.build_dataset('synthetic', 'val', mode='eval')
    with pytest.raises(ValueError, match="root"):
        D.build_dataset('refcoco', 'val')


def test_missing_root_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refcocog\.zip.*train2014\.zip"):
        D.build_dataset('refcocog_u', 'val', root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        D.build_dataset('refcocog_g', 'val', root=str(tmp_path))


def test_split_size_warning_names_expected_and_found(refer_root):
    with pytest.warns(UserWarning, match="refcoco train: expected 42404 refs.*found 2"):
        D.build_dataset('refcoco', 'train', root=refer_root)


# ----------------------------------------------------------------------------- COCO masks

def test_polygon_hand_cases():
    # integer rectangle covers exactly (x1-x0) x (y1-y0) pixels, at rows y0..y1-1, cols x0..x1-1
    np.testing.assert_array_equal(D.segmentation_to_mask([[2, 3, 12, 3, 12, 8, 2, 8]], 12, 16), _rect(12, 16, 3, 8, 2, 12))
    np.testing.assert_array_equal(D.segmentation_to_mask([[1.5, 1.5, 6.5, 1.5, 6.5, 4.5, 1.5, 4.5]], 8, 8),
                                  _rect(8, 8, 2, 5, 2, 7))
    # right triangle with legs 10: pixel (r, c) is in iff its centre is strictly inside, r + c <= 8 -> 45
    tri = D.segmentation_to_mask([[0, 0, 10, 0, 0, 10]], 12, 12)
    assert tri.sum() == 45 and tri.sum(1).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]
    # several polygons of one object merge by union (REFER sums them; overlaps count once)
    both = D.segmentation_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    np.testing.assert_array_equal(both, _rect(8, 8, 0, 4, 0, 4) | _rect(8, 8, 2, 6, 2, 6))
    # clipped to the image; a repeated vertex changes nothing
    assert D.segmentation_to_mask([[-3, -2, 20, -1, 20, 15, -2, 14]], 12, 16).sum() == 192
    assert D.segmentation_to_mask([[3, 3, 3, 3, 8, 3, 8, 8, 3, 8]], 12, 12).sum() == 25
    # pycocotools reads a first entry of 4 numbers as an [x, y, w, h] box (its own result: 5100 px)
    box = D.segmentation_to_mask([[10.5, 20.25, 100.0, 50.5]], 480, 640)
    assert box.sum() == 5100 and np.nonzero(box.any(0))[0][[0, -1]].tolist() == [11, 110]


def test_polygon_counts_equal_pycocotools():
    # (h, w, polygon, counts string that pycocotools 2.0 frPyObjects gives for it)
    cases = [(27, 11, [-0.8, 19.8, 7.8, 27.3, 2.1, 1.9], '=8<8L44K4M4L3M4Lf1'),
             (26, 56, [49.12313994776651, 22.720054229497578, 47.32822954386641, 18.420589767106375,
                       21.47762542468648, 23.10831209287213, 26.00701119065581, 20.727897574963713],
              '\\c01i00O01000000000^20bM0O100000000O10000000001O02NQ5')]
    for h, w, poly, s in cases:
        assert D._poly_to_rle(poly, h, w) == D.rle_from_string(s)
        assert D.rle_to_string(D._poly_to_rle(poly, h, w)) == s
    assert D.segmentation_to_mask([cases[0][2]], 27, 11).sum() == 85
    assert D.segmentation_to_mask([cases[1][2]], 26, 56).sum() == 45


def test_rle_string_hand_encoded():
    assert D.rle_from_string('5') == [5]
    assert D.rle_from_string('324') == [3, 2, 4]
    assert D.rle_from_string('1115') == [1, 1, 1, 6]  # 4th count stored as 6 - counts[1] = 5
    assert D.rle_from_string('052M') == [0, 5, 2, 2]  # 'M' = 29: 5-bit -3, 2 - 5
    assert D.rle_from_string('T3') == [100]  # 'T' = 36: low 5 bits 4 + continuation, then 3 << 5
    for counts, s in (([5], '5'), ([3, 2, 4], '324'), ([1, 1, 1, 6], '1115'), ([0, 5, 2, 2], '052M'), ([100], 'T3')):
        assert D.rle_to_string(counts) == s
    m = D.rle_decode([3, 2, 4], 3, 3)  # column-major: column 0 empty, then rows 0-1 of column 1
    np.testing.assert_array_equal(m, [[0, 1, 0], [0, 1, 0], [0, 0, 0]])
    m = D.segmentation_to_mask({'size': [3, 3], 'counts': '052M'}, 3, 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [1, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(D.segmentation_to_mask({'size': [3, 3], 'counts': b'052M'}, 3, 3), m)
    np.testing.assert_array_equal(D.segmentation_to_mask({'size': [3, 3], 'counts': [0, 5, 2, 2]}, 3, 3), m)
    assert D.rle_encode(m) == [0, 5, 2, 2]
    with pytest.raises(ValueError, match="sum to 8"):
        D.rle_decode([3, 2, 3], 3, 3)
    with pytest.raises(ValueError, match="corrupt compressed RLE"):
        D.rle_from_string('5~')
    with pytest.raises(ValueError, match="corrupt compressed RLE"):
        D.rle_from_string('T')  # continuation bit set on the last char
    with pytest.raises(ValueError, match="differs from the image"):
        D.segmentation_to_mask({'size': [3, 4], 'counts': '<'}, 3, 3)


def test_fixture_masks_decode():
    for seg, expected in _fixture_anns().values():
        np.testing.assert_array_equal(D.segmentation_to_mask(seg, H, W), expected)


# ----------------------------------------------------------------------------- safe pickle

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_refused(tmp_path, refer_root):
    marker = tmp_path / 'pwned'
    path = os.path.join(refer_root, 'refcoco', 'refs(unc).p')
    plain = D.load_refs_pickle(path)
    assert plain[0]['ref_id'] == 100 and plain[0]['sentences'][1]['sent'] == 'red box'
    with open(path, 'wb') as f:
        pickle.dump([{'ref_id': 1}, _Evil(marker)], f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load (posix|os)\.system"):
        D.load_refs_pickle(path)
    with pytest.raises(ValueError, match="refs\\(unc\\).p"):
        D.build_dataset('refcoco', 'val', root=refer_root)
    assert not marker.exists()


# ----------------------------------------------------------------------------- REFER layout, prepared layout

def test_refer_layout_samples(refer_root):
    ds = build('refcoco', 'train', root=refer_root, input_size=64, mode='test')
    assert ds.layout == 'refer' and len(ds) == 2 and [r['ref_id'] for r in ds.records] == [100, 101]
    anns = _fixture_anns()
    for i, ann_id in enumerate((1, 2)):
        s = ds[i]
        np.testing.assert_array_equal(s['orig_mask'], anns[ann_id][1])
        assert s['orig_size'] == (H, W) and s['ref_id'] == 100 + i and s['index'] == i
    assert ds[0]['sentences'] == ['the left thing', 'red box', 'top left']  # stripped, as the authors' json
    # REFER's split rules: testA takes 'testAB' refs too
    assert [r['ref_id'] for r in build('refcoco', 'testA', root=refer_root).records] == [103, 105]
    assert [r['ref_id'] for r in build('refcoco', 'testB', root=refer_root).records] == [104, 105]
    # the RLE annotations: string counts (val) and list counts (testA)
    np.testing.assert_array_equal(build('refcoco', 'val', root=refer_root)[0]['orig_mask'], anns[3][1])
    np.testing.assert_array_equal(build('refcoco', 'testA', root=refer_root)[0]['orig_mask'], anns[4][1])


def test_images_in_root_train2014(tmp_path):
    root = str(tmp_path / 'r')
    write_refer(root, image_dir='train2014')
    assert build('refcoco', 'val', root=root)[0]['orig_size'] == (H, W)
    os.rename(os.path.join(root, 'train2014'), os.path.join(root, 'elsewhere'))
    with pytest.raises(FileNotFoundError, match="train2014.zip"):
        build('refcoco', 'val', root=root)


def test_transform_equals_authors(refer_root):
    for mode in ('train', 'val'):
        ds = build('refcoco', 'train', root=refer_root, input_size=80, mode=mode)
        for i in range(len(ds)):
            s, rec = ds[i], ds.records[i]
            m255 = D.segmentation_to_mask(rec['segmentation'], H, W) * np.uint8(255)
            img, mask, inv = authors_sample(rec['image'], m255, 80)
            assert torch.equal(s['image'], img) and s['image'].dtype == torch.float32
            assert torch.equal(s['mask'], mask[None]) and s['mask'].shape == (1, 80, 80)
            assert 0 < mask.sum() and ((mask > 0) & (mask < 1)).any()  # soft at the edges, as theirs
    np.testing.assert_array_equal(s['inverse'], inv)
    # RGB: the left half was written red (BGR 250 in channel 2)
    red = ds[0]['image'][:, 40, 20] * torch.tensor(D.CLIP_STD) + torch.tensor(D.CLIP_MEAN)
    assert red[0] > 0.9
    # padding rows (64x48 -> 80: 10 rows top and bottom) hold the mean colour, i.e. ~0 after normalising
    assert ds[0]['image'][:, :7].abs().max() < 0.01


def test_letterbox_matrix_and_round_trip():
    mat, inv = D.letterbox_matrix(480, 640, 416)
    np.testing.assert_allclose(mat, [[0.65, 0, 0], [0, 0.65, 52]], atol=1e-5)
    np.testing.assert_allclose(inv, [[1 / 0.65, 0, 0], [0, 1 / 0.65, -80]], atol=1e-4)
    for h, w, size in ((480, 640, 416), (640, 427, 416), (97, 128, 128), (50, 50, 64), (120, 70, 128)):
        mat, inv = D.letterbox_matrix(h, w, size)
        pts = np.random.default_rng(0).uniform(0, [w, h], (50, 2))
        fwd = pts @ mat[:, :2].T + mat[:, 2]
        assert (fwd >= -1e-3).all() and (fwd <= size + 1e-3).all()
        np.testing.assert_allclose(fwd @ inv[:, :2].T + inv[:, 2], pts, atol=1e-3)
        # a mask letterboxed (as the dataset does) and warped back (as the evaluation does) moves < 1 px
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (w // 2, h // 2), (w // 3, h // 4), 20, 0, 360, 255, -1)
        small = cv2.warpAffine(m, mat, (size, size), flags=cv2.INTER_LINEAR) / 255.
        back = cv2.warpAffine(small.astype(np.float32), inv, (w, h), flags=cv2.INTER_CUBIC) > 0.5
        edge = cv2.dilate(cv2.morphologyEx(m, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8)) > 0
        assert not ((back != (m > 0)) & ~edge).any()


def test_sentences_per_mode(refer_root):
    ds = build('refcoco', 'train', root=refer_root, input_size=64)
    assert ds.mode == 'train'
    s = ds[0]
    assert set(s) == {'image', 'tokens', 'mask', 'ref_id', 'index'} and s['tokens'].dtype == torch.int64
    options = {tuple(tokenize(t, 17, True)[0].tolist()) for t in ('the left thing', 'red box', 'top left')}
    torch.manual_seed(0)
    seen = {tuple(ds[0]['tokens'].tolist()) for _ in range(40)}
    assert seen == options  # a random sentence each time, every one reachable
    val = build('refcoco', 'train', root=refer_root, input_size=64, mode='val')[0]
    assert set(val) == {'image', 'tokens', 'mask', 'ref_id', 'index', 'sentences', 'inverse', 'orig_size', 'orig_mask'}
    assert torch.equal(val['tokens'], tokenize('the left thing', 17, True)[0]) and val['sentences'] == ['the left thing']
    test = build('refcoco', 'train', root=refer_root, input_size=64, word_len=22, mode='test')[0]
    assert set(test) == {'image', 'tokens', 'ref_id', 'index', 'sentences', 'inverse', 'orig_size', 'orig_mask'}
    assert torch.equal(test['tokens'], tokenize(['the left thing', 'red box', 'top left'], 22, True))
    assert test['inverse'].dtype == np.float64 and test['inverse'].shape == (2, 3)
    assert test['orig_mask'].dtype == np.uint8 and set(np.unique(test['orig_mask'])) == {0, 1}
    # the default mode follows the split
    assert build('refcoco', 'val', root=refer_root).mode == 'val'
    assert build('refcoco', 'testB', root=refer_root).mode == 'test'


def test_prepare_writes_authors_folder(refer_root, tmp_path):
    out = str(tmp_path / 'prep')
    D.prepare(refer_root, 'refcoco', out)
    with open(os.path.join(out, 'anns', 'refcoco', 'train.json')) as f:
        items = json.load(f)
    assert items[0] == {'bbox': [1, 2, 11, 7], 'cat': 1, 'segment_id': 100, 'img_name': 'COCO_train2014_000000000011.jpg',
                        'sentences': [{'idx': 0, 'sent_id': 0, 'sent': 'the left thing'},
                                      {'idx': 1, 'sent_id': 1, 'sent': 'red box'},
                                      {'idx': 2, 'sent_id': 2, 'sent': 'top left'}], 'sentences_num': 3}
    assert sorted(os.listdir(os.path.join(out, 'anns', 'refcoco'))) == ['testA.json', 'testB.json', 'train.json', 'val.json']
    refer = {s: build('refcoco', s, root=refer_root, mode='test') for s in ('train', 'val', 'testA', 'testB')}
    for split, ds in refer.items():
        prep = build('refcoco', split, root=out, mode='test')
        assert prep.layout == 'prepared' and len(prep) == len(ds)
        for i in range(len(ds)):
            png = cv2.imread(os.path.join(out, 'masks', 'refcoco', f"{ds.records[i]['ref_id']}.png"), cv2.IMREAD_GRAYSCALE)
            a, b = ds[i], prep[i]
            np.testing.assert_array_equal(png, a['orig_mask'] * 255)
            assert torch.equal(a['image'], b['image']) and torch.equal(a['tokens'], b['tokens'])
            np.testing.assert_array_equal(a['orig_mask'], b['orig_mask'])
    # train-mode masks agree between layouts too
    a, b = build('refcoco', 'train', root=refer_root, input_size=64), build('refcoco', 'train', root=out, input_size=64)
    assert torch.equal(a[1]['mask'], b[1]['mask'])
    # resumable: an existing mask is kept, a deleted one is rewritten; no temp files left
    keep = os.path.join(out, 'masks', 'refcoco', '100.png')
    cv2.imwrite(keep, np.full((H, W), 7, np.uint8))
    os.remove(os.path.join(out, 'masks', 'refcoco', '101.png'))
    D.prepare(refer_root, 'refcoco', out)
    assert cv2.imread(keep, cv2.IMREAD_GRAYSCALE).max() == 7
    assert cv2.imread(os.path.join(out, 'masks', 'refcoco', '101.png'), cv2.IMREAD_GRAYSCALE).max() == 255
    assert not [f for d, _, fs in os.walk(out) for f in fs if '.tmp' in f]


def test_prepared_folder_by_hand(tmp_path):
    root = tmp_path / 'p'
    (root / 'anns' / 'refcocog_u').mkdir(parents=True)
    (root / 'masks' / 'refcocog_u').mkdir(parents=True)
    (root / 'images' / 'train2014').mkdir(parents=True)
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, :, 1] = 200
    cv2.imwrite(str(root / 'images' / 'train2014' / 'a.jpg'), img)
    mask = _rect(30, 40, 3, 9, 5, 25) * np.uint8(255)
    cv2.imwrite(str(root / 'masks' / 'refcocog_u' / '7.png'), mask)
    items = [{'bbox': [5, 3, 25, 9], 'cat': 0, 'segment_id': 7, 'img_name': 'a.jpg', 'sentences_num': 2,
              'sentences': [{'idx': 0, 'sent_id': 1, 'sent': 'a green wall'}, {'idx': 1, 'sent_id': 2, 'sent': 'wall'}]}]
    (root / 'anns' / 'refcocog_u' / 'test.json').write_text(json.dumps(items))
    with pytest.warns(UserWarning, match="expected 5023 refs.*found 1"):
        ds = D.build_dataset('refcocog_u', 'test', root=str(root), input_size=64)
    s = ds[0]
    assert s['tokens'].shape == (2, 22) and s['orig_size'] == (30, 40) and s['ref_id'] == 7
    np.testing.assert_array_equal(s['orig_mask'], mask // 255)
    m = build('refcocog_u', 'test', root=str(root), input_size=64, mode='train')[0]['mask']
    assert torch.equal(m, authors_sample(str(root / 'images' / 'train2014' / 'a.jpg'), mask, 64)[1][None])


# ----------------------------------------------------------------------------- bad data

@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_missing_image(refer_root):
    path = os.path.join(refer_root, 'images', 'train2014', 'COCO_train2014_000000000011.jpg')
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="ref 100: image file .*000000000011.jpg is missing"):
        build('refcoco', 'train', root=refer_root)
    with pytest.warns(UserWarning, match="skipped 1 bad refs of 2"):
        ds = D.build_dataset('refcoco', 'train', root=refer_root, skip_bad=True)
    assert len(ds) == 1 and ds.bad_samples[0]['ref_id'] == 100 and '000000000011.jpg' in ds.bad_samples[0]['error']


def test_corrupt_image_at_load(refer_root):
    path = os.path.join(refer_root, 'images', 'train2014', 'COCO_train2014_000000000011.jpg')
    with open(path, 'wb') as f:
        f.write(b'not a jpeg at all')
    ds = build('refcoco', 'train', root=refer_root)
    with pytest.raises(RuntimeError, match="ref 100: image .*000000000011.jpg cannot be decoded"):
        ds[0]
    ds = build('refcoco', 'train', root=refer_root, skip_bad=True, mode='test')
    with pytest.warns(UserWarning, match="skipping bad sample"):
        s = ds[0]
    assert s['index'] == 1 and s['ref_id'] == 101 and ds.bad_samples[0]['ref_id'] == 100


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_missing_annotation_and_empty_sentence(tmp_path):
    root = str(tmp_path / 'r')
    refs = write_refer(root)
    refs[0]['ann_id'] = 999
    refs[1]['sentences'][0]['sent'] = '   '
    with open(os.path.join(root, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(ValueError, match="ref 100 points at annotation 999"):
        build('refcoco', 'train', root=root)
    with pytest.warns(UserWarning, match="skipped 2 bad refs of 2"):
        with pytest.raises(ValueError, match="no usable refs"):
            D.build_dataset('refcoco', 'train', root=root, skip_bad=True)
    refs[0]['ann_id'] = 1
    with open(os.path.join(root, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(ValueError, match="ref 101 has an empty sentence"):
        build('refcoco', 'train', root=root)
    ds = build('refcoco', 'train', root=root, skip_bad=True)
    assert len(ds) == 1 and [b['ref_id'] for b in ds.bad_samples] == [101]


def test_bad_masks_in_prepared_folder(refer_root, tmp_path):
    out = str(tmp_path / 'prep')
    D.prepare(refer_root, 'refcoco', out)
    os.remove(os.path.join(out, 'masks', 'refcoco', '100.png'))
    with pytest.raises(FileNotFoundError, match="ref 100: mask file .*100.png is missing"):
        build('refcoco', 'train', root=out)
    with open(os.path.join(out, 'masks', 'refcoco', '101.png'), 'wb') as f:
        f.write(b'\x89PNG broken')
    ds = build('refcoco', 'train', root=out, skip_bad=True)
    assert [b['ref_id'] for b in ds.bad_samples] == [100]
    with pytest.warns(UserWarning, match="101.png cannot be decoded"):
        with pytest.raises(RuntimeError, match="every sample failed"):
            ds[0]


def test_corrupt_rle_names_ref(tmp_path):
    root = str(tmp_path / 'r')
    write_refer(root)
    path = os.path.join(root, 'refcoco', 'instances.json')
    inst = json.load(open(path))
    inst['annotations'][2]['segmentation']['counts'] = 'T'
    json.dump(inst, open(path, 'w'))
    with pytest.raises(RuntimeError, match="ref 102: bad segmentation"):
        build('refcoco', 'val', root=root)[0]


# ----------------------------------------------------------------------------- collate, loaders

def test_collate_and_loader(refer_root):
    train = build('refcoco', 'train', root=refer_root, input_size=64)
    batch = next(iter(D.build_loader(train, 2, train=True, workers=0)))
    assert batch['image'].shape == (2, 3, 64, 64) and batch['mask'].shape == (2, 1, 64, 64)
    assert batch['tokens'].shape == (2, 17) and batch['index'].dtype == torch.int64
    assert sorted(batch['ref_id'].tolist()) == [100, 101]
    test = build('refcoco', 'train', root=refer_root, input_size=64, mode='test')
    loader = D.build_loader(test, 2, train=False, workers=0)
    batch = next(iter(loader))
    assert [t.shape for t in batch['tokens']] == [(3, 17), (1, 17)] and batch['orig_size'] == [(H, W), (H, W)]
    assert isinstance(batch['inverse'], list) and isinstance(batch['orig_mask'], list) and batch['index'].tolist() == [0, 1]
    assert batch['sentences'][1] == ['two parts']
    val = build('refcoco', 'train', root=refer_root, input_size=64, mode='val')
    batch = D.collate([val[0], val[1]])
    assert batch['tokens'].shape == (2, 17) and batch['sentences'] == [['the left thing'], ['two parts']]


def test_loader_workers_seeded():
    ds = D.build_dataset('synthetic', 'train', input_size=32, num_samples=16)
    loader = D.build_loader(ds, 4, train=True, workers=2, seed=3)
    assert loader.persistent_workers and loader.drop_last and loader.num_workers == 2
    first = [b['index'].tolist() for b in loader]
    again = [b['index'].tolist() for b in D.build_loader(ds, 4, train=True, workers=0, seed=3)]
    assert sorted(sum(first, [])) == list(range(16)) and first == again  # order follows the seed, not the workers
    assert first != [b['index'].tolist() for b in D.build_loader(ds, 4, train=True, workers=0, seed=4)]
    assert [b['index'].tolist() for b in D.build_loader(ds, 5, train=False, workers=0)][-1] == [15]


def test_distributed_sampler(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        ds = D.build_dataset('synthetic', 'val', input_size=32, num_samples=10)
        loader = D.build_loader(ds, 4, train=True, workers=0, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert sum(len(b['index']) for b in loader) == 8
    finally:
        dist.destroy_process_group()


def test_fake_release_and_throughput(tmp_path):
    refs = D.fake_refer_release(str(tmp_path), 'refcocog_u', n_images=3, refs_per_image=2, size=(60, 80))
    assert len(refs) == 6
    ds = build('refcocog_u', 'train', root=str(tmp_path), input_size=32, mode='test')
    kinds = {type(D._read_refer(str(tmp_path), 'refcocog_u', 'train')[0]['segmentation']).__name__}
    assert len(ds) == 2 and kinds <= {'list', 'dict'} and ds[0]['orig_mask'].sum() > 0
    rate = D.loader_throughput(ds, 0, 2, 3)
    assert rate > 0
