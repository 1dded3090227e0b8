"""Label tables and the colouriser of uda_sam.data.labels, checked against docs/DATASETS.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uda_sam.data import labels as L

try:
    from tests.data import fake_datasets as fake
except ImportError:  # tests/ itself is on sys.path (no tests/__init__.py)
    from data import fake_datasets as fake  # type: ignore[no-redef]


def test_class_table() -> None:
    assert L.NUM_CLASSES == 19 and L.IGNORE_INDEX == 255
    assert len(L.CLASS_NAMES) == len(L.CLASS_COLORS) == 19
    assert L.CLASS_NAMES[0] == "road" and L.CLASS_NAMES[10] == "sky" and L.CLASS_NAMES[18] == "bicycle"
    assert L.CLASS_COLORS[10] == (70, 130, 180)  # not the (0, 130, 180) typo
    assert L.CLASS_COLORS[0] == (128, 64, 128) and L.CLASS_COLORS[13] == (0, 0, 142)


def test_label_id_to_train_id() -> None:
    table = L.LABEL_ID_TO_TRAIN_ID
    assert table.dtype == np.uint8 and table.shape == (256,)
    expected = fake.LABEL_TO_TRAIN  # the test-side copy of docs/DATASETS.md's table
    for label_id in range(256):
        assert table[label_id] == expected.get(label_id, 255), label_id
    with pytest.raises(ValueError):
        table[0] = 3  # shared constant is read-only


def test_train_id_to_label_id_roundtrip() -> None:
    table = L.TRAIN_ID_TO_LABEL_ID
    assert table.dtype == np.uint8 and table.shape == (256,)
    train_ids = np.arange(19, dtype=np.uint8)
    assert np.array_equal(L.LABEL_ID_TO_TRAIN_ID[table[train_ids]], train_ids)
    assert table[255] == 0


def test_synthia_table_and_subsets() -> None:
    table = L.SYNTHIA_ID_TO_TRAIN_ID
    expected = fake.SYNTHIA_TO_TRAIN
    for synthia_id in range(256):
        assert table[synthia_id] == expected.get(synthia_id, 255), synthia_id
    assert L.SYNTHIA_16_CLASSES == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert L.SYNTHIA_13_CLASSES == [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    assert L.CLASS_SUBSETS == {"19": list(range(19)), "16": L.SYNTHIA_16_CLASSES, "13": L.SYNTHIA_13_CLASSES}


def test_colorize_numpy_and_tensor() -> None:
    mask = np.array([[0, 10, 255], [13, 18, 19]], dtype=np.uint8)
    out = L.colorize(mask)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == (128, 64, 128) and tuple(out[0, 1]) == (70, 130, 180)
    assert tuple(out[0, 2]) == (0, 0, 0) and tuple(out[1, 2]) == (0, 0, 0)
    assert np.array_equal(L.colorize(torch.from_numpy(mask.astype(np.int64))), out)
    assert np.array_equal(L.colorize(np.array([[-1, 300]])), np.zeros((1, 2, 3), np.uint8))


def test_colorize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        L.colorize(np.zeros((1, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        L.colorize(np.zeros((2, 2), np.float32))


def test_label_id_palette_colours_label_ids() -> None:
    palette = np.asarray(L.label_id_palette(), dtype=np.uint8).reshape(256, 3)
    assert tuple(palette[7]) == (128, 64, 128) and tuple(palette[23]) == (70, 130, 180)
    assert tuple(palette[0]) == (0, 0, 0)
