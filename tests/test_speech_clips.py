"""tools/speech_clips.py on a few clips: real recordings from espeak-ng and Festival, the test
voice absent from training, transcripts beside the audio, clips.csv, one-line errors."""

from __future__ import annotations

import csv

import numpy as np
import soundfile as sf

import speech_clips


def test_a_few_clips_with_the_test_voice_held_out(tmp_path):
    out = tmp_path / "clips"
    assert speech_clips.main([str(out), "--train", "6", "--test", "2", "--seed", "3"]) == 0
    with open(out / "clips.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["train"] * 6 + ["test"] * 2
    train_voices = {r["voice"] for r in rows if r["split"] == "train"}
    assert {r["voice"] for r in rows if r["split"] == "test"} == {"festival:ked_diphone"}
    assert "festival:ked_diphone" not in train_voices
    assert {v.split(":")[0] for v in train_voices} == {"espeak", "festival"} and len(train_voices) >= 4
    for r in rows:
        audio, rate = sf.read(out / r["path"])
        words = (out / r["path"]).with_suffix(".txt").read_text().split()
        assert words == r["text"].split() and 1 <= len(words) <= 4
        assert set(words) <= set(speech_clips.DIGITS)
        assert rate in (16000, 22050, 32000) and 0.3 < len(audio) / rate < 4
        assert np.abs(audio).max() > 0.01  # speech, not silence
    # the same seed plans the same clips
    again = speech_clips.plan_clips(6, 2, 3)
    assert [(c.voice, c.text, c.settings) for c in again] == [(r["voice"], r["text"], r["settings"]) for r in rows]


def test_bad_arguments_are_one_line(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert speech_clips.main([str(tmp_path / "full")]) == 2
    assert speech_clips.main([str(tmp_path / "new"), "--test-voice", "mbrola:us1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'full'} exists and is not empty; choose a new folder",
                   "error: --test-voice 'mbrola:us1': expected espeak:VOICE or festival:VOICE"]
