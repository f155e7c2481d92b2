"""Tests for the synthetic referring dataset: deterministic, exact masks, unambiguous phrases, balanced phrase kinds,
language needed."""
import collections
import random

import cv2
import numpy as np
import pytest
import torch

import dataset as D
import synthetic as S
from tokenizer import tokenize

SIDES = {'left': ('cx', -1), 'right': ('cx', 1), 'top': ('cy', -1), 'bottom': ('cy', 1)}
RELATIONS = {'left of': 'left', 'right of': 'right', 'above': 'top', 'below': 'bottom'}


def _filter(objs, words):
    """Objects an attribute phrase ('small red circle', 'blue shape', 'one') describes."""
    out = objs
    for word in words:
        if word in ('small', 'large'):
            out = [o for o in out if o['size'] == word]
        elif word in S._COLOURS:
            out = [o for o in out if o['colour'] == word]
        elif word in S._SHAPES:
            out = [o for o in out if o['shape'] == word]
        else:
            assert word in ('shape', 'object', 'one'), word
    return out


def referents(phrase, objs, side):
    """An independent reading of the generator's phrase grammar: the objects a phrase picks out."""
    assert phrase.startswith('the ')
    for rel, where in RELATIONS.items():
        if f' {rel} the ' in phrase:
            head, tail = phrase.split(f' {rel} the ')
            anchors = referents('the ' + tail, objs, side)
            assert len(anchors) == 1, phrase
            axis, sign = SIDES[where]
            cands = [o for o in _filter(objs, head.split()[1:]) if o is not anchors[0]]
            offs = [sign * (o[axis] - anchors[0][axis]) for o in cands]
            if any(.04 * side < d <= .12 * side for d in offs):
                return cands  # someone is borderline: ambiguous
            return [o for o, d in zip(cands, offs) if d > .12 * side]
    words = phrase.split()[1:]
    if words[0] in ('largest', 'biggest', 'smallest'):
        group = sorted(_filter(objs, words[1:]), key=lambda o: int(o['mask'].sum()), reverse=words[0] != 'smallest')
        a = [int(o['mask'].sum()) for o in group]
        clear = len(group) >= 2 and (a[0] >= 1.5 * a[1] if words[0] != 'smallest' else 1.5 * a[0] <= a[1])
        return group[:1] if clear else group
    return _filter(objs, words)


def sentence_kind(phrase):
    if any(f' {r} the ' in phrase for r in RELATIONS):
        return 'relation'
    return 'size' if phrase.split()[1] in ('largest', 'biggest', 'smallest') else 'attribute'


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_deterministic_and_varied():
    a, b = S.synthetic_scene(0, 'train', 5), S.synthetic_scene(0, 'train', 5)
    assert np.array_equal(a['image'], b['image']) and a['sentences'] == b['sentences'] and a['target'] == b['target']
    others = [S.synthetic_scene(0, 'val', 5), S.synthetic_scene(1, 'train', 5), S.synthetic_scene(0, 'train', 6)]
    assert all(o['image'].shape != a['image'].shape or not np.array_equal(o['image'], a['image']) for o in others)
    ds1 = D.build_dataset('synthetic', 'train', input_size=64, seed=2, mode='test')
    ds2 = D.build_dataset('synthetic', 'train', input_size=64, seed=2, mode='test')
    assert torch.equal(ds1[7]['image'], ds2[7]['image']) and ds1[7]['sentences'] == ds2[7]['sentences']
    assert len(ds1) == 2000 and len(D.build_dataset('synthetic', 'val')) == 200
    assert len(D.build_dataset('synthetic', 'test', num_samples=33)) == 33
    with pytest.raises(IndexError):
        ds1[2000]


def test_scenes_masks_and_phrases():
    sizes, kinds, n_objs = set(), collections.Counter(), set()
    for i in range(150):
        sc = S.synthetic_scene(0, 'val', i)
        img, objs = sc['image'], sc['objects']
        h, w = img.shape[:2]
        sizes.add((h, w))
        assert 96 <= h <= 128 and 96 <= w <= 128 and img.dtype == np.uint8
        assert 2 <= len(objs) <= 5 and 2 <= len(sc['sentences']) <= 3 and len(set(sc['sentences'])) == len(sc['sentences'])
        n_objs.add(len(objs))
        union = np.zeros((h, w), np.uint8)
        for o in objs:
            assert o['shape'] in S._SHAPES and o['colour'] in S._COLOURS and o['area'] == o['mask'].sum() > 0
            colours = img[o['mask'] > 0]
            assert (colours == colours[0]).all()  # one colour fills exactly its mask
            union += o['mask']
        assert union.max() == 1  # no overlaps: masks are exact
        # every object colour has a channel > 125, the background none: the painted pixels are the masks
        np.testing.assert_array_equal(img.max(2) > 125, union > 0)
        for s in sc['sentences']:
            assert referents(s, objs, min(h, w)) == [objs[sc['target']]], (s, sc['target'])
            kinds[sentence_kind(s)] += 1
            tokenize(s, 17)  # fits the word length without truncation
    assert len(sizes) > 50 and any(h != w for h, w in sizes) and n_objs == {2, 3, 4, 5}
    # the kinds are drawn in turn, so relations (the most numerous phrases) do not crowd out the others
    total = sum(kinds.values())
    assert set(kinds) == {'attribute', 'size', 'relation'} and kinds['size'] > 0.08 * total, kinds
    assert max(kinds.values()) < 0.5 * total, kinds


def test_pick_sentences_takes_kinds_in_turn():
    by_kind = {'attribute': ['the red one'], 'size': [], 'relation': [f'the circle left of the {c} square' for c in 'ab']}
    for seed in range(20):
        picked = S._pick_sentences(by_kind, 2, random.Random(seed))
        assert len(picked) == 2 and 'the red one' in picked  # one of each kind before a second relation
        every = S._pick_sentences(by_kind, 5, random.Random(seed))
        assert sorted(every) == sorted(by_kind['attribute'] + by_kind['relation'])


def test_sample_format_matches_real_data():
    ds = D.build_dataset('synthetic', 'val', input_size=96)
    assert ds.mode == 'val' and ds.word_len == 17
    s = ds[3]
    sc = ds.scene(3)
    target = sc['objects'][sc['target']]['mask']
    np.testing.assert_array_equal(s['orig_mask'], target)
    assert s['orig_size'] == target.shape and s['sentences'] == sc['sentences'][:1]
    mat, inv = D.letterbox_matrix(*target.shape, 96)
    np.testing.assert_array_equal(s['inverse'], inv)
    expect = cv2.warpAffine(target * np.uint8(255), mat, (96, 96), flags=cv2.INTER_LINEAR) / 255.
    assert torch.equal(s['mask'][0], torch.from_numpy(expect.astype(np.float32)))
    assert torch.equal(s['tokens'], tokenize(sc['sentences'][0], 17)[0])
    t = D.build_dataset('synthetic', 'val', input_size=96, mode='test')[3]
    assert t['tokens'].shape == (len(sc['sentences']), 17) and t['sentences'] == sc['sentences']
    batch = next(iter(D.build_loader(D.build_dataset('synthetic', 'train', input_size=96, num_samples=8), 4, 2)))
    assert batch['image'].shape == (4, 3, 96, 96) and batch['mask'].shape == (4, 1, 96, 96) and batch['tokens'].shape == (4, 17)
    direct = D.build_dataset('synthetic', 'train', input_size=96, num_samples=8)[int(batch['index'][0])]
    assert torch.equal(batch['image'][0], direct['image'])  # workers generate the same scenes


def text_blind_baselines(n_train=300, n_val=200, seed=0):
    """Mean IoU on val of guesses that ignore the sentence; positions learned from the train targets."""
    cents = np.array([[o['cy'] / sc['image'].shape[0], o['cx'] / sc['image'].shape[1]]
                      for sc in (S.synthetic_scene(seed, 'train', i) for i in range(n_train))
                      for o in [sc['objects'][sc['target']]]])
    hist, ye, xe = np.histogram2d(cents[:, 0], cents[:, 1], bins=6, range=[[0, 1], [0, 1]])
    iy, ix = np.unravel_index(hist.argmax(), hist.shape)
    mode = ((ye[iy] + ye[iy + 1]) / 2, (xe[ix] + xe[ix + 1]) / 2)
    res = {'largest object': [], 'union of objects': []}
    radii = (.1, .2, .3)
    for r in radii:
        res[f'central blob r={r}'], res[f'most common position r={r}'] = [], []
    for i in range(n_val):
        sc = S.synthetic_scene(seed, 'val', i)
        objs, gt = sc['objects'], sc['objects'][sc['target']]['mask']
        h, w = gt.shape
        res['largest object'].append(_iou(max(objs, key=lambda o: o['area'])['mask'], gt))
        res['union of objects'].append(_iou(sum(o['mask'] for o in objs), gt))
        for r in radii:
            for name, (cy, cx) in ((f'central blob r={r}', (.5, .5)), (f'most common position r={r}', mode)):
                blob = np.zeros((h, w), np.uint8)
                cv2.circle(blob, (int(cx * w), int(cy * h)), int(r * min(h, w)), 1, -1)
                res[name].append(_iou(blob, gt))
    return {k: float(np.mean(v)) for k, v in res.items()}


def test_language_is_needed():
    base = text_blind_baselines()
    print('text-blind mIoU on synthetic val:', {k: round(v, 3) for k, v in base.items()})
    assert all(v < 0.4 for v in base.values()) and max(base.values()) <= 0.35, base
    assert base['largest object'] > 0.1  # the guesses are real guesses (they do hit sometimes)
