"""The training display: one bar over optimizer steps (loss, images/s, time left) and one line per epoch.

In-process training drives it from `fit`; Ray training drives the same display on the driver from the events
the workers send it (`flows.channel`), so a run looks alike wherever it trains. Lines also go to `log` (e.g. a
Prefect run logger), with a progress line every `log_every` of the steps, since a log has no live bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

RATE_WINDOW_S = 60.0  # images/s and time left are measured over about this much recent training


class TrainingDisplay:
    def __init__(self, total_steps: int, batch_size: int, *, done: int = 0, log: Callable[[str], None] | None = None,
                 log_every: float = 0.1, enabled: bool = True):
        self.batch_size, self.log, self.total = batch_size, log, total_steps
        self.log_step = max(1, round(total_steps * log_every))
        self.next_log = (done // self.log_step + 1) * self.log_step
        # A terminal redraws the bar in place; a log file (make run piped, CI) gets a line every 30 s instead.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total_steps, initial=done, desc="train U-Net", unit="step", disable=not enabled,
                        mininterval=interval, maxinterval=max(interval, 10.0), dynamic_ncols=True)
        self.done = done
        self.window: list[tuple[float, int]] = [(time.monotonic(), done)]  # (time, step) of recent updates
        self.loss: float | None = None
        self.rate = 0.0  # images/s, the last measured
        self.best: tuple[int, float] | None = None  # (epoch, FLD)

    def images_per_s(self) -> float:
        """Over the last minute or so of training: scoring and validation between epochs are not training."""
        if len(self.window) >= 2:
            (t0, s0), (t1, s1) = self.window[0], self.window[-1]
            if t1 > t0:
                self.rate = (s1 - s0) * self.batch_size / (t1 - t0)
        return self.rate

    def update(self, step: int, loss: float | None = None) -> None:
        """Training has completed `step` optimizer steps; `loss` is the latest checked batch loss."""
        if loss is not None:
            self.loss = loss
        if step > self.done:
            now = time.monotonic()
            self.window.append((now, step))
            while len(self.window) > 2 and now - self.window[1][0] > RATE_WINDOW_S:
                self.window.pop(0)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(step - self.done)
            self.done = step
        if self.log is not None and step >= self.next_log:
            self.next_log = (step // self.log_step + 1) * self.log_step
            self.line(f"step {step:,}/{self.total:,} ({step / self.total:.0%}) | {self._postfix()} | "
                      f"{_duration(self._left())} left", log_only=True)

    def _postfix(self) -> str:
        loss = f"loss {self.loss:.4f}, " if self.loss is not None else ""
        return f"{loss}{self.images_per_s():.0f} img/s"

    def _left(self) -> float:
        rate = self.images_per_s() / self.batch_size
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def epoch_end(self, epoch: int, epochs: int, train_loss: float, val_loss: float, images_per_s: float) -> None:
        self.window = []  # the rate restarts from the next epoch's first step
        self.line(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                  f"{images_per_s:.0f} img/s")

    def scored(self, epoch: int, fld: float, images: int) -> None:
        """An epoch's FLD has landed (on Ray it comes while later epochs train)."""
        if self.best is None or fld < self.best[1]:
            self.best = (epoch, fld)
        self.line(f"epoch {epoch}: FLD {fld:.3f} on {images:,} images; best so far epoch {self.best[0]} "
                  f"(FLD {self.best[1]:.3f})")

    def line(self, text: str, log_only: bool = False) -> None:
        """A line above the bar (the bar is cleared and redrawn around it), to `log` if given."""
        if self.log is not None:
            with tqdm.external_write_mode(file=sys.stderr):
                self.log(text)
        elif not self.bar.disable and not log_only:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
