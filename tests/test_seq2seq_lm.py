"""Task seq2seq-lm: batches from source/target columns (prefix, buckets, labels, decoder inputs), the
label-smoothed loss (= PyTorch's), the generated-target metrics (sacrebleu / jiwer), one-line
recipe errors, and one `jaxtune run` end to end (a tiny T5 from model.config with model.tokenizer,
TSV data): validation metrics from targets generated in the eval step equal what generating from
the export gives, and `jaxtune predict` prints the export's generated targets."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
import yaml
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jaxtune.config import from_dict
from jaxtune.data.seq2seq import Seq2SeqEncoder
from jaxtune.errors import ConfigError
from jaxtune.runlog import read_metrics
from jaxtune.tasks import get_task
from jaxtune.tasks.seq2seq_lm import sequence_scores

import _tiny_run as tr

LOWER, UPPER = list("abcdefgh"), list("ABCDEFGH")


def make_tokenizer(folder):
    """Word-level over a-h and A-H (<pad> 0, </s> 1, <unk> 2), </s> appended: the G2P layout."""
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + LOWER + UPPER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def rows(n: int, seed: int):
    """A toy transduction: letters -> the reversed letters in upper case."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = [LOWER[i] for i in rng.integers(0, 8, rng.integers(2, 7))]
        out.append((" ".join(word), " ".join(w.upper() for w in reversed(word))))
    return out


def write_tsv(path, data):
    path.write_text("src\ttgt\n" + "".join(f"{s}\t{t}\n" for s, t in data))
    return path


def test_batches_prefix_buckets_labels_and_decoder_inputs(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    enc = Seq2SeqEncoder(tok, 16, 8, (4, 8, 16), (4, 8), decoder_start_token_id=0, prefix="a ")
    examples = [{"source": "b c", "target": "C B"}, {"source": "d e f g h", "target": "H"}]
    encoded = enc.encode(examples)
    assert encoded[0] == ([3, 4, 5, 1], [13, 12, 1])  # the prefix "a " first, </s> last
    assert enc.bucket(encoded) == (8, 4)  # 7 source tokens -> 8, 3 target tokens -> 4
    b = enc.collate(encoded, examples, (8, 4))
    np.testing.assert_array_equal(b["labels"], [[13, 12, 1, -100], [18, 1, -100, -100]])
    np.testing.assert_array_equal(b["decoder_input_ids"], [[0, 13, 12, 1], [0, 18, 1, 0]])
    np.testing.assert_array_equal(b["decoder_attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [4, 7])
    assert {k: v.dtype for k, v in b.items()} == {k: np.int32 for k in b}


def test_label_smoothed_loss_equals_pytorch():
    import torch

    rs = np.random.RandomState(0)
    logits = rs.normal(size=(3, 5, 11)).astype(np.float32)
    labels = rs.randint(0, 11, (3, 5)).astype(np.int32)
    labels[1, 3:] = -100
    weights = np.array([1.0, 1.0, 0.0], np.float32)  # a padding example never counts
    task = get_task("seq2seq-lm").with_recipe(load_recipe_dict(label_smoothing=0.1))
    loss, aux = task.loss(jnp.asarray(logits), {"labels": labels, "weights": weights})
    ref = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)(
        torch.from_numpy(logits[:2]).reshape(-1, 11), torch.from_numpy(labels[:2]).long().reshape(-1))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(aux["tokens"]) == 8
    plain, _ = get_task("seq2seq-lm").loss(jnp.asarray(logits), {"labels": labels, "weights": weights})
    assert float(plain) != pytest.approx(float(loss), rel=1e-3)


def load_recipe_dict(**train):
    return from_dict({"task": "seq2seq-lm", "model": {"config": {"model_type": "t5"}}, "data": {"train": "tsv:x"},
                      "train": train}, "recipe.yaml")


def test_sequence_scores():
    refs = ["HH AH0 L OW1", "K AE1 T", "D AO1 G"]
    hyps = ["HH AH0 L OW1", "K AE1 D", "D AO1 G Z"]
    s = sequence_scores(hyps, refs)
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["wer"] == pytest.approx(2 / 10)  # one substitution + one insertion over 10 reference phonemes
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < s["bleu"] < 100


def test_recipe_errors_are_one_line():
    with pytest.raises(ConfigError, match="train.label_smoothing must be in") as e:
        load_recipe_dict(label_smoothing=1.5)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.label_smoothing applies to task seq2seq-lm, not causal-lm"):
        from_dict({"task": "causal-lm", "model": {"path": "x"}, "data": {"train": "tsv:x"},
                   "train": {"label_smoothing": 0.1}}, "recipe.yaml")


@pytest.fixture(scope="module")
def g2p_like_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2s-run")
    make_tokenizer(root / "tok")
    recipe = {
        "task": "seq2seq-lm",
        "model": {"tokenizer": str(root / "tok"), "config": dict(
            model_type="t5", vocab_size=19, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)},
        "data": {"train": f"tsv:{write_tsv(root / 'train.tsv', rows(96, 0))}",
                 "validation": f"tsv:{write_tsv(root / 'val.tsv', rows(12, 1))}",
                 "source_column": "src", "target_column": "tgt", "max_length": 8, "max_target_length": 8,
                 "cache_dir": str(root / "cache")},
        "optim": {"lr": 1e-2, "warmup": 2},
        "train": {"batch_size": 16, "steps": 24, "eval_every": 24, "log_every": 8, "label_smoothing": 0.1,
                  "metric": "exact_match"},
        "output_dir": str(root / "run"),
    }
    path = root / "s2s.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = tr.cli("run", path, env=tr.shared_env(tmp_path_factory))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root, proc


def test_run_evaluates_generated_targets_and_predict_prints_them(g2p_like_run):
    from jaxtune.cli import main
    from jaxtune.data import load_tokenizer
    from jaxtune.models import from_pretrained
    from jaxtune.models.seq2seq_generate import generate

    root, proc = g2p_like_run
    val = [m for m in read_metrics(root / "run") if m["split"] == "validation"]
    assert len(val) == 1
    m = val[0]
    assert set(m) >= {"loss", "token_accuracy", "tokens", "bleu", "chrf", "exact_match", "wer"}
    val_rows = rows(12, 1)
    assert m["tokens"] == sum(len(t.split()) + 1 for _, t in val_rows)  # targets + </s>
    train = [x for x in read_metrics(root / "run") if x["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    # The eval step's generated targets == greedy generation from the export, scored the same way.
    export = root / "run" / "export"
    model, tok = from_pretrained(export), load_tokenizer(str(export))
    enc = tok([s for s, _ in val_rows], padding="longest", return_tensors="np")
    out = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=8)
    hyps = [tok.decode(out.tokens[i, :out.lengths[i]], skip_special_tokens=True) for i in range(12)]
    want = sequence_scores(hyps, [t for _, t in val_rows])
    for k in ("bleu", "chrf", "exact_match", "wer"):
        assert m[k] == pytest.approx(want[k], abs=1e-6), k
    printed = CliRunner().invoke(main, ["predict", str(root / "run"), val_rows[0][0], val_rows[1][0], "--json"])
    assert printed.exit_code == 0, printed.output
    results = [json.loads(line) for line in printed.output.strip().splitlines()[-2:]]
    assert [r["generated"] for r in results] == hyps[:2]
    evaluated = CliRunner().invoke(main, ["eval", str(root / "run"), "--split", "validation", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads(evaluated.output.strip().splitlines()[-1])
    again = again.get("metrics", again)
    for k in ("loss", "bleu", "chrf", "exact_match", "wer"):  # jaxtune eval of the run = its own evaluation
        assert again[k] == pytest.approx(m[k], rel=1e-5, abs=1e-6), k
    beams = CliRunner().invoke(main, ["predict", str(root / "run"), val_rows[0][0], "--num-beams", "3"])
    assert beams.exit_code == 0 and beams.output.strip().splitlines()[-1].startswith(f'"{val_rows[0][0]}" -> "')
