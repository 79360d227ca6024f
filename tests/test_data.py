"""Calibration data as a user hands it over: image folders, saved datasets, slices and subsets."""

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from hubmerge.data import Preprocess, as_batches, batches, load_dataset_ref
from hubmerge.errors import DataError

PRE = Preprocess(input_size=(1, 8, 8), mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder tree: train/<class>/<i>.png with 12×10 RGB images (resized, cropped and greyed on load)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    return root


def test_image_folder_loads_with_class_labels_and_endpoint_preprocessing(folder):
    ds = load_dataset_ref(str(folder), "train")
    assert len(ds) == 12 and ds.features["label"].names == ["cat", "dog", "eel"]
    xs, ys = zip(*batches(as_batches(ds, preprocess=PRE, batch_size=5)))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (12, 1, 8, 8) and x.dtype == torch.float32
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # as timm evaluates: the 10×12 image's shorter side resized to 8, the centre 8×8 cropped, never stretched
    grey = ds[0]["image"].convert("L")
    want = T.Compose([T.Resize(8, T.InterpolationMode.BILINEAR), T.CenterCrop(8), T.ToTensor(),
                      T.Normalize((0.5,), (0.25,))])(grey)
    assert torch.allclose(x[0], want, atol=1e-6)
    stretched = T.Normalize((0.5,), (0.25,))(T.ToTensor()(grey.resize((8, 8), Image.BILINEAR)))
    assert (x[0] - stretched).abs().max() > 0.1


def test_saved_dataset_split_slice_and_seeded_subset(tmp_path):
    rows = {"image": [np.full((4, 4), i, dtype=np.uint8) for i in range(30)], "label": list(range(30))}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path))
    assert load_dataset_ref(str(tmp_path), "test[5:9]")["label"] == [5, 6, 7, 8]
    one = load_dataset_ref(str(tmp_path), "test", samples=7, seed=3)["label"]
    assert one == load_dataset_ref(str(tmp_path), "test", samples=7, seed=3)["label"] and len(set(one)) == 7
    with pytest.raises(DataError, match="no split 'train'; splits: \\['test'\\]"):
        load_dataset_ref(str(tmp_path), "train")


def test_a_datasets_dataset_without_preprocessing_is_a_clear_error(folder):
    with pytest.raises(DataError, match="needs a Preprocess"):
        as_batches(load_dataset_ref(str(folder), "train"))


def test_a_corrupt_image_and_an_absurd_input_size_are_data_errors(tmp_path):
    rows = {"image": [{"bytes": b"not a png", "path": None}], "label": [0]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path))
    data = as_batches(load_dataset_ref(str(tmp_path), "train"), preprocess=PRE)
    with pytest.raises(DataError, match="row 0: cannot decode the image"):
        list(batches(data))
    with pytest.raises(DataError, match="sides above 8192"):
        Preprocess(input_size=(3, 10**6, 10**6), mean=(0.5,) * 3, std=(0.5,) * 3)


def test_a_tensor_dataset_is_sliced_into_the_batches_a_dataloader_gives():
    """A TensorDataset is read as slices of its tensors, not sample by sample: the same batches as a
    DataLoader's, the last one short, labels included."""
    data = torch.utils.data.TensorDataset(torch.randn(10, 3, 4, 4), torch.arange(10) % 3)
    got = as_batches(data, batch_size=4)
    want = list(torch.utils.data.DataLoader(data, batch_size=4))
    assert len(got) == len(want) == 3
    for (x, y), (wx, wy) in zip(got, want):
        assert torch.equal(x, wx) and torch.equal(y, wy) and y.dtype == wy.dtype
    assert [len(x) for x, _ in batches(got)] == [4, 4, 2]
