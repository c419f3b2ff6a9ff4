"""Task ctc: the loss equals transformers' CTC loss (both reductions, padded batches); greedy
decoding and WER/CER equal jiwer on the decoded text; ctc_zero_infinity; the feature encoder is
frozen by default; `jaxtune verify --task ctc`; and one user-facing run: `jaxtune run` on a
folder of WAVs, its export read by transformers with jaxtune's logits, `jaxtune predict` printing
transcripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import jiwer
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from jaxtune.cli import main
from jaxtune.data.audio import CharVocab
from jaxtune.models import from_pretrained
from jaxtune.tasks import get_task
from jaxtune.tasks.ctc import greedy_collapse

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, conv_dim=(8, 8),
            conv_stride=(3, 2), conv_kernel=(5, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
            vocab_size=9, layerdrop=0.0)


@pytest.fixture(scope="module")
def tiny_ctc(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("w2v-ctc")
    model.save_pretrained(path)
    return path, model


def padded_batch():
    rng = np.random.default_rng(0)
    mask = np.ones((3, 300), np.int64)
    mask[1, 200:] = 0
    mask[2, 150:] = 0
    labels = np.full((3, 12), -100, np.int64)
    for i, row in enumerate([[3, 4, 4, 2, 5], [6, 7, 2, 8, 3, 3, 1], [5, 5, 5]]):
        labels[i, :len(row)] = row
    return {"input_values": (rng.normal(size=(3, 300)) * mask).astype(np.float32), "attention_mask": mask,
            "labels": labels}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_equals_transformers_ctc_loss(tiny_ctc, reduction):
    import torch
    import transformers

    path, _ = tiny_ctc
    theirs = transformers.Wav2Vec2ForCTC.from_pretrained(str(path), ctc_loss_reduction=reduction).eval()
    batch = padded_batch()
    with torch.no_grad():
        ref = theirs(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss.item()
    model = from_pretrained(path, config_overrides={"ctc_loss_reduction": reduction})
    task = get_task("ctc", model.config)
    loss, _ = task.loss(model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits,
                        batch)
    # transformers sums over the batch ("sum") or averages per-token losses ("mean"); jaxtune averages
    # over recordings in both
    want = ref / 3 if reduction == "sum" else ref
    assert abs(float(loss) - want) <= 1e-4 * max(1.0, abs(want))


def test_zero_infinity_zeroes_impossible_alignments(tiny_ctc):
    path, _ = tiny_ctc
    model = from_pretrained(path, config_overrides={"ctc_zero_infinity": True, "ctc_loss_reduction": "sum"})
    batch = padded_batch()
    # row 2: 120 samples give 19 frames; 12 equal labels need 23 (a blank between repeats)
    batch["attention_mask"][2, 120:] = 0
    batch["labels"][2] = [5] * 12
    logits = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits
    task = get_task("ctc", model.config)
    per_example, frames = task.per_example_loss(logits, batch)
    assert np.asarray(frames).tolist() == [49, 32, 19]
    assert float(per_example[2]) == 0.0 and float(per_example[0]) > 0
    plain = get_task("ctc", from_pretrained(path).config).per_example_loss(logits, batch)[0]
    assert float(plain[2]) > 1e3 and float(plain[0]) == pytest.approx(float(per_example[0]))


def test_greedy_decoding_and_wer_cer_equal_jiwer_on_the_text():
    vocab = CharVocab(("<pad>", "<unk>", "|", "a", "b", "c", "d"))
    task = get_task("ctc").__class__(vocab=vocab.tokens, blank_id=0)
    refs = ["ab cd", "a b c", "dd"]
    hyps = ["ab cc", "a c", "dd a"]
    frames = 12

    def path_for(text):  # a CTC path: each char twice, blanks between doubled letters
        ids = []
        for c in text:
            tok = vocab.index["|" if c == " " else c]
            ids += [tok, tok] if not ids or ids[-1] != tok else [0, tok]
        return ids + [0] * (frames - len(ids))

    pred = np.array([path_for(h) for h in hyps], np.int32)
    assert [vocab.decode(greedy_collapse(p, frames, 0)) for p in pred] == hyps
    labels = np.full((4, 8), -100, np.int32)
    for i, r in enumerate(refs):
        labels[i, :len(vocab.encode(r))] = vocab.encode(r)
    pred = np.concatenate([pred, pred[:1]])  # a weight-0 filler row must not count
    outputs = {"loss_sum": jnp.float32(6.0), "weight_sum": jnp.float32(3.0), "pred": pred,
               "pred_lengths": np.full(4, frames), "labels": labels, "weights": np.array([1, 1, 1, 0], np.float32)}
    totals = task.accumulate(None, {k: (v if k.endswith("sum") else v[:2]) for k, v in outputs.items()})
    rest = {k: (v if k.endswith("sum") else v[2:]) for k, v in outputs.items()}
    totals = task.accumulate(totals, {**rest, "loss_sum": jnp.float32(0.0), "weight_sum": jnp.float32(0.0)})
    m = task.metrics(totals)
    assert m["loss"] == 2.0
    assert m["wer"] == pytest.approx(jiwer.wer(refs, hyps)) and m["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert 0 < m["cer"] < m["wer"]


def test_verify_ctc_against_transformers(tiny_ctc):
    from jaxtune.models.verify import verify

    task, diffs = verify(tiny_ctc[0], "ctc", batch=2, seq=400)
    assert task == "ctc" and set(diffs) == {"logits", "last_hidden_state"}
    assert max(diffs.values()) <= 1e-4


def write_clips(folder, texts, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, text in enumerate(texts):
        t = np.arange(4800) / 16000
        x = np.sin(2 * np.pi * (200 + 50 * (len(text) + i)) * t) + 0.1 * rng.normal(size=t.size)
        sf.write(folder / f"{i}.wav", x.astype(np.float32), 16000)
        (folder / f"{i}.txt").write_text(text)


def test_run_export_and_predict_from_the_command_line(tmp_path):
    """`jaxtune run` (a Wav2Vec2 from model.config, CTC, the feature encoder frozen by default)
    on audio:DIR splits; the export is read by transformers (AutoModelForCTC and
    Wav2Vec2Processor) with jaxtune's logits; `jaxtune predict` prints one transcript per file."""
    import torch
    import transformers

    write_clips(tmp_path / "train", ["one two", "three", "two one", "three two", "one", "two"], 0)
    write_clips(tmp_path / "test", ["one three", "two"], 1)
    recipe = {
        "task": "ctc",
        "model": {"config": {"model_type": "wav2vec2", **TINY, "vocab_size": 4, "mask_time_length": 2,
                             "ctc_loss_reduction": "mean"}},
        "data": {"train": f"audio:{tmp_path / 'train'}", "test": f"audio:{tmp_path / 'test'}",
                 "validation_fraction": 0.0, "max_seconds": 1.0, "max_length": 16,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 3, "steps": 4, "metric": "wer", "metric_mode": "min", "log_every": 2},
        "optim": {"lr": 1e-3}, "checkpoint": {"async_save": False},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "speech.yaml").write_text(json.dumps(recipe))
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's machine has
    run = subprocess.run([sys.executable, "-m", "jaxtune.cli", "run", str(tmp_path / "speech.yaml")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["test"]) >= {"loss", "wer", "cer"} and summary["test"]["wer"] >= 0
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    vocab = json.loads((export / "vocab.json").read_text())
    # the vocabulary built from the transcripts sized the head: <pad> <unk> | e h n o r t w
    assert config["vocab_size"] == len(vocab) == 10 and vocab["<pad>"] == config["pad_token_id"] == 0
    # the feature encoder did not train: it equals a fresh model's from the same seed
    from jaxtune.models import from_config

    fresh = from_config({**recipe["model"]["config"], "vocab_size": 10}, "ctc", seed=0)
    trained = from_pretrained(export)
    for i in range(2):
        a = trained.wav2vec2.feature_extractor.conv_layers[i].conv.kernel[...]
        b = fresh.wav2vec2.feature_extractor.conv_layers[i].conv.kernel[...]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)  # init: eager vs jit, 1 ulp
    assert np.abs(np.asarray(trained.lm_head.kernel[...]) - np.asarray(fresh.lm_head.kernel[...])).max() > 0
    proc = transformers.Wav2Vec2Processor.from_pretrained(str(export))
    theirs = transformers.AutoModelForCTC.from_pretrained(str(export)).eval()
    audio, _ = sf.read(tmp_path / "test" / "0.wav", dtype="float32")
    inputs = proc(audio, sampling_rate=16000, return_tensors="np")
    with torch.no_grad():
        ref = theirs(torch.from_numpy(inputs.input_values)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(input_values=inputs.input_values).logits), ref, atol=1e-4)
    pred = CliRunner().invoke(main, ["predict", str(export), str(tmp_path / "test" / "0.wav"),
                                     str(tmp_path / "test" / "1.wav")])
    assert pred.exit_code == 0, pred.output[-2000:]
    lines = [l for l in pred.output.splitlines() if "<-" in l]
    assert len(lines) == 2 and lines[0].endswith(f"<- {tmp_path / 'test' / '0.wav'}")
    greedy = proc.batch_decode(ref.argmax(-1))[0]  # transformers' own greedy decoding of its logits
    assert lines[0].split("  <- ")[0] == greedy
    # `jaxtune export RUN OUT` writes the same vocabulary and audio settings
    from jaxtune.inference import export_run

    export_run(tmp_path / "run", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "vocab.json").read_text()) == vocab
    assert transformers.Wav2Vec2Processor.from_pretrained(str(tmp_path / "again")).tokenizer.get_vocab() == vocab


def test_a_checkpoint_vocabulary_and_audio_settings_are_used(tiny_ctc, tmp_path):
    """A model folder with a Wav2Vec2CTCTokenizer vocabulary and a feature extractor config: the
    data read with its rate and vocabulary, the head sized by it (no fresh head), its blank."""
    import shutil

    from jaxtune.config import from_dict
    from jaxtune.data.audio import AudioSettings
    from jaxtune.run.build import build_data, build_model, load_preprocessing, speech_overrides, speech_processor
    from jaxtune.parallel import Plan

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ctc[0], folder)
    vocab = CharVocab(("<pad>", "<s>", "</s>", "<unk>", "|", "E", "N", "O", "W"))  # 9 = the head's size
    vocab.save_pretrained(folder, AudioSettings(8000, do_normalize=False))
    write_clips(tmp_path / "clips", ["ONE", "NOW ONE"], 0)
    recipe = from_dict({"task": "ctc", "model": {"path": str(folder)},
                        "data": {"train": f"audio:{tmp_path / 'clips'}", "validation_fraction": 0.0,
                                 "cache_dir": str(tmp_path / "cache"), "max_length": 16},
                        "train": {"batch_size": 2}})
    audio, _, _ = load_preprocessing(recipe)
    assert audio.vocab == vocab and audio.settings == AudioSettings(8000, False)
    data = build_data(recipe, audio)
    assert data.label_names == list(vocab.tokens)
    batch = next(data.eval_batches("train"))
    assert batch["attention_mask"].sum() == 2 * 2400  # 0.3 s at 16 kHz read at 8 kHz
    assert [vocab.decode([t for t in row if t >= 0]) for row in batch["labels"]] == ["ONE", "NOW ONE"]
    processor = speech_processor(data, audio)
    assert speech_overrides(processor) == {"vocab_size": 9, "pad_token_id": 0}
    model, fresh = build_model(recipe, Plan.from_config(None), num_labels=data.num_labels,
                               label_names=data.label_names, config_overrides=speech_overrides(processor))
    assert fresh == [] and model.config.id2label == vocab.tokens
