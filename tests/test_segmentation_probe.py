"""Segmentation scores (a hand-worked confusion matrix; scikit-learn on random labels with the ignore label),
sliding-window inference (equal to one forward where the image fits a window; overlaps averaged), the
probe's features, and the low-shot draws."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, jaccard_score

from moca_fast.eval.segment import low_shot_subsets
from moca_fast.model.vit import ViTEncoder
from moca_fast.probes.segmentation_head import SegmentationProbe, slide_inference, window_starts
from moca_fast.probes.segmentation_metrics import IGNORE, confusion_matrix, segmentation_scores


def test_scores_of_a_hand_worked_matrix():
    target = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE, IGNORE])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(conf, ["a", "b", "c", "d"])
    # IoU a = 2 / (3 + 2 - 2), b = 1 / (2 + 2 - 1), c = 1 / (1 + 2 - 1); d has no pixel and no prediction
    assert s["iou"] == pytest.approx({"a": 200 / 3, "b": 100 / 3, "c": 50.0, "d": None})
    assert s["miou"] == pytest.approx((200 / 3 + 100 / 3 + 50) / 3)
    assert s["pixel_accuracy"] == pytest.approx(400 / 6) and s["pixels"] == 6
    assert s["mean_accuracy"] == pytest.approx((200 / 3 + 50 + 100) / 3)


def test_scores_equal_scikit_learn_on_random_labels_with_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    k = 7
    target = torch.randint(0, k, (3, 40, 50), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = IGNORE
    pred = torch.randint(0, k, target.shape, generator=gen)
    s = segmentation_scores(confusion_matrix(pred, target, k))
    keep = (target != IGNORE).numpy().ravel()
    t, p = target.numpy().ravel()[keep], pred.numpy().ravel()[keep]
    iou = jaccard_score(t, p, labels=list(range(k)), average=None)
    assert [s["iou"][str(c)] for c in range(k)] == pytest.approx(100 * iou)
    assert s["miou"] == pytest.approx(100 * iou.mean())
    assert s["pixel_accuracy"] == pytest.approx(100 * accuracy_score(t, p))


def test_out_of_range_labels_are_an_error_not_a_score():
    with pytest.raises(ValueError, match="labels outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="predictions outside"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


def test_window_starts_cover_the_image_with_the_last_flush_to_the_edge():
    assert window_starts(28, 28, 18) == [0]
    assert window_starts(20, 28, 18) == [0]
    assert window_starts(56, 28, 18) == [0, 18, 28]
    assert window_starts(100, 32, 32) == [0, 32, 64, 68]


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    enc.init_weights()
    return enc.eval()


@pytest.mark.parametrize("features", ["last", "last4"])
def test_sliding_window_equals_one_forward_where_the_image_fits_one_window(features):
    probe = SegmentationProbe(_encoder(), num_classes=5, features=features).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = probe(x)
    assert torch.equal(slide_inference(probe, x, window=32, stride=21, num_classes=5), whole)
    assert whole.shape == (2, 5, 32, 32)


def test_sliding_window_averages_the_overlaps():
    calls = []

    def predict(crops):  # logit = 1 + the window's number: the average shows which windows cover a pixel
        calls.append(len(crops))
        return torch.stack([torch.full((2, 4, 4), float(len(calls) * 10 + k)) for k in range(len(crops))])

    out = slide_inference(predict, torch.zeros(1, 3, 4, 6), window=4, stride=2, num_classes=2, max_batch=1)
    # windows at x = 0 and x = 2 (values 10, 20): columns 0-1 see one, 2-3 both, 4-5 the second
    assert out[0, 0, 0].tolist() == [10, 10, 15, 15, 20, 20] and calls == [1, 1]


def test_a_smaller_image_is_padded_and_cropped_back():
    probe = SegmentationProbe(_encoder(), num_classes=3).eval()
    x = torch.randn(1, 3, 20, 27)
    out = slide_inference(probe, x, window=32, stride=21, num_classes=3)
    padded = torch.nn.functional.pad(x, (0, 5, 0, 12))
    with torch.no_grad():
        assert torch.equal(out, probe(padded)[:, :, :20, :27])


def test_last4_reads_the_last_four_blocks_through_the_final_norm():
    enc = _encoder()
    probe = SegmentationProbe(enc, num_classes=3, features="last4")
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in enc.blocks]
    feats = probe.features(x)
    for h in hooks:
        h.remove()
    expect = torch.cat([enc.norm(o) for o in outputs[-4:]], dim=-1)[:, 1:]
    assert feats.shape == (2, 128, 4, 4)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), expect)
    assert not feats.requires_grad  # frozen: no graph through the encoder
    assert all(not b._forward_hooks for b in enc.blocks)  # the probe's hooks live only during its forward
    assert probe.features._kept == []


def test_low_shot_subsets_are_seeded_nested_and_differ_across_seeds():
    a = low_shot_subsets(50, [3, 10], splits=3, seed=0)
    assert a == low_shot_subsets(50, [3, 10], splits=3, seed=0)
    assert len({tuple(s) for s in a[10]}) == 3  # the three splits differ
    assert low_shot_subsets(50, [3, 10], splits=3, seed=1)[10][0] != a[10][0]
    for small, large in zip(a[3], a[10]):
        assert set(small) <= set(large) and len(small) == 3 and len(set(large)) == 10
    assert np.all(np.diff(a[10][0]) > 0)
