"""The training display: what a person watching training reads, in-process or from Ray's events."""

from __future__ import annotations

from ddpm.progress import TrainingDisplay


def test_display_logs_progress_epochs_and_the_best_score():
    lines: list[str] = []
    display = TrainingDisplay(100, 32, log=lines.append, enabled=False)
    for step in range(1, 101):
        display.update(step, loss=0.5 / step)
        if step == 50:
            display.epoch_end(1, 2, 0.07, 0.06, 512.0)
            display.scored(1, 12.5, 500)
    display.epoch_end(2, 2, 0.05, 0.045, 520.0)
    display.scored(2, 14.0, 500)  # worse: the best stays epoch 1
    display.close()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{n}/100" for n in range(10, 101, 10)]  # every tenth
    assert "(50%)" in progress[4] and "loss 0.0100" in progress[4] and "img/s" in progress[4]
    assert "left" in progress[0]
    assert "epoch 1/2: train loss 0.0700, val loss 0.0600, 512 img/s" in lines
    assert "epoch 1: FLD 12.500 on 500 images; best so far epoch 1 (FLD 12.500)" in lines
    assert "epoch 2: FLD 14.000 on 500 images; best so far epoch 1 (FLD 12.500)" in lines


def test_display_resumes_where_training_stands():
    lines: list[str] = []
    display = TrainingDisplay(1000, 32, done=420, log=lines.append, enabled=False)
    display.update(450)
    display.update(500)
    display.close()
    assert [line.split()[1] for line in lines] == ["500/1,000"]  # no line for the steps done before the resume
