"""Tests for coco_mask.py: COCO masks equal pycocotools' (hand-built cases and counts strings pycocotools gave), the
compressed RLE strings, and the documented rule for degenerate polygons."""
import numpy as np
import pytest

import coco_mask as M

REAL = [2.5, 2, 12, 2.5, 13.5, 10, 2, 9.5]
REAL_COUNTS = '[17<1000000000000001O2N4Lo5'  # pycocotools 2.0.11 frPyObjects([REAL], 20, 24)


def rect_counts(h, w, r0, r1, c0, c1):
    """Column-major RLE counts of the rectangle rows r0..r1-1, cols c0..c1-1, built by hand."""
    counts, zeros = [], c0 * h + r0
    for _ in range(c0, c1):
        counts += [zeros, r1 - r0]
        zeros = h - (r1 - r0)
    counts.append(h * w - sum(counts))
    return counts


def rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def test_polygon_hand_cases():
    # integer rectangle covers exactly (x1-x0) x (y1-y0) pixels, at rows y0..y1-1, cols x0..x1-1
    np.testing.assert_array_equal(M.segmentation_to_mask([[2, 3, 12, 3, 12, 8, 2, 8]], 12, 16), rect(12, 16, 3, 8, 2, 12))
    np.testing.assert_array_equal(M.segmentation_to_mask([[1.5, 1.5, 6.5, 1.5, 6.5, 4.5, 1.5, 4.5]], 8, 8),
                                  rect(8, 8, 2, 5, 2, 7))
    # right triangle with legs 10: pixel (r, c) is in iff its centre is strictly inside, r + c <= 8 -> 45
    tri = M.segmentation_to_mask([[0, 0, 10, 0, 0, 10]], 12, 12)
    assert tri.sum() == 45 and tri.sum(1).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]
    # several polygons of one object merge by union (REFER sums them; overlaps count once)
    both = M.segmentation_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    np.testing.assert_array_equal(both, rect(8, 8, 0, 4, 0, 4) | rect(8, 8, 2, 6, 2, 6))
    # clipped to the image; a repeated vertex changes nothing
    assert M.segmentation_to_mask([[-3, -2, 20, -1, 20, 15, -2, 14]], 12, 16).sum() == 192
    assert M.segmentation_to_mask([[3, 3, 3, 3, 8, 3, 8, 8, 3, 8]], 12, 12).sum() == 25
    # 4 numbers are a 2-point part, not an [x, y, w, h] box: pycocotools takes boxes only as numpy arrays (from
    # a json list its frPyObjects raises TypeError), so a lone one is an error rather than a silent box
    with pytest.raises(ValueError, match="no polygon of 3 or more points"):
        M.segmentation_to_mask([[10.5, 20.25, 100.0, 50.5]], 480, 640)


def test_polygon_counts_equal_pycocotools():
    # (h, w, polygon, counts string that pycocotools 2.0 frPyObjects gives for it)
    cases = [(27, 11, [-0.8, 19.8, 7.8, 27.3, 2.1, 1.9], '=8<8L44K4M4L3M4Lf1'),
             (26, 56, [49.12313994776651, 22.720054229497578, 47.32822954386641, 18.420589767106375,
                       21.47762542468648, 23.10831209287213, 26.00701119065581, 20.727897574963713],
              '\\c01i00O01000000000^20bM0O100000000O10000000001O02NQ5')]
    for h, w, poly, s in cases:
        assert M._poly_to_rle(poly, h, w) == M.rle_from_string(s)
        assert M.rle_to_string(M._poly_to_rle(poly, h, w)) == s
    assert M.segmentation_to_mask([cases[0][2]], 27, 11).sum() == 85
    assert M.segmentation_to_mask([cases[1][2]], 26, 56).sum() == 45


def test_rle_string_hand_encoded():
    assert M.rle_from_string('5') == [5]
    assert M.rle_from_string('324') == [3, 2, 4]
    assert M.rle_from_string('1115') == [1, 1, 1, 6]  # 4th count stored as 6 - counts[1] = 5
    assert M.rle_from_string('052M') == [0, 5, 2, 2]  # 'M' = 29: 5-bit -3, 2 - 5
    assert M.rle_from_string('T3') == [100]  # 'T' = 36: low 5 bits 4 + continuation, then 3 << 5
    for counts, s in (([5], '5'), ([3, 2, 4], '324'), ([1, 1, 1, 6], '1115'), ([0, 5, 2, 2], '052M'), ([100], 'T3')):
        assert M.rle_to_string(counts) == s
    m = M.rle_decode([3, 2, 4], 3, 3)  # column-major: column 0 empty, then rows 0-1 of column 1
    np.testing.assert_array_equal(m, [[0, 1, 0], [0, 1, 0], [0, 0, 0]])
    m = M.segmentation_to_mask({'size': [3, 3], 'counts': '052M'}, 3, 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [1, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(M.segmentation_to_mask({'size': [3, 3], 'counts': b'052M'}, 3, 3), m)
    np.testing.assert_array_equal(M.segmentation_to_mask({'size': [3, 3], 'counts': [0, 5, 2, 2]}, 3, 3), m)
    assert M.rle_encode(m) == [0, 5, 2, 2]
    with pytest.raises(ValueError, match="sum to 8"):
        M.rle_decode([3, 2, 3], 3, 3)
    with pytest.raises(ValueError, match="corrupt compressed RLE"):
        M.rle_from_string('5~')
    with pytest.raises(ValueError, match="corrupt compressed RLE"):
        M.rle_from_string('T')  # continuation bit set on the last char
    with pytest.raises(ValueError, match="differs from the image"):
        M.segmentation_to_mask({'size': [3, 4], 'counts': '<'}, 3, 3)


def test_degenerate_polygons_rule():
    h, w = 20, 24
    real = M.rle_decode(M.rle_from_string(REAL_COUNTS), h, w)
    assert real.sum() == 84
    np.testing.assert_array_equal(M.segmentation_to_mask([REAL], h, w), real)
    # odd coordinate count: floor(n/2) points, the last number dropped, as pycocotools' frPoly
    np.testing.assert_array_equal(M.segmentation_to_mask([REAL + [7]], h, w), real)
    tri = M.segmentation_to_mask([[2.5, 2, 12, 2.5, 13.5, 10, 99]], h, w)
    np.testing.assert_array_equal(tri, M.rle_decode(M.rle_from_string('n11c0001O1O001O1O10O2O3Mn5'), h, w))
    assert tri.sum() == 35
    # a part of fewer than 3 points covers nothing and is ignored, wherever it stands (pycocotools: an empty
    # part after a polygon; a 4-number FIRST part makes it crash, TypeError in frBbox)
    for seg in ([REAL, [15, 15]], [REAL, []], [REAL, [2, 3, 15, 14]], [REAL, [2, 3, 15, 14, 1]],
                [[2, 3, 15, 14], REAL], [[5, 6], REAL], [[], REAL]):
        np.testing.assert_array_equal(M.segmentation_to_mask(seg, h, w), real, err_msg=str(seg))
    # a polygon of 3+ points that encloses no pixel centre gives an empty mask, as pycocotools
    assert M.segmentation_to_mask([[1, 15, 8, 15, 20, 15]], h, w).sum() == 0
    assert M.segmentation_to_mask([[100, 100, 110, 100, 110, 110]], h, w).sum() == 0
    # no part of 3+ points: an error, not an empty mask nor a box
    for seg in ([], [[]], [[5, 6]], [[2, 3, 5, 4]], [[2, 3, 5, 4], [10, 10, 3, 3]], [[1, 2, 3, 4, 5]]):
        with pytest.raises(ValueError, match="no polygon of 3 or more points"):
            M.segmentation_to_mask(seg, h, w)
        with pytest.raises(ValueError, match="no polygon of 3 or more points"):
            M.check_segmentation(seg, h, w)
    with pytest.raises(ValueError, match="polygon 1 has a non-finite coordinate"):
        M.segmentation_to_mask([REAL, [2, 2, 12, float('nan'), 5, 5]], h, w)
    with pytest.raises(ValueError, match="polygon 0 is not a list of numbers"):
        M.segmentation_to_mask([[2, 2, 12, 'a', 5, 5]], h, w)
    with pytest.raises(ValueError, match="polygon 0 is not a flat"):
        M.segmentation_to_mask([[[2, 2], [12, 2], [12, 10]]], h, w)
    with pytest.raises(ValueError, match="polygon 0 is not a flat"):
        M.segmentation_to_mask(REAL, h, w)  # one polygon not wrapped in a list
    with pytest.raises(ValueError, match="neither a polygon list nor an RLE dict"):
        M.segmentation_to_mask(None, h, w)
    with pytest.raises(ValueError, match="RLE dict needs 'size' and 'counts'"):
        M.check_segmentation({'counts': '5'}, h, w)
    with pytest.raises(ValueError, match="sum to 479"):
        M.check_segmentation({'size': [h, w], 'counts': [479]}, h, w)
