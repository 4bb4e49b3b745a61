"""The input pipeline's image preprocessing without TensorFlow, for the predictor and demo.

The training and evaluation inputs come from tf.data (`deris_jax.data.pipeline_ops`); a user's
photo at prediction time goes through this numpy/Pillow twin, which gives the same pixels
(tests/test_preprocess.py compares both on JPEG and PNG files: RGB, grayscale, palette, RGBA,
16-bit, EXIF-rotated). TensorFlow cannot serve here (the model, the predictor and the demo run
without it) and `jax.image.resize` rounds differently from TF's bilinear kernel, hence our own
resize below.

  decode_image    file bytes -> (H, W, 3) uint8 RGB, as the pipeline decodes them: JPEG with
                  the accurate integer DCT (Pillow's default), PNG expanded to RGB with alpha
                  dropped and 16-bit samples cut to their high byte (TF's decode_png does so;
                  Pillow's own conversion would clip them to 255), EXIF orientation not applied.
  resize_bilinear_uint8, normalize, model_images   the model's two input images.
"""
import io
from typing import Dict, Sequence

import numpy as np
import PIL.Image

# Mode of 16-bit single-channel images as Pillow opens them (PNG 'I;16', TIFF 'I;16B', ...).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
  """The bytes are not an image the pipeline could read (the message says why)."""


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
  """(H, W, 3) uint8 RGB of an encoded image (JPEG, PNG, and whatever else Pillow reads)."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb(image, name)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f"cannot read {name}: {e}") from e


def to_rgb(image: PIL.Image.Image, name: str = "image") -> np.ndarray:
  """A decoded Pillow image -> (H, W, 3) uint8 RGB as TF's decoders give it."""
  if image.mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.int64)  # (H, W) 0..65535
    gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)  # high byte, as decode_png
    array = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
  else:
    array = np.asarray(image.convert("RGB"), np.uint8)  # (H, W, 3)
  if array.ndim != 3 or min(array.shape[:2]) < 1:
    raise ImageError(f"{name} is empty (shape {array.shape})")
  return array


def _linear_taps(in_size: int, out_size: int):
  """TF ResizeBilinear (half-pixel centres) source rows: lower, upper, lerp, all float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(src)
  lower = np.maximum(floor, 0).astype(np.int64)  # (out,)
  upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)  # (out,)
  return lower, upper, (src - floor).astype(np.float32)


def resize_bilinear_uint8(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """(H, W, 3) uint8 -> (h, w, 3) uint8 as `pipeline_ops.resize_bilinear_uint8` (TF bilinear,
  no antialiasing, float32 arithmetic in TF's order, round half to even, clip)."""
  y0, y1, ly = _linear_taps(image.shape[0], int(size[0]))
  x0, x1, lx = _linear_taps(image.shape[1], int(size[1]))
  pixels = image.astype(np.float32)  # (H, W, 3)
  top_left, top_right = pixels[y0][:, x0], pixels[y0][:, x1]  # (h, w, 3)
  bottom_left, bottom_right = pixels[y1][:, x0], pixels[y1][:, x1]  # (h, w, 3)
  lx = lx[None, :, None]
  top = top_left + (top_right - top_left) * lx  # (h, w, 3)
  bottom = bottom_left + (bottom_right - bottom_left) * lx  # (h, w, 3)
  resized = top + (bottom - top) * ly[:, None, None]  # (h, w, 3)
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 RGB (..., 3) -> float32 (x - mean) / std."""
  return (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def model_images(pixels: np.ndarray, data_config) -> Dict[str, np.ndarray]:
  """(H, W, 3) uint8 -> {'image': (H', W', 3), 'image_mini': (h, w, 3)} float32, the
  perception and cognition inputs at data.image_size / data.cognition_image_size."""
  return {key: normalize(resize_bilinear_uint8(pixels, data_config[size]), data_config.mean,
                         data_config.std)
          for key, size in (("image", "image_size"), ("image_mini", "cognition_image_size"))}
