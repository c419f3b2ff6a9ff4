"""Speech data (jaxtune.data.audio): WAV/FLAC read, resampled with soxr and normalised; audio:DIR
folders and CSV/JSONL tables; the character vocabulary; one-line errors (or skip-and-count) for
unreadable, empty, silent or too-long audio, missing transcripts and characters outside the
vocabulary; batches (buckets, labels) and the resumable iterator."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jaxtune.config import DataConfig
from jaxtune.data import build_data
from jaxtune.data.audio import (AudioFormat, AudioSettings, CharVocab, audio_buckets, normalize_text, read_audio,
                                zero_mean_unit_var)
from jaxtune.errors import DataError

TEXTS = ["one two", "three", "four five six", "seven", "eight nine", "zero one", "two  three ", "four"]


def tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.sin(2 * np.pi * 3 * freq * t)).astype(np.float32)


def write_folder(root: Path, texts=TEXTS, rate: int = 22050, fmt: str = "wav") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        sf.write(root / f"{i:02d}.{fmt}", tone(0.3 + 0.1 * i, rate, 150 + 40 * i), rate)
        (root / f"{i:02d}.txt").write_text(text + "\n")
    return root


def cfg(tmp_path, **kw) -> DataConfig:
    return replace(DataConfig(), cache_dir=str(tmp_path / "cache"), max_length=32, max_seconds=2.0,
                   validation_fraction=0.0, **kw)


def test_read_audio_resamples_and_normalises(tmp_path):
    x = tone(0.5, 22050)
    sf.write(tmp_path / "a.flac", np.stack([x, 0.5 * x], 1), 22050)  # stereo FLAC at 22.05 kHz
    y = read_audio(tmp_path / "a.flac", AudioSettings(16000, do_normalize=True))
    assert y.dtype == np.float32 and abs(len(y) - 8000) <= 1
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-3
    raw = read_audio(tmp_path / "a.flac", AudioSettings(22050, do_normalize=False))
    np.testing.assert_allclose(raw, 0.75 * x, atol=1e-4)  # mono mix-down, no resampling
    # transformers' zero_mean_unit_var_norm on the same samples
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(do_normalize=True)
    theirs = fe(raw, sampling_rate=16000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(zero_mean_unit_var(raw), theirs, atol=1e-5)


@pytest.mark.parametrize("content,needle", [
    (b"", "cannot decode audio"),
    (b"RIFF not really a wave file", "cannot decode audio"),
])
def test_unreadable_audio_names_the_file(tmp_path, content, needle):
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(DataError, match=needle) as e:
        read_audio(tmp_path / "bad.wav", AudioSettings())
    assert str(tmp_path / "bad.wav") in str(e.value) and "\n" not in str(e.value)


def test_vocabulary_from_transcripts_and_from_a_model_folder(tmp_path):
    v = CharVocab.from_transcripts(["b a", "a  c"])
    assert v.tokens == ("<pad>", "<unk>", "|", "a", "b", "c") and v.blank_id == 0
    assert v.encode(" a  b ") == [3, 2, 4] and v.decode([3, 2, 0, 4, 1]) == "a b"
    assert v.unknown("a d e d") == ["d", "e"]
    v.save_pretrained(tmp_path / "m", AudioSettings(8000, False))
    back = CharVocab.from_model(tmp_path / "m")
    assert back == v and AudioSettings.from_model(tmp_path / "m") == AudioSettings(8000, False)
    from transformers import Wav2Vec2Processor

    proc = Wav2Vec2Processor.from_pretrained(str(tmp_path / "m"))  # what an export holds, read by transformers
    assert proc.tokenizer.decode([3, 2, 4]) == "a b" and proc.feature_extractor.sampling_rate == 8000
    assert normalize_text("  a \t b\n") == "a b"


def test_audio_buckets():
    assert audio_buckets(16000) == (8000, 10000, 12500, 15625, 16000)
    assert audio_buckets(4000) == (4000,)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A folder of 8 WAVs at 22.05 kHz with transcripts, its data (16 kHz, batch 4) built once."""
    tmp = tmp_path_factory.mktemp("speech")
    folder = write_folder(tmp / "train")
    c = cfg(tmp, train=f"audio:{folder}")
    return tmp, folder, c, build_data(c, "ctc", batch_size=4, seed=0, shard_index=0, shard_count=1)


def test_folder_becomes_batches_of_resampled_audio_and_character_labels(speech):
    tmp, folder, c, data = speech
    assert data.num_examples == {"train": 8}
    vocab = CharVocab(tuple(data.label_names))
    assert data.label_names[:3] == ["<pad>", "<unk>", "|"] and "e" in data.label_names
    batches = list(data.eval_batches("train"))
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"input_values", "attention_mask", "labels", "weights"}
    assert b["input_values"].dtype == np.float32 and b["labels"].shape == (4, 32)
    lengths = b["attention_mask"].sum(1)
    expected = [round((0.3 + 0.1 * i) * 16000) for i in range(4)]
    assert np.abs(lengths - expected).max() <= 1  # 22.05 kHz -> 16 kHz
    assert b["input_values"].shape[1] == 10000  # the smallest bucket holding 0.6 s
    for row, n in zip(b["input_values"], lengths):
        assert abs(float(row[:n].mean())) < 1e-4 and abs(float(row[:n].std()) - 1) < 1e-3 and not row[n:].any()
    decoded = [vocab.decode([t for t in row if t >= 0]) for row in b["labels"]]
    assert decoded == [normalize_text(t) for t in TEXTS[:4]]


def test_train_iterator_resumes_exactly(speech):
    *_, data = speech
    it = data.train_iterator()
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = data.train_iterator()
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(3))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_tables_with_relative_paths(tmp_path, speech):
    _, folder, *_ = speech
    rows = [{"path": f"{folder.name}/{i:02d}.wav", "sentence": t} for i, t in enumerate(TEXTS)]
    (folder.parent / "clips.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(folder.parent / "clips.csv", "w") as f:
        f.write("path,sentence\n" + "".join(f"{r['path']},{r['sentence']}\n" for r in rows))
    c = cfg(tmp_path, train=f"jsonl:{folder.parent / 'clips.jsonl'}", test=f"csv:{folder.parent / 'clips.csv'}",
            audio_column="path", text_column="sentence", deduplicate=False)
    data = build_data(c, "ctc", batch_size=8, seed=0, shard_index=0, shard_count=1)
    assert data.num_examples == {"train": 8, "test": 8}
    a, b = next(data.eval_batches("train")), next(data.eval_batches("test"))
    np.testing.assert_array_equal(a["input_values"], b["input_values"])


def test_problems_are_one_line_errors_or_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "bad", TEXTS[:4])
    sf.write(root / "10.wav", tone(3.0, 16000), 16000)  # longer than max_seconds 2
    (root / "10.txt").write_text("one\n")
    sf.write(root / "11.wav", np.zeros(800, np.float32), 16000)  # silence: nothing to normalise
    (root / "11.txt").write_text("two\n")
    sf.write(root / "12.wav", tone(0.5, 16000), 16000)  # no transcript
    (root / "13.wav").write_bytes(b"not audio")
    (root / "13.txt").write_text("three\n")
    sf.write(root / "14.wav", np.zeros(0, np.float32), 16000)  # a valid WAV without samples
    (root / "14.txt").write_text("four\n")
    sf.write(root / "15.wav", tone(0.5, 16000), 16000)
    (root / "15.txt").write_text(" \n")  # an empty transcript
    (root / "16.wav").write_bytes((root / "00.wav").read_bytes())  # the same recording twice
    (root / "16.txt").write_text("one two\n")
    cases = [("10.wav", "longer than data.max_seconds"), ("11.wav", "constant"), ("12.wav", "no transcript"),
             ("13.wav", "cannot decode audio"), ("14.wav", "holds no samples"), ("15.wav", "transcript is empty")]
    for name, needle in cases:
        folder = tmp_path / f"only-{name}"
        write_folder(folder, TEXTS[:2])
        for suffix in (".wav", ".txt"):
            if (root / name).with_suffix(suffix).exists():
                (folder / name).with_suffix(suffix).write_bytes((root / name).with_suffix(suffix).read_bytes())
        with pytest.raises(DataError, match=needle) as e:
            build_data(cfg(tmp_path, train=f"audio:{folder}"), "ctc", batch_size=2, shard_index=0, shard_count=1)
        assert str(folder / name) in str(e.value) and "\n" not in str(e.value)
    data = build_data(cfg(tmp_path, train=f"audio:{root}", skip_bad_rows=True), "ctc", batch_size=2,
                      shard_index=0, shard_count=1)
    assert data.num_examples == {"train": 4}
    (report,) = list(data.report)
    assert report.dropped == {"audio longer than 2 s": 1, "unreadable or empty audio": 3, "no transcript": 1,
                              "empty transcript": 1, "duplicate recording": 1}


def test_characters_outside_the_vocabulary(tmp_path, speech):
    _, folder, *_ = speech
    test = write_folder(tmp_path / "test", ["one", "q-ray one"])
    c = cfg(tmp_path, train=f"audio:{folder}", test=f"audio:{test}", deduplicate=False)
    with pytest.raises(DataError, match=r"outside the vocabulary: 'q', '-', 'a', 'y'") as e:
        build_data(c, "ctc", batch_size=2, shard_index=0, shard_count=1)
    assert str(test / "01.wav") in str(e.value)
    data = build_data(replace(c, skip_bad_rows=True), "ctc", batch_size=2, shard_index=0, shard_count=1)
    assert data.num_examples["test"] == 1
    # a model's vocabulary (here without 'z') is used as given, and checked on train too
    vocab = CharVocab(("<pad>", "<unk>", "|", *"efghinorstuvwx"))
    with pytest.raises(DataError, match="'z'"):
        build_data(cfg(tmp_path, train=f"audio:{folder}"), "ctc", batch_size=2, shard_index=0, shard_count=1,
                   audio=AudioFormat(vocab=vocab))


def test_transcript_longer_than_max_length(tmp_path, speech):
    _, folder, *_ = speech
    with pytest.raises(DataError, match=r"13 characters, more than data.max_length \(12\)") as e:
        build_data(replace(cfg(tmp_path, train=f"audio:{folder}"), max_length=12), "ctc", batch_size=2,
                   shard_index=0, shard_count=1)
    assert str(folder / "02.wav") in str(e.value)
