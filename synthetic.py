"""
A synthetic referring dataset: procedural scenes of 2-5 coloured shapes, and sentences that pick out one of them by
colour, shape, size or place next to another object ("the small red circle left of the blue square"), so that only
language tells which. dataset.SyntheticRefDataset turns the scenes into the same samples as dataset.RefDataset, so
ETRIS trains and evaluates on them anywhere, without downloads, in minutes (demo.py). Not part of the paper.
"""
import math
import random

import cv2
import numpy as np

_SHAPES = ('circle', 'square', 'triangle')
_COLOURS = {'red': (215, 35, 35), 'green': (40, 175, 60), 'blue': (45, 75, 225),
            'yellow': (235, 210, 40), 'purple': (150, 60, 190), 'white': (235, 235, 235)}
_COLOUR_NAMES = tuple(_COLOURS)
# where an object lies relative to a reference, in units of the image side: beyond _CLEAR it
# clearly does, within _UNCLEAR it clearly does not; anything between makes the phrase ambiguous
_CLEAR, _UNCLEAR = 0.12, 0.04


def _np(obj, keys, noun=None):
    """Noun phrase of an object restricted to the attributes `keys`: 'small red circle', 'red shape'."""
    words = [obj[k] for k in ('size', 'colour') if k in keys]
    return ' '.join(words + [obj['shape'] if 'shape' in keys else (noun or 'shape')])


def _matching(objs, keys, obj):
    return [o for o in objs if all(o[k] == obj[k] for k in keys)]


_FILTERS = [(), ('shape',), ('colour',), ('colour', 'shape'), ('size', 'shape'), ('size', 'colour'),
            ('size', 'colour', 'shape')]
_SIDES = {'left': ('cx', -1, 'left of'), 'right': ('cx', 1, 'right of'), 'top': ('cy', -1, 'above'),
          'bottom': ('cy', 1, 'below')}


def _expressions(objs, t, side, rnd):
    """Every phrase this generator can say that picks out objs[t] and no other object, by kind: 'attribute'
    ("the small red circle"), 'size' ("the largest circle") and 'relation' ("the circle left of the blue
    square"). No phrase places the target within its own group ("the leftmost circle"): the demo's tiny model
    learns that kind far more slowly than the others (docs/demo.md), and relations already say where things are."""
    tgt, out = objs[t], {'attribute': [], 'size': [], 'relation': []}
    unique = {}  # the shortest unique description of each object, used for anchors
    for keys in _FILTERS[1:]:
        for i, o in enumerate(objs):
            if i not in unique and _matching(objs, keys, o) == [o]:
                unique[i] = keys
    for keys in _FILTERS[1:]:
        if _matching(objs, keys, tgt) == [tgt]:
            out['attribute'].append(f"the {_np(tgt, keys, rnd.choice(('shape', 'object', 'one')))}")
    for keys in _FILTERS[:3]:
        group = _matching(objs, keys, tgt)
        if len(group) < 2:
            continue
        others = [o for o in group if o is not tgt]
        noun = _np(tgt, keys)
        if tgt['area'] >= 1.5 * max(o['area'] for o in others):
            out['size'].append(f"the {rnd.choice(('largest', 'biggest'))} {noun}")
        if 1.5 * tgt['area'] <= min(o['area'] for o in others):
            out['size'].append(f"the smallest {noun}")
    for a, akeys in unique.items():
        if a == t:
            continue
        anchor = objs[a]
        for keys in _FILTERS[:4]:
            group = [o for o in _matching(objs, keys, tgt) if o is not anchor]
            for axis, sign, rel in _SIDES.values():
                d = [sign * (o[axis] - anchor[axis]) for o in group]
                yes = [o for o, v in zip(group, d) if v > _CLEAR * side]
                unclear = [v for v in d if _UNCLEAR * side < v <= _CLEAR * side]
                if yes == [tgt] and not unclear:
                    out['relation'].append(f"the {_np(tgt, keys)} {rel} the {_np(anchor, akeys)}")
    return {kind: list(dict.fromkeys(phrases)) for kind, phrases in out.items()}


def _pick_sentences(by_kind, n, rnd):
    """Up to n distinct phrases: the kinds in turn (in a random order), a random phrase of each. Drawn over all
    phrases alike, most sentences would be relations, since every anchor, side and noun gives one."""
    pools = [list(p) for p in by_kind.values() if p]
    rnd.shuffle(pools)
    picked = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop(rnd.randrange(len(pool))))
    return picked


def _draw(canvas, obj, value):
    cx, cy, r = obj['cx'], obj['cy'], obj['r']
    if obj['shape'] == 'circle':
        cv2.circle(canvas, (cx, cy), r, value, -1)
    elif obj['shape'] == 'square':
        a = int(round(.85 * r))
        cv2.rectangle(canvas, (cx - a, cy - a), (cx + a, cy + a), value, -1)
    else:
        ang = -np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([cx + 1.15 * r * np.cos(ang), cy + 1.15 * r * np.sin(ang)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], value)


def synthetic_scene(seed, split, index):
    """One synthetic referring scene, a pure function of (seed, split, index).

    Returns dict(image uint8 RGB [h,w,3], objects: list of dict(shape, colour, size, cx, cy, r, area,
    mask uint8 {0,1}), target: index into objects, sentences: 2-3 phrases that each pick out the target
    and no other object).
    """
    # Python's RNG for the many scalar draws (numpy's per-call overhead dominated); str seeds are
    # hashed with SHA-512, so scenes do not depend on PYTHONHASHSEED
    rnd = random.Random(f"synthetic-{seed}-{split}-{index}")
    while True:
        h, w = rnd.randint(96, 128), rnd.randint(96, 128)
        side = min(h, w)
        n = rnd.choices((2, 3, 4, 5), (1, 3, 3, 3))[0]
        objs = []
        for _ in range(50 * n):
            if len(objs) == n:
                break
            size = 'large' if rnd.random() < .4 else 'small'
            # objects span several 8-px patches of the demo's 64-px input, so that its masks are not bound by the grid
            r = round(side * (rnd.uniform(.18, .24) if size == 'large' else rnd.uniform(.1, .13)))
            cx, cy = rnd.randint(r + 2, w - r - 3), rnd.randint(r + 2, h - r - 3)
            if all(math.hypot(cx - o['cx'], cy - o['cy']) > 1.25 * (r + o['r']) + 2 for o in objs):
                objs.append(dict(shape=rnd.choice(_SHAPES), colour=rnd.choice(_COLOUR_NAMES),
                                 size=size, cx=cx, cy=cy, r=r))
        if len(objs) < 2:
            continue
        labels = np.zeros((h, w), np.uint8)  # objects never overlap, so one label map holds every mask
        for i, o in enumerate(objs):
            _draw(labels, o, i + 1)
        for i, o in enumerate(objs):
            o['mask'] = (labels == i + 1).view(np.uint8)
            o['area'] = int(np.count_nonzero(o['mask']))
        order = list(range(len(objs)))
        rnd.shuffle(order)
        for t in order:
            by_kind = _expressions(objs, t, side, rnd)
            if sum(map(len, by_kind.values())) >= 2:
                break
        else:
            continue
        sentences = _pick_sentences(by_kind, rnd.randint(2, 3), rnd)
        # a flat background with a little noise and per-object colour jitter: colour words stay exact
        noise = np.random.default_rng(rnd.getrandbits(64)).integers(-6, 7, (h, w, 1), dtype=np.int16)
        img = np.clip(np.array([rnd.randint(60, 119) for _ in range(3)], np.int16) + noise, 0, 255).astype(np.uint8)
        for o in objs:  # drawn with the very call that drew its mask: pixel-exact
            _draw(img, o, [min(255, max(0, c + rnd.randint(-20, 20))) for c in _COLOURS[o['colour']]])
        return dict(image=img, objects=objs, target=t, sentences=sentences)
