"""What the loop reports: a console progress bar with ETA, log lines, TensorBoard scalars.

Only process 0 writes (console and event files); every process may call the methods.
Event files go to WORKDIR/tensorboard (tensorboardX; TensorFlow is not needed).
The tqdm bar is drawn only when stderr is a terminal; every train log line carries the ETA
too, so redirected logs (CI, cluster jobs) stay readable.
"""
import pathlib
import sys
import time
from typing import Dict, Mapping, Optional

import jax
import numpy as np
import tensorboardX
import tqdm

# Metric name -> short console label, in console order (other metrics go to TensorBoard only).
CONSOLE = (("loss", "loss"), ("total/loss_class", "cls"), ("total/loss_mask", "mask"),
           ("total/loss_label_nt", "exist"), ("grad_norm", "gnorm"), ("lr", "lr"),
           ("images_per_s", "img/s"))
_FORMATS = {"lr": "{:.3g}", "images_per_s": "{:.1f}"}


def mean_metrics(history) -> Dict[str, float]:
  """Host copies of a list of per-step metric dicts -> the mean of each metric."""
  if not history:
    return {}
  return {k: float(np.mean([np.asarray(h[k]) for h in history])) for k in history[0]}


class Reporter:
  """Console and TensorBoard output of one run."""

  def __init__(self, workdir, *, total_steps: int, start_step: int, tensorboard: bool):
    self.is_main = jax.process_index() == 0
    self.total_steps = total_steps
    self._bar = None
    self._writer = None
    self._last = None  # (time, step) of the previous train line: the rate behind the ETA
    if not self.is_main:
      return
    if tensorboard:
      self._writer = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
    if sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

  def log(self, message: str) -> None:
    if not self.is_main:
      return
    if self._bar is not None:
      self._bar.write(message, file=sys.stdout)
    else:
      print(message, flush=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def scalars(self, step: int, metrics: Mapping[str, float], prefix: str) -> None:
    if self._writer is None:
      return
    for name, value in metrics.items():
      if np.ndim(value) == 0 and np.isfinite(value):
        self._writer.add_scalar(f"{prefix}/{name}", float(value), step)
    self._writer.flush()

  def eta_seconds(self, step: int) -> Optional[float]:
    """Seconds left at the rate since the previous train line (None on the first)."""
    now = time.perf_counter()
    last, self._last = self._last, (now, step)
    if last is None or step <= last[1]:
      return None
    return (now - last[0]) / (step - last[1]) * (self.total_steps - step)

  def train_line(self, step: int, metrics: Mapping[str, float]) -> None:
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{label} {_FORMATS.get(key, '{:.4f}').format(metrics[key])}"
              for key, label in CONSOLE if key in metrics]
    eta = self.eta_seconds(step)
    if eta is not None and step < self.total_steps:
      parts.append(f"eta {format_seconds(eta)}")
    self.log("  ".join(parts))
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)

  def eval_line(self, step: int, split: str, metrics: Mapping[str, float],
                score_threshold: float) -> None:
    self.log(f"eval step {step} [{split}] tau {score_threshold:g}  " + "  ".join(
        f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float))))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


def format_seconds(seconds: Optional[float]) -> str:
  if seconds is None:
    return "?"
  minutes, sec = divmod(int(seconds), 60)
  return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"
