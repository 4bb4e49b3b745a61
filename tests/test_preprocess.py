"""deris_jax.preprocess (the predictor's numpy/Pillow path) gives the tf.data pipeline's pixels.

Files of every kind a user may bring, written by real encoders (Pillow, and a hand-built
16-bit RGB PNG since Pillow cannot write one), decoded by both paths and compared exactly:
the decoded RGB, the resized uint8 and the normalised float32 inputs.
"""
import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from deris_jax import preprocess
from deris_jax.data import pipeline_ops as ops

EXIF_ORIENTATION = 0x0112


def _photo(height: int, width: int, seed: int) -> np.ndarray:
  """(H, W, 3) uint8: smooth ramps with noisy patches (JPEG's hard and easy cases)."""
  rng = np.random.default_rng(seed)
  ramp = np.add.outer(np.arange(height), 2 * np.arange(width))[..., None] * [1, 2, 3]
  noisy = rng.random((height, width))[..., None] < 0.4
  return np.where(noisy, rng.integers(0, 256, (height, width, 3)), ramp % 256).astype(np.uint8)


def _encode(image: PIL.Image.Image, fmt: str, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


def _png16_rgb(array: np.ndarray) -> bytes:
  """A 16-bit-per-sample RGB PNG (colour type 2, bit depth 16) of a (H, W, 3) uint16 array."""
  height, width, _ = array.shape
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


def _exif_rotated_jpeg(rgb: np.ndarray) -> bytes:
  exif = PIL.Image.Exif()
  exif[EXIF_ORIENTATION] = 6  # "rotate 90 CW to display": neither path applies it
  return _encode(PIL.Image.fromarray(rgb), "JPEG", quality=92, exif=exif.tobytes())


def _files():
  rgb = _photo(45, 61, 0)
  gray = rgb[..., 1]
  rng = np.random.default_rng(1)
  sixteen = rng.integers(0, 65536, (23, 31, 3), dtype=np.uint16)
  return {
      "jpeg_rgb_420": _encode(PIL.Image.fromarray(rgb), "JPEG", quality=90),
      "jpeg_rgb_444": _encode(PIL.Image.fromarray(rgb), "JPEG", quality=95, subsampling=0),
      "jpeg_progressive": _encode(PIL.Image.fromarray(rgb), "JPEG", progressive=True),
      "jpeg_grayscale": _encode(PIL.Image.fromarray(gray), "JPEG", quality=90),
      "jpeg_exif_rotated": _exif_rotated_jpeg(rgb),
      "png_rgb": _encode(PIL.Image.fromarray(rgb), "PNG"),
      "png_grayscale": _encode(PIL.Image.fromarray(gray), "PNG"),
      "png_palette": _encode(PIL.Image.fromarray(rgb).convert("P"), "PNG"),
      "png_rgba": _encode(PIL.Image.fromarray(np.dstack([rgb, gray])), "PNG"),
      "png_grayscale_alpha": _encode(PIL.Image.fromarray(np.dstack([gray, rgb[..., 0]]), "LA"),
                                     "PNG"),
      "png_16bit_grayscale": _encode(PIL.Image.fromarray(sixteen[..., 0]), "PNG"),
      "png_16bit_rgb": _png16_rgb(sixteen),
  }


FILES = _files()


@pytest.mark.parametrize("kind", sorted(FILES))
def test_decoded_pixels_equal_the_pipeline(kind):
  data = FILES[kind]
  ours = preprocess.decode_image(data)
  theirs = ops.decode_image(data).numpy()  # the pipeline's TF decoder
  assert ours.dtype == np.uint8 and ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["jpeg_rgb_420", "png_16bit_rgb", "png_rgba",
                                  "jpeg_exif_rotated"])
@pytest.mark.parametrize("size", [(384, 384), (224, 224), (20, 17)])
def test_model_inputs_equal_the_pipeline(kind, size):
  decoded = ops.decode_image(FILES[kind])
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  theirs = ops.normalize(ops.resize_bilinear_uint8(decoded, size), mean, std).numpy()
  ours = preprocess.normalize(
      preprocess.resize_bilinear_uint8(preprocess.decode_image(FILES[kind]), size), mean, std)
  np.testing.assert_array_equal(ours, theirs)


def test_sixteen_bit_samples_keep_their_high_byte_not_a_clip():
  """Pillow's own convert('RGB') turns 16-bit grayscale into 255 almost everywhere."""
  values = np.array([[0, 255, 256, 4095, 65535]], np.uint16)
  decoded = preprocess.decode_image(_encode(PIL.Image.fromarray(values), "PNG"))
  np.testing.assert_array_equal(decoded[..., 0], [[0, 0, 1, 15, 255]])
  assert (decoded == decoded[..., :1]).all()


def test_exif_orientation_is_not_applied():
  rgb = _photo(20, 30, 3)
  assert preprocess.decode_image(_exif_rotated_jpeg(rgb)).shape == (20, 30, 3)


@pytest.mark.parametrize("data, message", [
    (b"", "cannot read image"),
    (FILES["jpeg_rgb_420"][:200], "cannot read image"),
    (b"not an image at all", "cannot read image"),
])
def test_unreadable_bytes_name_the_problem(data, message):
  with pytest.raises(preprocess.ImageError, match=message):
    preprocess.decode_image(data)
