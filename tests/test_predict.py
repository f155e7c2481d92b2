"""Tests of predict.py: masks come back at the original resolution, equal the evaluation protocol's mask for
the same image and sentence, the CLI writes mask + overlay PNGs, and bad input is one clear error."""
import os

import cv2
import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from dataset import build_dataset
from errors import UserError
from evaluate import masks_to_original
from model import build_model
from predict import main, predict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("tiny-ViT", input_size=64, word_len=17).eval()
    path = str(tmp_path_factory.mktemp("ck") / "best.pth")
    save_checkpoint(path, net)
    return net, path


def test_predict_equals_the_evaluation_protocol(tiny):
    net, _ = tiny
    ds = build_dataset("synthetic", "test", input_size=64, num_samples=1)
    for index in range(1):
        sample, scene = ds[index], ds.scene(index)
        for s, sentence in enumerate(sample["sentences"]):
            with torch.no_grad():
                logits = net(sample["image"][None], sample["tokens"][s:s + 1])
            (expected,) = masks_to_original(logits, [sample["inverse"]], [sample["orig_size"]], 64)
            got = predict(net, scene["image"], sentence, device="cpu")
            assert got.dtype == bool and got.shape == tuple(sample["orig_size"])
            assert np.array_equal(got, expected)


def test_cli_writes_mask_and_overlay_at_original_size(tiny, tmp_path):
    _, ck = tiny
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # not square: exercises the letterbox
    path = str(tmp_path / "photo.png")
    cv2.imwrite(path, image)
    mask = main(["--checkpoint", ck, "--image", path, "--text", "The red circle!", "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--threshold", "0.3"])
    written = cv2.imread(str(tmp_path / "o" / "photo_the-red-circle_mask.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == (50, 70) and set(np.unique(written)) <= {0, 255}
    assert np.array_equal(written > 0, mask)
    assert np.array_equal(mask, predict(ck, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), "The red circle!", 0.3, "cpu"))
    overlay = cv2.imread(str(tmp_path / "o" / "photo_the-red-circle_overlay.png"))
    assert overlay.shape[1] == 384 and overlay.shape[0] > round(50 * 384 / 70)  # enlarged, with a caption
    gray = predict(ck, image[:, :, 0], "the red circle", device="cpu")  # gray arrays are accepted
    assert gray.shape == (50, 70)


def test_cli_writes_next_to_the_image_and_never_over_an_earlier_result(tiny, tmp_path, monkeypatch):
    _, ck = tiny
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "photo.jpg"), np.full((30, 40, 3), 90, np.uint8))
    monkeypatch.chdir(tmp_path)  # the current folder gets nothing
    for _ in range(3):
        main(["--checkpoint", ck, "--image", "images/photo.jpg", "--text", "the red circle", "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "images")) == [
        "photo.jpg", "photo_the-red-circle_2_mask.png", "photo_the-red-circle_2_overlay.png",
        "photo_the-red-circle_3_mask.png", "photo_the-red-circle_3_overlay.png", "photo_the-red-circle_mask.png",
        "photo_the-red-circle_overlay.png"]
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_bad_input_is_a_clear_error(tiny, tmp_path):
    net, ck = tiny
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(UserError, match="not found"):
        predict(net, str(tmp_path / "missing.jpg"), "a cat", device="cpu")
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    with pytest.raises(UserError, match="could not be decoded"):
        predict(net, str(junk), "a cat", device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        predict(net, image.astype(np.float32), "a cat", device="cpu")
    for ext, kind in ((".jpg", "JPEG"), (".png", "PNG")):  # OpenCV alone decodes a truncated JPEG, grey rows
        data = cv2.imencode(ext, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))[1].tobytes()
        cut = tmp_path / f"cut{ext}"
        cut.write_bytes(data[:len(data) // 2])
        with pytest.raises(UserError, match=f"image .*cut{ext} is a truncated {kind}"):
            predict(net, str(cut), "a cat", device="cpu")
        cut.write_bytes(data + b"\0" * 64)  # padding after the end marker is fine
        assert predict(net, str(cut), "a cat", device="cpu").shape == (40, 60)
    for text in ("", "   "):
        with pytest.raises(UserError, match="text is empty"):
            predict(net, image, text, device="cpu")
    with pytest.raises(UserError, match="trained with backbone 'tiny-ViT'"):
        predict(ck, image, "a cat", device="cpu", backbone="tiny-RN")
    authors = str(tmp_path / "authors.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, authors)
    with pytest.raises(UserError, match="does not fit backbone 'tiny-RN'"):
        predict(authors, image, "a cat", device="cpu", backbone="tiny-RN")
