"""
COCO masks without pycocotools: the run-length encoding (compressed strings and count lists) and the polygon scan
conversion of pycocotools' maskApi.c, written again with numpy, so that RefCOCO's REFER release can be read
directly. Masks equal pycocotools' (tests/test_dataset.py); the rule for degenerate polygons is
segmentation_to_mask's.
"""
import numpy as np


def _poly_to_rle(xy, h, w):
    """RLE counts of one polygon [x0,y0,x1,y1,...], by pycocotools' rleFrPoly scan conversion.

    The boundary is traced at 5x resolution, one y-crossing is kept per pixel column whose centre it
    passes, and the sorted crossings (column-major positions) become the run lengths.
    """
    scale = 5.
    pts = np.asarray(xy, np.float64)
    pts = pts[:len(pts) // 2 * 2].reshape(-1, 2)  # an odd count drops its last number, as frPoly's int(n/2)
    x = np.trunc(scale * pts[:, 0] + .5).astype(np.int64)  # C's (int) cast truncates
    y = np.trunc(scale * pts[:, 1] + .5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(pts)):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:  # walk every edge in increasing major coordinate so rounding is symmetric
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            s = (ye - ys) / dx if dx else 0.  # dx == dy == 0: a repeated vertex, its one point is never used
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + .5).astype(np.int64))
        else:
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + .5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    step = u[1:] != u[:-1]
    u1, u0, v1, v0 = u[1:][step], u[:-1][step], v[1:][step], v[:-1][step]
    xd = (np.where(u1 < u0, u1, u1 - 1) + .5) / scale - .5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.ceil(np.clip((np.minimum(v1, v0) + .5) / scale - .5, 0, h))
    a = np.sort(np.append(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), h * w))
    a = np.diff(a, prepend=0).tolist()
    counts, j = [a[0]], 1
    while j < len(a):  # a zero gap means two toggles at one pixel: merge the runs around it
        if a[j] > 0:
            counts.append(a[j])
            j += 1
        else:
            j += 1
            if j < len(a):
                counts[-1] += a[j]
                j += 1
    return counts


def rle_from_string(s):
    """Counts of a COCO compressed RLE string (LEB128-like: 5 bits per char + continuation bit, chars 48..111;
    from the 4th count on, each value is stored as the difference to the count two before)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s) or not 48 <= ord(s[p]) <= 111:
                raise ValueError(f"corrupt compressed RLE string at char {p}: {s[:40]!r}")
            c = ord(s[p]) - 48
            x |= (c & 0x1f) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend negative differences
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x & 0xffffffff)  # C stores uint
    return counts


def rle_to_string(counts):
    """Inverse of rle_from_string (pycocotools' rleToString)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1f
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return ''.join(out)


def rle_decode(counts, h, w):
    """uint8 {0,1} [h,w] from column-major run lengths starting with a run of zeros."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"corrupt RLE: counts sum to {counts.sum()}, a {h}x{w} mask needs {h * w}")
    return np.repeat(np.arange(len(counts), dtype=np.uint8) % 2, counts).reshape(w, h).T.copy()


def rle_encode(mask):
    """Column-major run lengths of a binary [h,w] mask (pycocotools' rleEncode)."""
    flat = np.asarray(mask, bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    return [0] + counts if flat.size and flat[0] else counts


def _polygons(seg):
    """The parts of a COCO polygon list that have 3 or more points, as flat float64 arrays (the rule is in
    segmentation_to_mask's docstring)."""
    polys = []
    for i, part in enumerate(seg):
        try:
            xy = np.asarray(part, np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"polygon {i} is not a list of numbers: {str(part)[:60]}") from None
        if xy.ndim != 1:
            raise ValueError(f"polygon {i} is not a flat [x0, y0, x1, y1, ...] list: {str(part)[:60]}")
        if not np.isfinite(xy).all():
            raise ValueError(f"polygon {i} has a non-finite coordinate: {str(part)[:60]}")
        if len(xy) >= 6:
            polys.append(xy)
    if not polys:
        raise ValueError(f"no polygon of 3 or more points in {str(seg)[:80]}, so it covers no pixel "
                         "(parts such as [], [x, y] or [x0, y0, x1, y1] cover none)")
    return polys


def _rle_counts(seg, h, w):
    """The run lengths of a COCO RLE dict (compressed str/bytes or uncompressed list counts), checked."""
    if 'size' not in seg or 'counts' not in seg:
        raise ValueError(f"an RLE dict needs 'size' and 'counts', this one has {sorted(seg)}")
    try:
        rh, rw = (int(v) for v in seg['size'])
    except (TypeError, ValueError):
        raise ValueError(f"RLE size {str(seg['size'])[:40]} is not [height, width]") from None
    if (rh, rw) != (h, w):
        raise ValueError(f"RLE size {rh}x{rw} differs from the image's {h}x{w}")
    counts = seg['counts']
    if isinstance(counts, bytes):
        counts = counts.decode('ascii')
    if isinstance(counts, str):
        counts = rle_from_string(counts)
    try:
        counts = np.asarray(counts, np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"RLE counts are neither a string nor a list of integers: {str(counts)[:60]}") from None
    if counts.ndim != 1 or counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"corrupt RLE: counts sum to {counts.sum()}, a {h}x{w} mask needs {h * w}")
    return counts


def check_segmentation(seg, h, w):
    """Raise the ValueError that segmentation_to_mask(seg, h, w) would raise, without rasterising."""
    if isinstance(seg, dict):
        _rle_counts(seg, h, w)
    elif isinstance(seg, list):
        _polygons(seg)
    else:
        raise ValueError(f"segmentation is neither a polygon list nor an RLE dict: {str(seg)[:80]}")


def segmentation_to_mask(seg, h, w):
    """uint8 {0,1} [h,w] mask of a COCO `segmentation` (polygon list, or RLE dict with str or list counts).

    Equals pycocotools' frPyObjects + decode, with several polygons merged by union as REFER's getMask
    does (it sums them; the authors' png then holds 254 where two polygons of one object overlap).

    Degenerate polygon lists follow one rule: every part of 3 or more points is a polygon, every other
    part covers nothing, and a list with no polygon at all is a ValueError. In detail, with what
    pycocotools 2.0.11 (frPyObjects + decode + sum, as getMask) does:
      - an odd number of coordinates uses floor(n/2) points, the last number is dropped (pycocotools too);
      - a part of fewer than 3 points ([], [x, y], [x0, y0, x1, y1], 5 numbers) is ignored: pycocotools
        rasterises it to an empty mask when it reaches its polygon code, i.e. after a first part of more
        than 4 numbers; when such a part comes first, pycocotools fails ([] IndexError; [[]], [[x, y]]
        "input type is not supported"; 4 numbers TypeError: it takes a first entry of 4 numbers as an
        [x, y, w, h] box, which it only accepts as a numpy array, never from json). Here its place in the
        list does not matter, and 4 numbers are never a box;
      - no part of 3 or more points ([], [[]], [[x, y]], [[x, y, w, h]], [[1, 2, 3, 4, 5]]) is an error:
        the annotation outlines no area (pycocotools fails, or gives an empty mask for 5 numbers);
      - a non-finite coordinate is an error (pycocotools crashes the process), a non-numeric one too;
      - a polygon of 3 or more points that encloses no pixel centre (collinear, tiny, off the image)
        gives an empty mask, as pycocotools: that is the rasterisation, not malformed data.
    """
    if isinstance(seg, dict):
        return rle_decode(_rle_counts(seg, h, w), h, w)
    if not isinstance(seg, list):
        raise ValueError(f"segmentation is neither a polygon list nor an RLE dict: {str(seg)[:80]}")
    mask = np.zeros((h, w), np.uint8)
    for xy in _polygons(seg):
        mask |= rle_decode(_poly_to_rle(xy, h, w), h, w)
    return mask
