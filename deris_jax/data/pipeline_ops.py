"""TensorFlow ops of the input pipeline: image decoding and resizing, masks from run lengths.

Matches the official preprocessing (docs/design.md §8) as closely as TF allows:
- JPEG decoding with the accurate integer DCT, which equals cv2/libjpeg's default (TF's own
  default, INTEGER_FAST, differs by up to 6 grey levels).
- `HierResize(keep_ratio=False)`: cv2 bilinear on uint8; here TF bilinear with half-pixel
  centres and no antialiasing, rounded back to uint8 (cv2 returns uint8). Against the
  official fixture: at most 1 grey level off, 88% of values exact (cv2 uses fixed point).
- GT masks: cv2 INTER_NEAREST, source index floor(x * (1 / (dst / src))) in float64 (this
  exact formula reproduces cv2 on all sizes checked, integer arithmetic does not).
- Normalize: (x - mean) / std on 0-255 RGB for both images.
"""
from deris_jax.data.tf_modules import tf


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """JPEG or PNG bytes -> (H, W, 3) uint8 RGB."""
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_png(data, channels=3, dtype=tf.uint8))


def resize_bilinear_uint8(image: tf.Tensor, size) -> tf.Tensor:
  """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear without antialiasing, rounded like cv2."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear",
                            antialias=False)  # (h, w, 3)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 RGB (..., 3) -> float32 (x - mean) / std."""
  return (tf.cast(images, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
      std, tf.float32)


def nearest_indices(src: tf.Tensor, dst: int) -> tf.Tensor:
  """cv2 INTER_NEAREST source indices for `dst` outputs from `src` inputs, (dst,) int32."""
  src64 = tf.cast(src, tf.float64)
  step = 1.0 / (tf.constant(float(dst), tf.float64) / src64)
  index = tf.floor(tf.range(dst, dtype=tf.float64) * step)
  return tf.cast(tf.minimum(index, src64 - 1), tf.int32)


def resize_masks_nearest(masks: tf.Tensor, size) -> tf.Tensor:
  """(K, H, W) -> (K, h, w), cv2 nearest."""
  rows = nearest_indices(tf.shape(masks)[1], size[0])
  cols = nearest_indices(tf.shape(masks)[2], size[1])
  return tf.gather(tf.gather(masks, rows, axis=1), cols, axis=2)


def decode_rle_masks(runs: tf.RaggedTensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """Column-major run lengths (zeros first), one row per mask -> (K, H, W) uint8."""
  # Not tf.repeat: it materialises (runs x longest run), ~1e8 cells for a COCO background run.
  # Instead: +1 where a run of ones starts, -1 where it ends, then a cumulative sum.
  count = runs.nrows()  # K
  area = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
  values = tf.cast(runs.flat_values, tf.int64)  # (R,)
  mask_of_run = runs.value_rowids()  # (R,)
  run_starts = runs.row_starts()  # (K,) index of each mask's first run
  ends = tf.cumsum(values)  # (R,) end of each run in the concatenation of all masks
  first_end = tf.gather(tf.concat([[0], ends], 0), run_starts)  # (K,) cumsum before mask k
  end = ends - tf.gather(first_end, mask_of_run) + mask_of_run * area  # (R,) flat end offset
  start = end - values
  is_one = (tf.range(tf.size(values, out_type=tf.int64)) - tf.gather(run_starts, mask_of_run)) % 2
  ones = tf.equal(is_one, 1)
  index = tf.concat([tf.boolean_mask(start, ones), tf.boolean_mask(end, ones)], 0)
  step = tf.concat([tf.ones_like(tf.boolean_mask(start, ones), tf.int32),
                    -tf.ones_like(tf.boolean_mask(end, ones), tf.int32)], 0)
  delta = tf.math.unsorted_segment_sum(step, index, count * area + 1)  # (K*H*W + 1,)
  flat = tf.cast(tf.cumsum(delta)[:-1], tf.uint8)  # (K*H*W,) column-major masks
  masks = tf.reshape(flat, tf.stack([count, tf.cast(width, tf.int64), tf.cast(height, tf.int64)]))
  return tf.transpose(masks, (0, 2, 1))  # (K, H, W)


def pad_first_axis(tensor: tf.Tensor, size: int) -> tf.Tensor:
  """Pads (n, ...) with zeros to (size, ...); n <= size."""
  pad = size - tf.shape(tensor)[0]
  paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(tensor) - 1, 2], tf.int32)], 0)
  return tf.pad(tensor, paddings)


def place_on_canvas(mask: tf.Tensor, canvas) -> tf.Tensor:
  """(H, W) at the top-left of a zero (canvas_h, canvas_w) canvas (H, W <= canvas)."""
  shape = tf.shape(mask)
  return tf.pad(mask, [[0, canvas[0] - shape[0]], [0, canvas[1] - shape[1]]])
