"""jaxtune.runlog: metrics.jsonl on resume, console lines vs progress bar, the curves PNG."""

import json

from jaxtune.runlog import RunLog, fmt_metrics, plot_curves, read_metrics, truncate_metrics


def write_run(d, steps=range(1, 7), **kw):
    log = RunLog(d, total_steps=max(steps), log_every=2, **kw)
    for s in steps:
        log.progress(s, {"loss": 1.0 / s, "lr": 1e-3}, examples_per_s=100.0)
        if s % 2 == 0:
            log.write(s, "train", {"loss": 1.0 / s, "lr": 1e-3}, examples_per_s=100.0, time=float(s))
        if s % 3 == 0:
            log.write(s, "validation", {"loss": 2.0 / s, "accuracy": s / 10})
    log.write(max(steps), "test", {"accuracy": 0.5})
    log.close()


def test_lines_parse_and_resume_drops_what_comes_after(tmp_path, capsys):
    write_run(tmp_path, tty=False)
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()] == ["2/6", "4/6", "6/6"]  # every log_every
    lines = read_metrics(tmp_path)
    assert [(m["step"], m["split"]) for m in lines] == [
        (2, "train"), (3, "validation"), (4, "train"), (6, "train"), (6, "validation"), (6, "test")]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "spl')  # a line torn by a kill
    assert len(read_metrics(tmp_path)) == 6
    RunLog(tmp_path, resume_step=4, tty=False).close()  # resuming from step 4
    assert [(m["step"], m["split"]) for m in read_metrics(tmp_path)] == [(2, "train"), (3, "validation"), (4, "train")]
    truncate_metrics(tmp_path, None)
    assert read_metrics(tmp_path) == []


def test_non_finite_values_are_written_as_null(tmp_path):
    log = RunLog(tmp_path, tty=False)
    log.write(1, "train", {"loss": float("nan"), "lr": float("inf")})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "split": "train", "loss": None, "lr": None}


def test_a_terminal_gets_a_progress_bar_with_loss_lr_and_speed(tmp_path, capsys):
    write_run(tmp_path, tty=True)
    captured = capsys.readouterr()
    assert "step " not in captured.out  # no plain lines
    assert "6/6" in captured.err and "loss 0.1667" in captured.err and "lr 1.00e-03" in captured.err
    assert "100.0 ex/s" in captured.err


def test_plot_and_formatting(tmp_path):
    write_run(tmp_path, tty=False)
    png = plot_curves(tmp_path, "accuracy")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert plot_curves(tmp_path / "empty") is None
    assert fmt_metrics({"loss": 0.5, "macro_f1": 0.25, "accuracy": 1.0}) == "accuracy 1.0000, macro-F1 0.2500, loss 0.5000"


def test_only_the_main_process_writes(tmp_path, capsys):
    log = RunLog(tmp_path, main=False, tty=False)
    log.write(1, "train", {"loss": 1.0})
    log.progress(10, {"loss": 1.0, "lr": 0.1}, 1.0)
    log.say("hello")
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""
