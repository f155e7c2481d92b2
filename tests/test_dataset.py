"""Tests for dataset.py: both layouts, the authors' transform and samples, bad data, prepare, the loader."""
import json
import os
import pickle
import warnings

import cv2
import numpy as np
import pytest
import torch

import coco_mask as M
import dataset as D
from prepare import main as prepare_main, prepare
from fake_refer import fake_refer_release
from test_coco_mask import rect, rect_counts
from errors import UserError
from tokenizer import tokenize

H, W = 48, 64  # fixture images: small and not square, so the letterbox pads


# ----------------------------------------------------------------------------- fixtures


# annotation id -> (segmentation, expected mask)
def _fixture_anns():
    tri = np.zeros((H, W), np.uint8)
    for r in range(9):
        tri[30 + r, 40:40 + 9 - r] = 1  # polygon (40,30),(50,30),(40,40): pixel centres strictly inside
    return {
        1: ([[4, 5, 20, 5, 20, 15, 4, 15]], rect(H, W, 5, 15, 4, 20)),
        2: ([[4, 5, 20, 5, 20, 15, 4, 15], [40, 30, 50, 30, 40, 40]], rect(H, W, 5, 15, 4, 20) | tri),
        3: ({'size': [H, W], 'counts': M.rle_to_string(rect_counts(H, W, 10, 20, 30, 40))}, rect(H, W, 10, 20, 30, 40)),
        4: ({'size': [H, W], 'counts': rect_counts(H, W, 0, 48, 60, 64)}, rect(H, W, 0, 48, 60, 64)),
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
    with pytest.raises(UserError, match="valid: refcoco, refcoco\\+, refcocog_u, refcocog_g, synthetic"):
        D.build_dataset('refclef', 'train', root=refer_root)
    with pytest.raises(UserError, match="valid: train, val$"):
        D.build_dataset('refcocog_g', 'test', root=refer_root)
    with pytest.raises(UserError, match="testA, testB"):
        D.build_dataset('refcoco', 'testC', root=refer_root)
    with pytest.raises(UserError, match="mode"):
        D.build_dataset('synthetic', 'val', mode='eval')
    with pytest.raises(UserError, match="root"):
        D.build_dataset('refcoco', 'val')


def test_missing_root_says_what_to_download(tmp_path):
    with pytest.raises(UserError, match=r"refcocog\.zip.*train2014\.zip"):
        D.build_dataset('refcocog_u', 'val', root=str(tmp_path))
    with pytest.raises(UserError, match=r"refs\(google\)\.p"):
        D.build_dataset('refcocog_g', 'val', root=str(tmp_path))


def test_split_size_warning_names_expected_and_found(refer_root):
    with pytest.warns(UserWarning, match="refcoco train: expected 42404 refs.*found 2"):
        D.build_dataset('refcoco', 'train', root=refer_root)


# ----------------------------------------------------------------------------- COCO masks


def test_fixture_masks_decode():
    for seg, expected in _fixture_anns().values():
        np.testing.assert_array_equal(M.segmentation_to_mask(seg, H, W), expected)


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
    with pytest.raises(UserError, match=r"refusing to load (posix|os)\.system"):
        D.load_refs_pickle(path)
    with pytest.raises(UserError, match="refs\\(unc\\).p"):
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
    with pytest.raises(UserError, match="train2014.zip"):
        build('refcoco', 'val', root=root)


def test_transform_equals_authors(refer_root):
    for mode in ('train', 'val'):
        ds = build('refcoco', 'train', root=refer_root, input_size=80, mode=mode)
        for i in range(len(ds)):
            s, rec = ds[i], ds.records[i]
            m255 = M.segmentation_to_mask(rec['segmentation'], H, W) * np.uint8(255)
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
    prepare(refer_root, 'refcoco', out)
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
    prepare(refer_root, 'refcoco', out)
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
    mask = rect(30, 40, 3, 9, 5, 25) * np.uint8(255)
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
    with pytest.raises(UserError, match=r"ref 100 \(annotation 1\): image file .*000000000011.jpg is missing"):
        build('refcoco', 'train', root=refer_root)
    with pytest.warns(UserWarning, match="skipped 1 bad refs of 2"):
        ds = D.build_dataset('refcoco', 'train', root=refer_root, skip_bad=True)
    assert len(ds) == 1 and ds.bad_samples[0]['ref_id'] == 100 and '000000000011.jpg' in ds.bad_samples[0]['error']


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_corrupt_image_found_when_built(refer_root):
    path = os.path.join(refer_root, 'images', 'train2014', 'COCO_train2014_000000000011.jpg')
    with open(path, 'wb') as f:
        f.write(b'not a jpeg at all')
    with pytest.raises(UserError, match=r"ref 100 \(annotation 1\): image file .*000000000011.jpg is neither a JPEG"):
        build('refcoco', 'train', root=refer_root)
    ds = build('refcoco', 'train', root=refer_root, skip_bad=True, mode='test')
    s = ds[0]
    assert s['index'] == 0 and s['ref_id'] == 101 and len(ds) == 1 and ds.bad_samples[0]['ref_id'] == 100


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_missing_annotation_and_empty_sentence(tmp_path):
    root = str(tmp_path / 'r')
    refs = write_refer(root)
    refs[0]['ann_id'] = 999
    refs[1]['sentences'][0]['sent'] = '   '
    with open(os.path.join(root, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(UserError, match="ref 100 points at annotation 999"):
        build('refcoco', 'train', root=root)
    with pytest.warns(UserWarning, match="skipped 2 bad refs of 2"):
        with pytest.raises(UserError, match="no usable refs"):
            D.build_dataset('refcoco', 'train', root=root, skip_bad=True)
    refs[0]['ann_id'] = 1
    with open(os.path.join(root, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(UserError, match=r"ref 101 \(annotation 2\) has an empty sentence in .*refs\(unc\)\.p"):
        build('refcoco', 'train', root=root)
    ds = build('refcoco', 'train', root=root, skip_bad=True)
    assert len(ds) == 1 and [b['ref_id'] for b in ds.bad_samples] == [101]


def test_bad_masks_in_prepared_folder(refer_root, tmp_path):
    out = str(tmp_path / 'prep')
    prepare(refer_root, 'refcoco', out)
    with open(os.path.join(out, 'masks', 'refcoco', '101.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n broken')
    with pytest.raises(UserError, match="ref 101: mask file .*101.png is a truncated PNG"):
        build('refcoco', 'train', root=out)
    ds = build('refcoco', 'train', root=out, skip_bad=True)
    assert [b['ref_id'] for b in ds.bad_samples] == [101] and [r['ref_id'] for r in ds.records] == [100]
    os.remove(os.path.join(out, 'masks', 'refcoco', '100.png'))
    with pytest.raises(UserError, match="ref 100: mask file .*100.png is missing"):
        build('refcoco', 'train', root=out)


def test_corrupt_rle_names_ref(tmp_path):
    root = str(tmp_path / 'r')
    write_refer(root)
    path = os.path.join(root, 'refcoco', 'instances.json')
    inst = json.load(open(path))
    inst['annotations'][2]['segmentation']['counts'] = 'T'
    json.dump(inst, open(path, 'w'))
    with pytest.raises(UserError, match=r"ref 102 \(annotation 3\): bad segmentation .*corrupt compressed RLE"):
        build('refcoco', 'val', root=root)


# ----------------------------------------------------------------------------- collate, loaders

def test_collate_and_loader(refer_root):
    train = build('refcoco', 'train', root=refer_root, input_size=64)
    batch = next(iter(D.build_loader(train, 2)))
    assert batch['image'].shape == (2, 3, 64, 64) and batch['mask'].shape == (2, 1, 64, 64)
    assert batch['tokens'].shape == (2, 17) and batch['index'].dtype == torch.int64
    assert sorted(batch['ref_id'].tolist()) == [100, 101]
    test = build('refcoco', 'train', root=refer_root, input_size=64, mode='test')
    loader = D.build_loader(test, 2)
    batch = next(iter(loader))
    assert [t.shape for t in batch['tokens']] == [(3, 17), (1, 17)] and batch['orig_size'] == [(H, W), (H, W)]
    assert isinstance(batch['inverse'], list) and isinstance(batch['orig_mask'], list) and batch['index'].tolist() == [0, 1]
    assert batch['sentences'][1] == ['two parts']
    val = build('refcoco', 'train', root=refer_root, input_size=64, mode='val')
    batch = D.collate([val[0], val[1]])
    assert batch['tokens'].shape == (2, 17) and batch['sentences'] == [['the left thing'], ['two parts']]


def test_loader_reads_its_shard_in_order():
    ds = D.build_dataset('synthetic', 'val', input_size=32, num_samples=16)
    loader = D.build_loader(ds, 4, workers=2)
    assert loader.persistent_workers and loader.num_workers == 2
    assert [b['index'].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    shards = [sum((b['index'].tolist() for b in D.build_loader(ds, 5, shard=(r, 3))), []) for r in range(3)]
    assert shards == [[0, 3, 6, 9, 12, 15], [1, 4, 7, 10, 13], [2, 5, 8, 11, 14]]  # no padding: each once
    order = [5, 2, 9]
    assert [b['index'].tolist() for b in D.build_loader(ds, 2, sampler=order)] == [[5, 2], [9]]


def test_fake_release_and_throughput(tmp_path):
    refs = fake_refer_release(str(tmp_path), 'refcocog_u', n_images=3, refs_per_image=2, size=(60, 80))
    assert len(refs) == 6
    ds = build('refcocog_u', 'train', root=str(tmp_path), input_size=32, mode='test')
    kinds = {type(D._read_refer(str(tmp_path), 'refcocog_u', 'train')[0]['segmentation']).__name__}
    assert len(ds) == 2 and kinds <= {'list', 'dict'} and ds[0]['orig_mask'].sum() > 0


# ----------------------------------------------------------------------------- bad data: truncated files

def _encoded(ext, h=H, w=W, seed=1):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    return cv2.imencode(ext, img)[1].tobytes()


def _truncate(path, keep=0.5):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])


def test_image_file_checks(tmp_path):
    for ext, truncated in (('.jpg', 'truncated JPEG'), ('.png', 'truncated PNG')):
        data = _encoded(ext)
        path = str(tmp_path / f'a{ext}')
        with open(path, 'wb') as f:
            f.write(data)
        D.check_image_file(path)
        np.testing.assert_array_equal(D.read_image_file(path), cv2.imread(path))
        # padding or a trailer after the end marker is tolerated and decodes the same
        with open(path, 'ab') as f:
            f.write(b'\0' * 1000)
        D.check_image_file(path)
        np.testing.assert_array_equal(D.read_image_file(path), cv2.imread(path))
        for cut in (len(data) // 2, len(data) - 1):  # half the file, or only the last byte, missing
            with open(path, 'wb') as f:
                f.write(data[:cut])
            with pytest.raises(ValueError, match=f"{path} is a {truncated}"):
                D.check_image_file(path)
            with pytest.raises(ValueError, match=f"{path} is a {truncated}"):
                D.read_image_file(path)
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match="empty.jpg is empty"):
        D.check_image_file(str(empty))
    junk = tmp_path / 'junk.jpg'
    junk.write_bytes(b'not a jpeg at all')
    with pytest.raises(ValueError, match="neither a JPEG nor a PNG"):
        D.check_image_file(str(junk))
    D.check_image_file(str(junk), any_format=True)  # other formats are left to the decoder
    with pytest.raises(ValueError, match="junk.jpg could not be decoded"):
        D.read_image_file(str(junk), any_format=True)
    bmp = str(tmp_path / 'b.bmp')
    cv2.imwrite(bmp, np.full((4, 5, 3), 9, np.uint8))
    assert D.read_image_file(bmp, any_format=True).shape == (4, 5, 3)


IMG11 = ('images', 'train2014', 'COCO_train2014_000000000011.jpg')


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_truncated_image_found_when_built(refer_root):
    path = os.path.join(refer_root, *IMG11)
    good = build('refcoco', 'train', root=refer_root, input_size=64, mode='test')[1]
    _truncate(path)
    assert cv2.imread(path) is not None  # what made this silent: OpenCV decodes it, grey where data is missing
    with pytest.raises(UserError, match=r"ref 100 \(annotation 1\): image file .*000000000011\.jpg is a truncated "
                                         r"JPEG.*--skip-bad"):
        build('refcoco', 'train', root=refer_root)
    for mode in ('train', 'val', 'test'):
        with pytest.warns(UserWarning, match="skipped 1 bad refs of 2"):
            ds = D.build_dataset('refcoco', 'train', root=refer_root, input_size=64, mode=mode, skip_bad=True)
        assert [r['ref_id'] for r in ds.records] == [101]
        assert [{k: b[k] for k in ('ref_id', 'ann_id', 'file')} for b in ds.bad_samples] == \
            [{'ref_id': 100, 'ann_id': 1, 'file': path}]
        assert 'truncated JPEG' in ds.bad_samples[0]['error']
    np.testing.assert_array_equal(ds[0]['orig_mask'], good['orig_mask'])
    # a file shared by several refs makes each of them bad
    with pytest.warns(UserWarning, match="skipped 2 bad refs of 2"), pytest.raises(UserError, match="no usable refs"):
        D.build_dataset('refcoco', 'testB', root=refer_root, skip_bad=True)


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_file_gone_bad_after_build_val_test_not_replaced(refer_root):
    path = os.path.join(refer_root, *IMG11)
    for mode in ('val', 'test'):
        ds = build('refcoco', 'train', root=refer_root, input_size=64, mode=mode, skip_bad=True)
        strict = build('refcoco', 'train', root=refer_root, input_size=64, mode=mode)
        data = open(path, 'rb').read()
        _truncate(path)
        try:
            with pytest.raises(D.BadSampleError, match=r"ref 100 \(annotation 1\): image .*000000000011\.jpg is a "
                                                       r"truncated JPEG.*download COCO train2014 again.*--skip-bad"):
                strict[0]
            with pytest.warns(UserWarning, match="skipping bad sample"):
                placeholder = ds[0]
            # not replaced by the next sample: evaluation would count that one twice
            assert set(placeholder) == {'bad_samples'}
            (entry,) = placeholder['bad_samples']
            assert {k: entry[k] for k in ('ref_id', 'ann_id', 'file', 'index')} == \
                {'ref_id': 100, 'ann_id': 1, 'file': path, 'index': 0}
            assert 'truncated JPEG' in entry['error'] and '--skip-bad' not in entry['error']
            batch = D.collate([placeholder, ds[1]])
            assert batch['index'].tolist() == [1] and batch['ref_id'].tolist() == [101]
            assert [b['ref_id'] for b in batch['bad_samples']] == [100] and len(batch['orig_mask']) == 1
            assert D.collate([placeholder]) == {'bad_samples': [entry]}
            assert 'bad_samples' not in D.collate([ds[1]])
            assert ds.bad_samples == []  # load-time findings travel with the batch, not in a worker's copy
        finally:
            with open(path, 'wb') as f:
                f.write(data)


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_bad_samples_reach_the_main_process_from_workers(refer_root):
    ds = build('refcoco', 'train', root=refer_root, input_size=64, mode='test', skip_bad=True)
    _truncate(os.path.join(refer_root, *IMG11))
    batches = list(D.build_loader(ds, 2, workers=1))
    assert len(batches) == 1 and batches[0]['index'].tolist() == [1]
    assert [(b['ref_id'], b['index']) for b in batches[0]['bad_samples']] == [(100, 0)]


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
def test_file_gone_bad_after_build_train_replaced(refer_root):
    ds = build('refcoco', 'train', root=refer_root, input_size=64, skip_bad=True)
    _truncate(os.path.join(refer_root, *IMG11))
    with pytest.warns(UserWarning, match="skipping bad sample"):
        s = ds[0]
    assert s['index'] == 1 and s['ref_id'] == 101 and s['mask'].shape == (1, 64, 64)
    assert [b['ref_id'] for b in s['bad_samples']] == [100]
    batch = D.collate([s, ds[1]])
    assert batch['index'].tolist() == [1, 1] and [b['index'] for b in batch['bad_samples']] == [0]
    assert set(batch) == {'image', 'tokens', 'mask', 'ref_id', 'index', 'bad_samples'}


def test_truncated_mask_in_prepared_folder(refer_root, tmp_path):
    out = str(tmp_path / 'prep')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prepare(refer_root, 'refcoco', out)
    mask = os.path.join(out, 'masks', 'refcoco', '101.png')
    _truncate(mask, 0.9)
    with pytest.raises(UserError, match=r"ref 101: mask file .*101\.png is a truncated PNG.*prepare"):
        build('refcoco', 'train', root=out)
    assert [b['ref_id'] for b in build('refcoco', 'train', root=out, skip_bad=True).bad_samples] == [101]
    # prepare rewrites a truncated mask (a complete one is kept, as before)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prepare(refer_root, 'refcoco', out)
    D.check_image_file(mask)
    assert len(build('refcoco', 'train', root=out)) == 2


# ----------------------------------------------------------------------------- bad data: degenerate polygons



def _write_segmentations(root, segs):
    """Replace the fixture annotations' segmentations (annotation id -> segmentation)."""
    path = os.path.join(root, 'refcoco', 'instances.json')
    inst = json.load(open(path))
    for a in inst['annotations']:
        if a['id'] in segs:
            a['segmentation'] = segs[a['id']]
    json.dump(inst, open(path, 'w'))
    return path


@pytest.mark.filterwarnings("ignore:.*refs \\(the paper's split\\)")
@pytest.mark.parametrize('seg', [[], [[]], [[5, 6]], [[4, 5, 20, 15]], [[4, 5, 20, 15], [1, 1, 3, 3]],
                                 [[4, 5, 9, 9], [4, 5, 20, 5, 20, 15]], [[4, 5, 20, 5, 20, float('nan')]],
                                 {'size': [H, W], 'counts': 'T'}, {'size': [H + 1, W], 'counts': [H * W + W]}])
def test_bad_segmentation_names_ref_and_annotation(tmp_path, seg):
    root = str(tmp_path / 'r')
    write_refer(root)
    inst = _write_segmentations(root, {2: seg})
    if seg == [[4, 5, 9, 9], [4, 5, 20, 5, 20, 15]]:  # a 2-point part before a real polygon: ignored
        m = build('refcoco', 'train', root=root, mode='test')[1]['orig_mask']
        np.testing.assert_array_equal(m, M.segmentation_to_mask([[4, 5, 20, 5, 20, 15]], H, W))
        return
    with pytest.raises(UserError, match=rf"ref 101 \(annotation 2\): bad segmentation in {inst}"):
        build('refcoco', 'train', root=root)
    ds = build('refcoco', 'train', root=root, skip_bad=True)
    assert [r['ref_id'] for r in ds.records] == [100]
    assert [(b['ref_id'], b['ann_id'], b['file']) for b in ds.bad_samples] == [(101, 2, inst)]
    with pytest.raises(UserError, match=r"ref 101 \(annotation 2\): bad segmentation"):
        prepare(root, 'refcoco', str(tmp_path / 'prep'))


# ----------------------------------------------------------------------------- bad data: prepare, split sizes

def test_prepare_skip_bad_and_split_sizes(tmp_path, capsys):
    root, out = str(tmp_path / 'r'), str(tmp_path / 'prep')
    write_refer(root)
    _write_segmentations(root, {2: [[]]})  # ref 101 (train)
    _truncate(os.path.join(root, 'images', 'train2014', 'COCO_train2014_000000000010.jpg'))  # refs 101, 103
    with pytest.raises(UserError, match=r"ref 101 \(annotation 2\)"):
        prepare_main(['--root', root, '--data', 'refcoco', '--out', out])
    capsys.readouterr()
    bad = prepare_main(['--root', root, '--data', 'refcoco', '--out', out, '--skip-bad'])
    printed = capsys.readouterr().out
    assert [(b['split'], b['ref_id'], b['ann_id']) for b in bad] == [('train', 101, 2), ('testA', 103, 4)]
    for split, found, published in (('train', 2, 42404), ('val', 1, 3811), ('testA', 2, 1975), ('testB', 2, 1810)):
        assert f"refcoco {split}: found {found} refs, published {published}" in printed
    assert "refcoco: skipped 2 bad refs (no json entry, no mask):\n  train: ref 101 (annotation 2): image file" in printed
    assert "\n  testA: ref 103 (annotation 4): image file" in printed
    ids = {s: [it['segment_id'] for it in json.load(open(os.path.join(out, 'anns', 'refcoco', f'{s}.json')))]
           for s in ('train', 'val', 'testA', 'testB')}
    assert ids == {'train': [100], 'val': [102], 'testA': [105], 'testB': [104, 105]}
    assert sorted(os.listdir(os.path.join(out, 'masks', 'refcoco'))) == ['100.png', '102.png', '104.png', '105.png']


def test_split_sizes_printed_when_built(refer_root, capsys):
    build('refcoco', 'train', root=refer_root)
    assert capsys.readouterr().out == (f"refcoco train: found 2 refs, published 42404: 42402 fewer, not the paper's "
                                       f"split ({refer_root}, refer layout)\n")
    assert D._split_size_line('refcoco', 'val', 3811, 'R') == \
        "refcoco val: found 3811 refs, published 3811: the paper's split (R)"
    assert D._split_size_line('refcoco+', 'testB', 1800, 'R').endswith("1798: 2 more, not the paper's split (R)")
