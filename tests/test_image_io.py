from __future__ import annotations

import pathlib
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from rewardkit.image_io import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    list_images,
    load_image,
    load_images,
    pil_to_tensor,
    to_tensor,
)

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"


def _save(tmp_path: pathlib.Path, image: Image.Image, name: str, **kwargs) -> pathlib.Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _read(path: pathlib.Path) -> Image.Image:
    """Open a file with plain PIL (the reference view), closing it."""
    with Image.open(path) as opened:
        return opened.copy()


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _rgba_sample() -> Image.Image:
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 0], [1, 2, 3, 255]]], dtype=np.uint8)
    return Image.fromarray(rgba)


def _write_png16(path: pathlib.Path, samples: np.ndarray, color_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot create 16-bit RGB images)."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


# ---------------------------------------------------------------- load_image: modes


def test_rgb_is_returned_unchanged(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = load_image(_save(tmp_path, Image.fromarray(array), "rgb.png"))
    np.testing.assert_array_equal(_pixels(image), array)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_modes_replicate_gray(tmp_path, mode):
    gray = Image.fromarray(np.array([[0, 90, 255]], dtype=np.uint8)).convert(mode)
    image = load_image(_save(tmp_path, gray, f"{mode}.png"))
    expected = np.asarray(gray.convert("L"))
    np.testing.assert_array_equal(_pixels(image), np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [("drop", [[100] * 3, [100] * 3]), ("white", [[100] * 3, [177] * 3]), ("black", [[100] * 3, [50] * 3])],
)
def test_la_alpha_policies(tmp_path, alpha, expected):
    gray, opacity = (Image.fromarray(np.array([values], dtype=np.uint8)) for values in ([100, 100], [255, 128]))
    la = Image.merge("LA", (gray, opacity))
    image = load_image(_save(tmp_path, la, "la.png"), alpha=alpha)
    # white: round((100 * 128 + 255 * 127) / 255) = round(177.2) = 177; black: round(50.2) = 50
    np.testing.assert_array_equal(_pixels(image)[0], np.array(expected))


def test_rgba_alpha_policies(tmp_path):
    path = _save(tmp_path, _rgba_sample(), "rgba.png")
    rgb = np.array([[200, 100, 50], [10, 20, 30], [1, 2, 3]], dtype=np.int64)
    opacity = np.array([128, 0, 255], dtype=np.int64)[:, None]
    np.testing.assert_array_equal(_pixels(load_image(path))[0], rgb)  # drop == PIL convert("RGB")
    np.testing.assert_array_equal(_pixels(load_image(path)), np.asarray(_read(path).convert("RGB")))
    for background in (0, 255):
        expected = np.floor((rgb * opacity + background * (255 - opacity)) / 255 + 0.5)
        policy = "white" if background else "black"
        np.testing.assert_array_equal(_pixels(load_image(path, alpha=policy))[0], expected)
    with pytest.raises(ImageLoadError, match="rgba.png"):
        load_image(path, alpha="error")


def test_opaque_rgba_is_accepted_by_error_policy(tmp_path):
    opaque = Image.new("RGBA", (2, 2), (9, 8, 7, 255))
    image = load_image(_save(tmp_path, opaque, "opaque.png"), alpha="error")
    np.testing.assert_array_equal(_pixels(image), np.full((2, 2, 3), [9, 8, 7]))


def test_palette_without_transparency(tmp_path):
    palette = Image.new("RGB", (4, 2), (250, 0, 0)).quantize(4)
    path = _save(tmp_path, palette, "p.png")
    assert _read(path).mode == "P"
    np.testing.assert_array_equal(_pixels(load_image(path)), np.asarray(_read(path).convert("RGB")))
    assert load_image(path, alpha="error").mode == "RGB"


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 150, 100] + [0] * 762)
    palette.putpixel((1, 0), 1)
    path = _save(tmp_path, palette, "p.gif", transparency=0)
    assert "transparency" in _read(path).info
    np.testing.assert_array_equal(_pixels(load_image(path))[0], [[10, 20, 30], [200, 150, 100]])
    np.testing.assert_array_equal(_pixels(load_image(path, alpha="white"))[0], [[255, 255, 255], [200, 150, 100]])
    np.testing.assert_array_equal(_pixels(load_image(path, alpha="black"))[0], [[0, 0, 0], [200, 150, 100]])
    with pytest.raises(ImageLoadError, match="p.gif"):
        load_image(path, alpha="error")


def test_rgb_color_key_transparency(tmp_path):
    keyed = Image.new("RGB", (2, 1), (10, 20, 30))
    keyed.putpixel((1, 0), (1, 2, 3))
    path = _save(tmp_path, keyed, "key.png", transparency=(10, 20, 30))
    np.testing.assert_array_equal(_pixels(load_image(path))[0], [[10, 20, 30], [1, 2, 3]])
    np.testing.assert_array_equal(_pixels(load_image(path, alpha="black"))[0], [[0, 0, 0], [1, 2, 3]])


def test_cmyk_uses_pil_conversion(tmp_path):
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 0, 0))
    path = _save(tmp_path, cmyk, "cmyk.tiff")
    assert _read(path).mode == "CMYK"
    image = load_image(path)
    np.testing.assert_array_equal(_pixels(image), np.full((2, 3, 3), [255, 0, 255]))


def test_i16_is_scaled_not_clipped(tmp_path):
    samples = np.array([[0, 128, 257, 32768, 65280, 65535]], dtype=np.uint16)
    path = _save(tmp_path, Image.fromarray(samples), "gray16.png")
    assert _read(path).mode.startswith("I;16")
    image = load_image(path)
    expected = np.array([0, 0, 1, 128, 254, 255])  # round(v * 255 / 65535)
    np.testing.assert_array_equal(_pixels(image)[0], np.repeat(expected[:, None], 3, axis=1))


def test_i_mode_within_16_bit_and_out_of_range():
    inside = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert inside.mode == "I"
    np.testing.assert_array_equal(to_tensor(inside)[0, :, 0] * 255, torch.tensor([[0.0, 128, 255]] * 3))
    for bad in (70000, -1):
        with pytest.raises(ImageLoadError, match="range is unknown"):
            to_tensor(Image.fromarray(np.array([[0, bad]], dtype=np.int32)))


def test_float_mode(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.1]], dtype=np.float32)), "f.tiff")
    assert _read(path).mode == "F"
    np.testing.assert_array_equal(_pixels(load_image(path))[0, :, 0], [0, 128, 255, 26])
    bad = _save(tmp_path, Image.fromarray(np.array([[0.0, 1.5]], dtype=np.float32)), "bad_f.tiff")
    with pytest.raises(ImageLoadError, match="bad_f.tiff"):
        load_image(bad)


def test_rgb16_png_keeps_pillow_high_byte(tmp_path):
    samples = np.array([[[0, 257, 65535], [128, 32768, 65280]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    _write_png16(path, samples, color_type=2)
    image = load_image(path)
    np.testing.assert_array_equal(_pixels(image), samples >> 8)
    np.testing.assert_array_equal(_pixels(image), np.asarray(_read(path).convert("RGB")))  # upstream view


def test_rgba16_png_alpha_is_resolved(tmp_path):
    samples = np.array([[[65535, 0, 0, 0], [0, 65535, 0, 65535]]], dtype=np.uint16)
    path = tmp_path / "rgba16.png"
    _write_png16(path, samples, color_type=6)
    np.testing.assert_array_equal(_pixels(load_image(path, alpha="white"))[0], [[255, 255, 255], [0, 255, 0]])


def test_exif_orientation_is_applied(tmp_path):
    source = Image.new("RGB", (64, 32), (255, 0, 0))
    source.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(tmp_path, source, "rotated.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (32, 64)
    top, bottom = _pixels(image)[16, 16], _pixels(image)[48, 16]
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    np.testing.assert_array_equal(_pixels(image), np.asarray(ImageOps.exif_transpose(_read(path))))


def test_corrupt_file_raises_with_file_name(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(path)


def test_truncated_png_raises_with_file_name(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(tmp_path, Image.fromarray(noise), "full.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(path)


def test_missing_file_and_bad_alpha(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    path = _save(tmp_path, Image.new("RGB", (1, 1)), "one.png")
    with pytest.raises(ValueError, match="alpha must be one of"):
        load_image(path, alpha="grey")


def test_load_images_keeps_order_and_rejects_a_single_path(tmp_path):
    first = _save(tmp_path, Image.new("RGB", (1, 1), (1, 1, 1)), "b.png")
    second = _save(tmp_path, Image.new("RGB", (1, 1), (2, 2, 2)), "a.png")
    assert [img.getpixel((0, 0)) for img in load_images([first, second])] == [(1, 1, 1), (2, 2, 2)]
    with pytest.raises(TypeError, match="load_image"):
        load_images(str(first))


# ---------------------------------------------------------------- list_images


def test_list_images_sorting_case_and_recursion(tmp_path):
    for name in ["b.PNG", "a.jpg", "notes.txt", "c.JpEg", "sub/d.webp", "sub/deeper/e.tif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "folder.png").mkdir()  # a folder with an image-like name is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(str(tmp_path), recursive=True)] == [
        "a.jpg", "b.PNG", "c.JpEg", "sub/d.webp", "sub/deeper/e.tif"
    ]
    assert all(p.suffix.lower() in IMAGE_EXTENSIONS for p in list_images(tmp_path, recursive=True))


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty") as info:
        list_images(empty)
    assert ".png" in str(info.value) and ".webp" in str(info.value)


# ---------------------------------------------------------------- pil_to_tensor / to_tensor: PIL and paths


def test_pil_to_tensor_values_and_mode_check():
    array = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255, rtol=0, atol=0)
    with pytest.raises(ValueError, match="load_image"):
        pil_to_tensor(Image.new("L", (2, 2)))


def test_to_tensor_pil_inputs():
    red, blue = Image.new("RGB", (3, 2), (255, 0, 0)), Image.new("L", (3, 2), 51)
    single = to_tensor(red)
    assert single.shape == (1, 3, 2, 3) and single.dtype == torch.float32
    batch = to_tensor([red, blue])
    assert batch.shape == (2, 3, 2, 3)
    torch.testing.assert_close(batch[1], torch.full((3, 2, 3), 0.2), rtol=0, atol=0)
    torch.testing.assert_close(to_tensor((_rgba_sample(),), alpha="black")[0, :, 0, 1], torch.zeros(3))


def test_to_tensor_paths_and_folders(tmp_path):
    one = _save(tmp_path, Image.new("RGB", (4, 3), (0, 255, 0)), "one.png")
    two = _save(tmp_path, Image.new("RGB", (4, 3), (0, 0, 255)), "two.png")
    from_file = to_tensor(str(one))
    assert from_file.shape == (1, 3, 3, 4)
    from_folder = to_tensor(tmp_path)
    torch.testing.assert_close(from_folder, to_tensor([one, str(two)]), rtol=0, atol=0)
    torch.testing.assert_close(from_folder[1], pil_to_tensor(_read(two).convert("RGB")), rtol=0, atol=0)


def test_to_tensor_rejects_different_sizes(tmp_path):
    small = _save(tmp_path, Image.new("RGB", (4, 3)), "small.png")
    with pytest.raises(ValueError, match="same size.*one at a time"):
        to_tensor([small, Image.new("RGB", (5, 3))])


def test_to_tensor_rejects_layout_for_pil_and_bad_types():
    with pytest.raises(ValueError, match="arrays and tensors only"):
        to_tensor(Image.new("RGB", (2, 2)), value_range=(0, 1))
    for bad in (42, {"image": 1}, None):
        with pytest.raises(TypeError, match="accepts"):
            to_tensor(bad)
    with pytest.raises(TypeError, match="torch.stack"):
        to_tensor([torch.zeros(3, 2, 2)])
    with pytest.raises(ValueError, match="empty"):
        to_tensor([])


# ---------------------------------------------------------------- to_tensor: arrays and tensors


@pytest.fixture
def reference() -> torch.Tensor:
    return torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))


def test_layouts(reference):
    nhwc = reference.permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(to_tensor(nhwc, layout="NHWC", value_range=(0, 1)), reference, rtol=0, atol=0)
    torch.testing.assert_close(to_tensor(reference, layout="NCHW", value_range=(0, 1)), reference, rtol=0, atol=0)
    chw = to_tensor(reference[1], layout="CHW", value_range=(0, 1))
    hwc = to_tensor(nhwc[1], layout="HWC", value_range=(0, 1))
    for single in (chw, hwc):
        assert single.shape == (1, 3, 4, 5) and single.is_contiguous()
        torch.testing.assert_close(single[0], reference[1], rtol=0, atol=0)


def test_float_value_ranges(reference):
    minus_one_one = to_tensor(reference * 2 - 1, layout="NCHW", value_range=(-1, 1))
    torch.testing.assert_close(minus_one_one, reference, rtol=0, atol=1e-6)
    zero_255 = to_tensor((reference * 255).numpy().astype(np.float64), layout="NCHW", value_range=(0, 255))
    assert zero_255.dtype == torch.float32
    torch.testing.assert_close(zero_255, reference, rtol=0, atol=1e-6)
    extremes = to_tensor(torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2), layout="NCHW", value_range=(-1, 1))
    assert extremes.min() == 0 and extremes.max() == 1


def test_integer_dtypes():
    array = np.random.default_rng(4).integers(0, 256, (3, 2, 3), dtype=np.uint8)
    expected = pil_to_tensor(Image.fromarray(array))[None]
    torch.testing.assert_close(to_tensor(array, layout="HWC"), expected, rtol=0, atol=0)
    torch.testing.assert_close(to_tensor(torch.from_numpy(array), layout="HWC"), expected, rtol=0, atol=0)
    wide = np.array([[[0, 65535, 32768]]], dtype=">u2")  # non-native byte order too
    torch.testing.assert_close(to_tensor(wide, layout="HWC")[0, :, 0, 0], torch.tensor([0, 1, 32768 / 65535]))
    torch_wide = torch.tensor([[[65535], [0]]], dtype=torch.uint16)
    torch.testing.assert_close(to_tensor(torch_wide, layout="HWC")[0, :, 0], torch.tensor([[1.0, 0.0]] * 3))
    half = torch.tensor([[[0.0, 127.5, 255.0]]], dtype=torch.float16)
    from_half = to_tensor(half, layout="HWC", value_range=(0, 255))
    torch.testing.assert_close(from_half[0, :, 0, 0], torch.tensor([0, 0.5, 1]))
    mask = np.array([[[0], [1]]], dtype=np.uint8)
    torch.testing.assert_close(to_tensor(mask, layout="HWC", value_range=(0, 1))[0, :, 0, 1], torch.ones(3))
    with pytest.raises(ValueError, match="value_range is required"):
        to_tensor(np.zeros((1, 1, 3), dtype=np.int32), layout="HWC")


def test_layout_is_required(reference):
    with pytest.raises(ValueError, match="'NCHW', 'NHWC', 'CHW', 'HWC'"):
        to_tensor(reference, value_range=(0, 1))
    with pytest.raises(ValueError, match="needs a 3-D input"):
        to_tensor(reference, layout="CHW", value_range=(0, 1))


def test_value_range_checks(reference):
    with pytest.raises(ValueError, match="value_range is required"):
        to_tensor(reference, layout="NCHW")
    with pytest.raises(ValueError, match="outside value_range"):
        to_tensor(reference * 2 - 1, layout="NCHW", value_range=(0, 1))
    with pytest.raises(ValueError, match="outside value_range"):
        to_tensor(np.full((1, 1, 3), 300, dtype=np.uint16), layout="HWC", value_range=(0, 255))
    nan = reference.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_tensor(nan, layout="NCHW", value_range=(0, 1))
    with pytest.raises(ValueError, match="low < high"):
        to_tensor(reference, layout="NCHW", value_range=(1, 0))


def test_channel_counts():
    gray = torch.rand(2, 1, 3, 3)
    out = to_tensor(gray, layout="NCHW", value_range=(0, 1))
    assert out.shape == (2, 3, 3, 3) and torch.equal(out[:, 2], gray[:, 0])
    with pytest.raises(ValueError, match="alpha"):
        to_tensor(np.zeros((2, 2, 4), dtype=np.uint8), layout="HWC")
    with pytest.raises(ValueError, match="3 channels"):
        to_tensor(torch.zeros(1, 5, 2, 2), layout="NCHW", value_range=(0, 1))
    with pytest.raises(TypeError, match="dtype"):
        to_tensor(np.zeros((1, 1, 3), dtype=bool), layout="HWC")


def test_gradient_flows_through_to_tensor():
    source = torch.rand(1, 2, 2, 3, requires_grad=True)
    out = to_tensor(source * 2 - 1, layout="NHWC", value_range=(-1, 1))
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(source.grad, torch.ones_like(source))


def test_as_rgb_images_converts_in_memory_images_and_paths_alike(tmp_path):
    from PIL import Image

    from rewardkit.image_io import as_rgb_images

    gray = Image.new("L", (5, 4), 77)
    gray.save(tmp_path / "gray.png")
    converted = as_rgb_images([gray, tmp_path / "gray.png", Image.new("RGBA", (3, 3), (10, 20, 30, 0))])
    assert [im.mode for im in converted] == ["RGB"] * 3
    assert converted[0].tobytes() == converted[1].tobytes()
    assert converted[2].getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, as Image.convert("RGB")


def test_meta_device_tensors_are_refused_with_a_fix() -> None:
    """A tensor on the meta device has a shape but no values: refused at the edge with the fix, by to_tensor
    and by the shared input check every reward and metric runs (not torch's "Cannot copy out of meta tensor")."""
    import rewardkit as rk

    meta = torch.empty(2, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match=r"^to_tensor: images are on the meta device .* materialise them"):
        to_tensor(meta, layout="NCHW", value_range=(0, 1))
    with pytest.raises(ValueError, match=r"^jpeg-compressibility: images are on the meta device .*to_empty"):
        rk.load("jpeg-compressibility")(meta)
    with pytest.raises(ValueError, match=r"^ssim \(reference=\): images are on the meta device"):
        rk.load("ssim")(torch.rand(2, 3, 16, 16), reference=meta)
