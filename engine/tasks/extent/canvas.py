"""The latent canvas in a file, stepped band by band: memory flat in the extent.

For a stateless, elementwise scheduler (DDIM: its step depends only on the timestep, the noise
prediction and the sample at each latent), one denoising step does not need the canvas in RAM.
The windows are visited row-major; the blended noise prediction of a band of canvas rows is final
as soon as the last window-row touching it is done, and those rows are stepped and written to the
next canvas file at once. RAM holds one band of window rows (a window's height plus the overlap
carried to the next window-row) of the canvas width; the canvas itself lives in two files (the
current and the next step's latents), read and written with plain ``pread``/``pwrite`` (pages of
a memory map would count as the process's resident memory; see engine.geo.accumulate.Accumulator).

The pixels are those of the in-RAM canvas (engine.tasks.extent.joint.joint_denoise): the same
windows, blended in the same order, the same elementwise step (tests/engine/test_extent.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...atomic import disk_full, is_disk_full
from ...progress import CancelToken, Progress, ProgressCallback, report

#: Scheduler classes whose step is elementwise and keeps no state between calls (chunkable).
STATELESS = ("DDIMScheduler",)


def streams(scheduler) -> bool:
    """Whether ``scheduler``'s steps can run band by band (else the canvas is held in RAM)."""
    return type(scheduler).__name__ in STATELESS


class CanvasFile:
    """A (height, width, channels) float32 canvas in a file, pixel-interleaved rows: a band of
    rows is one contiguous span, a window's columns one span per row. Not memory-mapped."""

    def __init__(self, path: Path, height: int, width: int, channels: int = 4) -> None:
        self.path, self.height, self.width, self.channels = Path(path), height, width, channels
        self.rowbytes = width * channels * 4
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self._fd, height * self.rowbytes)
        except OSError as exc:
            self.close()
            if is_disk_full(exc):
                raise disk_full(self.path.parent, height * self.rowbytes, "the latent canvas") from exc
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write_rows(self, y0: int, block: np.ndarray) -> None:
        """``block``: (channels, rows, width) float32 -> rows y0.. of the canvas."""
        data = np.ascontiguousarray(block.transpose(1, 2, 0), dtype=np.float32)
        view = memoryview(data).cast("B")
        offset, done = y0 * self.rowbytes, 0
        while done < len(view):
            try:
                n = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(self.path.parent, len(view) - done, "the latent canvas") from exc
                raise
            done += n

    def read(self, y0: int, y1: int, x0: int = 0, x1: Optional[int] = None) -> np.ndarray:
        """Rows y0..y1, columns x0..x1 as (channels, rows, cols) float32."""
        x1 = self.width if x1 is None else x1
        out = np.empty((y1 - y0, x1 - x0, self.channels), dtype=np.float32)
        if x0 == 0 and x1 == self.width:
            self._read_into(out, y0 * self.rowbytes)
        else:
            for i, y in enumerate(range(y0, y1)):
                self._read_into(out[i], y * self.rowbytes + x0 * self.channels * 4)
        return out.transpose(2, 0, 1)

    def _read_into(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(array).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if not n:
                raise OSError(f"short read from {self.path}")
            done += n


def streamed_denoise(pipe, layout, predict, *, steps_kwargs: dict, seed: int, folder: Path,
                     batch_size: int, weights: list, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, known=None) -> CanvasFile:
    """Joint denoising with the canvas in files (see the module docstring); returns the open file
    of the final latents (the caller closes it and removes ``folder``'s files). ``predict`` and
    ``weights`` as in :func:`engine.tasks.extent.joint.joint_denoise`; the scheduler's timesteps
    are set.

    ``known`` (``extend``: a region of the canvas held to known latents) has ``skip(k)`` (window
    ``k`` lies where the known latents replace everything: no UNet call), ``start(y0, block)``
    (the initial rows y0.. of the canvas, (4, rows, width) numpy) and ``replace(y0, stepped, i)``
    (rows y0.. after step ``i``, (1, 4, rows, width) torch); see engine.tasks.extend."""
    from .joint import NOISE_BLOCK, _view, canvas_noise

    windows = list(layout.windows)
    n, size = len(windows), layout.window
    height, width = layout.canvas_h, layout.canvas_w
    timesteps = pipe.scheduler.timesteps
    total = len(timesteps)
    files = [CanvasFile(folder / "canvas-a.f32", height, width), CanvasFile(folder / "canvas-b.f32", height, width)]
    try:
        sigma = float(pipe.scheduler.init_noise_sigma)
        for y0 in range(0, height, NOISE_BLOCK):
            y1 = min(height, y0 + NOISE_BLOCK)
            block = canvas_noise(seed, height, width, rows=slice(y0, y1))[0] * sigma
            if known is not None:
                block = torch.from_numpy(known.start(y0, block.numpy()))
            files[0].write_rows(y0, block.numpy())
        # window rows: (first row, indices of its windows), row-major as planned
        bands: list[tuple[int, list[int]]] = []
        skipped = {k for k in range(n) if known.skip(k)} if known is not None else set()
        n -= len(skipped)  # progress counts the windows that run
        for k, w in enumerate(windows):
            y = int(w.window.row_off)
            if not bands or bands[-1][0] != y:
                bands.append((y, []))
            bands[-1][1].append(k)
        report(progress, Progress(step=0, total_steps=n, tile=0, total_tiles=total, message="denoising"))
        for i, t in enumerate(timesteps):
            current, target = files[i % 2], files[(i + 1) % 2]
            acc_y0 = 0  # first canvas row held in the accumulators
            eps_sum = np.zeros((4, 0, width), np.float32)
            w_sum = np.zeros((1, 0, width), np.float32)
            done = 0
            for b, (y, members) in enumerate(bands):
                band = current.read(y, y + size)
                # grow the accumulators down to this window-row's last row
                grow = y + size - (acc_y0 + eps_sum.shape[1])
                if grow > 0:
                    eps_sum = np.concatenate([eps_sum, np.zeros((4, grow, width), np.float32)], axis=1)
                    w_sum = np.concatenate([w_sum, np.zeros((1, grow, width), np.float32)], axis=1)
                for start in range(0, len(members), batch_size):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    index = members[start:start + batch_size]
                    if skipped:
                        index = [k for k in index if k not in skipped]
                        if not index:
                            continue
                    views = [_view(windows[k]) for k in index]
                    x = torch.stack([torch.from_numpy(band[:, :, c]) for _, c in views])
                    eps = predict(x, t, index).numpy()
                    for j, k in enumerate(index):
                        r, c = views[j]
                        rr = slice(r.start - acc_y0, r.stop - acc_y0)
                        eps_sum[:, rr, c] += eps[j] * weights[k]
                        w_sum[:, rr, c] += weights[k]
                    for _ in index:  # one "denoising" update per window step (the run's meter counts them)
                        done += 1
                        report(progress, Progress(step=done, total_steps=n, tile=i, total_tiles=total,
                                                  message="denoising"))
                # rows no later window-row touches are final: step them and write them out
                final_to = bands[b + 1][0] if b + 1 < len(bands) else acc_y0 + eps_sum.shape[1]
                m = final_to - acc_y0
                if m > 0:
                    if skipped:  # rows only skipped windows cover: no prediction (the known latents replace them)
                        with np.errstate(invalid="ignore", divide="ignore"):
                            noise = torch.from_numpy(np.where(w_sum[:, :m] > 0, eps_sum[:, :m] / w_sum[:, :m],
                                                              0).astype(np.float32))[None]
                    else:
                        noise = torch.from_numpy(eps_sum[:, :m] / w_sum[:, :m])[None]
                    sample = torch.from_numpy(np.ascontiguousarray(band[:, :m]))[None]  # acc_y0 == y
                    stepped = pipe.scheduler.step(noise, t, sample, **steps_kwargs).prev_sample
                    if known is not None:
                        stepped = known.replace(acc_y0, stepped, i)
                    target.write_rows(acc_y0, stepped[0].numpy())
                    eps_sum, w_sum = eps_sum[:, m:].copy(), w_sum[:, m:].copy()
                    acc_y0 = final_to
        if cancel is not None:
            cancel.raise_if_cancelled()
        final = files[total % 2]
        files[(total + 1) % 2].close()
        os.unlink(files[(total + 1) % 2].path)
        return final
    except BaseException:
        for f in files:
            f.close()
            Path(f.path).unlink(missing_ok=True)
        raise
