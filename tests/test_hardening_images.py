"""Image ingestion on hostile and unusual uploads: every file is converted or refused with a
message naming it; nothing else ever escapes `load_images` (hypothesis throws random bytes,
damaged real files, arrays and random small images at it).

Every input is built here with Pillow; the model format is 8x8, grayscale or RGB.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from retrack import images
from retrack.images import ImageError, load_images

SIZE = 8  # the model's resolution in these tests


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(height: int = 16, width: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR chunk claiming width x height, then an empty image: a few
    dozen bytes that would make a naive decoder allocate width * height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# ============================================================================ refused, with a reason
def _flip_idat_byte(png: bytes) -> bytes:
    damaged = bytearray(png)
    damaged[png.index(b"IDAT") + 10] ^= 0xFF  # compressed pixel data no longer inflates
    return bytes(damaged)


def _zero_jpeg_dimensions(jpeg: bytes) -> bytes:
    damaged = bytearray(jpeg)
    start = jpeg.index(b"\xff\xc0")  # start-of-frame: height and width follow the precision byte
    damaged[start + 5:start + 9] = bytes(4)
    return bytes(damaged)


REFUSED = {
    "empty.png": (lambda: b"", "empty"),
    "notes.png": (lambda: b"these are my notes, not a picture\n", "not an image file"),
    "truncated.png": (lambda: encode(noise(), "PNG")[:-40], "damaged or truncated"),
    "half.png": (lambda: encode(noise(), "PNG")[:60], "damaged or truncated"),
    "bad-crc.png": (lambda: _flip_idat_byte(encode(noise(), "PNG")), "damaged or truncated"),
    "truncated.jpg": (lambda: encode(noise(), "JPEG")[:300], "damaged or truncated"),
    "bad-header.jpg": (lambda: _zero_jpeg_dimensions(encode(noise(), "JPEG")), "not an image file"),
    "giant-header.png": (lambda: png_header_only(100_000, 100_000), "too large to decode safely"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("channels", [1, 3])
def test_unusable_files_are_refused_with_their_name_and_why(tmp_path, name, channels):
    make, reason = REFUSED[name]
    path = write(tmp_path, name, make())
    with pytest.raises(ImageError) as refused:
        load_images([path], SIZE, channels)
    assert str(refused.value).startswith(f"{name}: ") and reason in str(refused.value)
    with pytest.raises(ImageError, match=reason):  # the same bytes uploaded from memory
        load_images([path.read_bytes()], SIZE, channels)


def test_the_first_bad_file_of_several_is_named(tmp_path):
    good = write(tmp_path, "good.png", encode(noise(), "PNG"))
    bad = write(tmp_path, "bad.jpg", b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match=r"^bad\.jpg: "):
        load_images([good, bad, good], SIZE, 1)


def test_decompression_bomb_is_refused_before_its_pixels_are_allocated(tmp_path, monkeypatch):
    """A real bomb: 3,000 x 3,000 black pixels (9 MB decoded) in a ~9 kB PNG. With the pixel
    limit set below its size, it is refused from its header, and the reason names the limit."""
    bomb = write(tmp_path, "bomb.png", encode(Image.new("L", (3000, 3000)), "PNG", optimize=True))
    assert bomb.stat().st_size < 20_000
    limit = 1_000_000
    monkeypatch.setattr(images, "MAX_PIXELS", limit)
    with pytest.raises(ImageError, match=r"bomb\.png: 3000x3000 pixels is over the 1,000,000-pixel limit"):
        load_images([bomb], SIZE, 1)
    # Pillow's own guard, set by retrack.images, stops it too if the explicit check is bypassed.
    monkeypatch.setattr(images, "MAX_PIXELS", 10**12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError, match=r"bomb\.png: the image is too large to decode safely"):
        load_images([bomb], SIZE, 1)


def test_pillow_pixel_limit_is_set_deliberately():
    assert Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS  # Pillow errors at twice this, warns (refused) above it


def test_files_over_the_size_cap_are_refused_before_decoding(tmp_path, monkeypatch):
    big = write(tmp_path, "big.png", encode(noise(64, 64), "PNG"))
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1024)
    with pytest.raises(ImageError, match=r"big\.png: .* MB is over the 0 MB limit"):
        load_images([big], SIZE, 3)
    with pytest.raises(ImageError, match="over the"):
        load_images([big.read_bytes()], SIZE, 3)


def test_arrays_that_are_not_images_are_refused():
    for bad, reason in [(np.zeros((0, 4), np.uint8), "no pixels"), (np.zeros((4, 4, 2), np.uint8), "not an image"),
                        (np.full((4, 4), np.nan), "uint8"), (np.full((4, 4), 2.0), "uint8"),
                        (np.zeros((2, 4, 4, 3), np.uint8), "not an image")]:
        with pytest.raises(ImageError, match=reason):
            load_images([bad], SIZE, 1)
    with pytest.raises(ImageError, match="not an image"):
        load_images([12345], SIZE, 1)  # type: ignore[list-item]
    with pytest.raises(ImageError, match="no images"):
        load_images([], SIZE, 1)


# ============================================================================ converted, with a note
def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("L", (SIZE, SIZE), value) for value in (255, 0, 128)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_images([gif], SIZE, 1)
    assert loaded.notes == ["anim.gif: first frame of an animation, P -> grayscale"]
    assert loaded.tensor.shape == (1, 1, SIZE, SIZE) and bool((loaded.tensor == 1.0).all())  # the white frame


def test_gif_with_a_damaged_tail_keeps_its_decoded_first_frame(tmp_path):
    """Regression: an extension introducer with nothing after it used to raise IndexError from
    Pillow's frame count, outside the error handling."""
    gif = encode(Image.new("P", (6, 5), 3), "GIF")
    damaged = write(tmp_path, "tail.gif", gif[:-1] + b"!")
    loaded = load_images([damaged], SIZE, 3)
    assert "first frame only (the rest of the file is damaged)" in loaded.notes[0]
    assert loaded.tensor.shape == (1, 3, SIZE, SIZE)


def test_sixteen_bit_images_are_scaled_from_their_full_range(tmp_path):
    ramp = np.array([[0, 65535], [32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = load_images([path], 2, 1)
    assert loaded.notes == ["deep.png: I;16 -> grayscale"]
    pixels = images.tensor_to_uint8(loaded.tensor)[0, ..., 0]
    assert pixels.tolist() == [[0, 255], [128, 255]]


def test_float_images_in_unit_range_keep_their_brightness(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)).save(path)
    pixels = images.tensor_to_uint8(load_images([path], 2, 1).tensor)[0, ..., 0]
    assert pixels.tolist() == [[0, 128], [255, 64]]


def test_transparency_is_flattened_onto_black(tmp_path):
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[:, : SIZE // 2, 3] = 255  # ... but only the left half is opaque
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba).save(path)
    loaded = load_images([path], SIZE, 1)
    pixels = images.tensor_to_uint8(loaded.tensor)[0, ..., 0]
    assert loaded.notes == ["cutout.png: RGBA -> grayscale"]
    assert (pixels[:, : SIZE // 2] == 255).all() and (pixels[:, SIZE // 2:] == 0).all()

    palette = Image.fromarray(rgba).convert("P")  # palette with a transparent entry
    palette.save(tmp_path / "palette.png", transparency=0)
    assert load_images([tmp_path / "palette.png"], SIZE, 3).tensor.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("mode, fmt, suffix", [
    ("P", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("L", "PNG", "png"), ("RGB", "JPEG", "jpg"), ("1", "BMP", "bmp"),
    ("LA", "PNG", "png"), ("RGB", "WEBP", "webp"), ("RGB", "TIFF", "tiff"),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_common_mode_converts_to_the_model_format(tmp_path, mode, fmt, suffix, channels):
    path = tmp_path / f"picture.{suffix}"
    noise(SIZE, SIZE).convert(mode).save(path, fmt)
    loaded = load_images([path], SIZE, channels)
    assert loaded.tensor.shape == (1, channels, SIZE, SIZE) and loaded.tensor.dtype.is_floating_point
    assert -1.0 <= float(loaded.tensor.min()) <= float(loaded.tensor.max()) <= 1.0
    target = "L" if channels == 1 else "RGB"
    opened_mode = Image.open(path).mode
    assert loaded.notes == ([] if opened_mode == target else
                            [f"picture.{suffix}: {opened_mode} -> {'grayscale' if channels == 1 else 'RGB'}"])


def test_mismatched_sizes_are_all_brought_to_the_model_size(tmp_path):
    files = [write(tmp_path, name, encode(noise(h, w), "PNG"))
             for name, (h, w) in {"tall.png": (40, 10), "small.png": (4, 4), "exact.png": (SIZE, SIZE)}.items()]
    loaded = load_images(files, SIZE, 3)
    assert loaded.tensor.shape == (3, 3, SIZE, SIZE)
    assert loaded.notes == ["tall.png: centre-cropped to a square, resized 10x10 -> 8x8",
                            "small.png: resized 4x4 -> 8x8"]


# ============================================================================ properties
def _seed_files() -> list[bytes]:
    """Small valid files of every format an upload may plausibly be, for the mutation test."""
    picture = noise(12, 10)
    animated = io.BytesIO()
    picture.convert("P").save(animated, "GIF", save_all=True, append_images=[noise(12, 10, 1).convert("P")])
    return [encode(picture, "PNG"), encode(picture.convert("P"), "PNG"), encode(picture.convert("RGBA"), "PNG"),
            encode(Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500), "PNG"),
            encode(picture, "JPEG"), encode(picture.convert("CMYK"), "JPEG"), encode(picture, "BMP"),
            encode(picture, "TIFF"), encode(picture.convert("F"), "TIFF"), encode(picture, "WEBP"),
            animated.getvalue()]


SEED_FILES = _seed_files()
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


def converts_or_refuses(item, channels: int) -> None:
    """The property: an (N, channels, SIZE, SIZE) tensor in [-1, 1], or an ImageError."""
    try:
        loaded = load_images([item], SIZE, channels)
    except ImageError as exc:
        assert str(exc)  # a message for people
        return
    assert loaded.tensor.shape == (1, channels, SIZE, SIZE)
    assert -1.0 <= float(loaded.tensor.min()) <= float(loaded.tensor.max()) <= 1.0


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=2048), channels=st.sampled_from([1, 3]))
def test_random_bytes_never_raise_anything_but_image_error(data, channels):
    converts_or_refuses(data, channels)


@st.composite
def damaged_files(draw) -> bytes:
    """A valid small file with a few bytes overwritten, cut out or inserted, and maybe cut short."""
    data = bytearray(draw(st.sampled_from(SEED_FILES)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["overwrite", "delete", "insert"]))
        if edit == "overwrite":
            data[at] = draw(st.integers(0, 255))
        elif edit == "delete" and len(data) > 1:
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        data = data[:draw(st.integers(1, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")  # Pillow on damaged TIFFs
@PROPERTY_SETTINGS
@given(data=damaged_files(), channels=st.sampled_from([1, 3]))
def test_damaged_real_files_never_raise_anything_but_image_error(data, channels):
    converts_or_refuses(data, channels)


@PROPERTY_SETTINGS
@given(array=st.one_of(
    arrays(np.uint8, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=12)),
    arrays(np.float32, array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12)),
    arrays(np.int16, array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6)),
), channels=st.sampled_from([1, 3]))
def test_random_arrays_never_raise_anything_but_image_error(array, channels):
    converts_or_refuses(array, channels)


@PROPERTY_SETTINGS
@given(height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"]),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), channels=st.sampled_from([1, 3]))
def test_random_small_valid_images_always_convert(height, width, seed, mode, fmt, channels):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "F":
        picture = Image.fromarray(rng.random((height, width), dtype=np.float32))
    else:
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    try:
        data = encode(picture, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: not an upload anyone can make
    loaded = load_images([data], SIZE, channels)
    assert loaded.tensor.shape == (1, channels, SIZE, SIZE)
    assert -1.0 <= float(loaded.tensor.min()) <= float(loaded.tensor.max()) <= 1.0
