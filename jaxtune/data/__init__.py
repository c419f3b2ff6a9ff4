"""Data: TFDS datasets and local files, through one Grain pipeline.

    from jaxtune.data import build_data, load_tokenizer

    data = build_data(
        recipe.data, recipe.task,
        tokenizer=load_tokenizer(recipe.model.path),  # text tasks: the model folder's fast tokenizer
        image_processor=None,        # image tasks: {'size', 'mean', 'std'} or the model folder's
                                     # preprocessor_config.json dict (image_settings_from_model)
        batch_size=32,               # GLOBAL batch size (all processes together)
        eval_batch_size=64,          # GLOBAL; default batch_size
        seed=recipe.train.seed,      # train shuffling (epoch e uses seed + e) and augmentation
        shard_index=None, shard_count=None,  # default jax.process_index() / jax.process_count()
        cache_dir=None,              # default data.cache_dir, else $JAXTUNE_CACHE/data
        problem_type=None,           # model.problem_type; None: decided by the labels
    )
    data.label_names        # class names in id order (export as id2label), None for causal-lm
    data.num_labels         # len(label_names); 1 for regression
    data.problem_type       # sequence-classification: single_label_classification, ...
    data.num_examples       # {'train': n, 'validation': n, 'test': n} (splits that exist)
    data.report             # per file: rows read, kept, dropped and why; str() is readable
    data.summary()          # all of the above as lines for the log
    data.steps_per_epoch    # ceil(num_examples['train'] / batch_size) (data.pack: packed rows)
    data.buckets            # text: the padded lengths a batch can have
    data.layout('train')    # data.pack: the packed rows (.rows, .fill(), .row(r) -> example positions)
    it = data.train_iterator()    # endless; next(it) -> this process's share of a global batch
    state = it.get_state()        # small JSON-able dict; it.set_state(state) resumes exactly
    for batch in data.eval_batches('validation'): ...   # finite, each example once

With Orbax, save the iterator beside the train state (Grain's handler, one JSON per process):

    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    it = data.train_iterator()
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

Batches are dicts of numpy arrays with a fixed leading size b = batch_size / shard_count:
- text (sequence-classification): input_ids, attention_mask, [token_type_ids] int32 (b, T);
  labels int32 (b,) | float32 (b, K) multi-hot | float32 (b,) regression
- token-classification: the same inputs; labels int32 (b, T), -100 where no loss (later
  sub-tokens of a word, special tokens, padding)
- causal-lm: input_ids, attention_mask, labels int32 (b, T) = input ids with -100 on prompt
  tokens and padding (the loss shifts); conversations (data.messages_column) and, with the
  tokenizer's chat template, prompt/response pairs are rendered with that template and carry the
  loss on the assistant replies only (`jaxtune.data.chat`; build_data passes the tokenizer on)
- causal-lm with data.pack: rows of T = max_length holding several examples each, plus
  segment_ids (1, 2, ... per example, 0 on padding) and position_ids (restarting per example)
  int32 (b, T); train.batch_size then counts rows, and steps_per_epoch = ceil(rows / batch_size).
  The layout is fixed when the data is built (`jaxtune.data.packing`); evaluation packs each split
  in order, every example in exactly one row
- image-classification: pixel_values float32 (b, C, H, W), labels int32 (b,)
- ctc (speech, `jaxtune.data.audio`): input_values float32 (b, S) (normalised waveforms, zero after
  each recording), attention_mask int32 (b, S), labels int32 (b, max_length) character ids, -100
  after the transcript; S is one of data.buckets (audio buckets, x1.25 apart); label_names is the
  vocabulary (build_data's `audio=`: the model's AudioFormat, else built from the transcripts)
- always: weights float32 (b,), 1 for real examples, 0 for the filler rows of a last batch.
T is one of data.buckets (the smallest holding the longest sequence of the global batch).

Data specs (`data.train|validation|test`): `tfds:NAME[/CONFIG][:SPLIT]`, `csv:PATH`, `tsv:PATH`,
`jsonl:PATH`, `images:DIR`, `idx:IMAGES[,LABELS]`, `audio:DIR` (WAV/FLAC + .txt transcripts);
PATH may be `pkg:PACKAGE/path`. Local files
are converted once to a TFDS array_record dataset under the cache dir (see `jaxtune.data.local`).
Without a validation (test) spec, data.validation_fraction (test_fraction) of train is held out,
seeded and stratified; identical texts are kept in the first split only (data.deduplicate).
Labels map to ids in sorted order (numeric when all are integers), or data.labels' order.
CSV/TSV quotes are read as pandas reads them (data.quoting: minimal); data.quoting: none reads `"`
as a plain character. A file that cannot be read (not a regular file, no permission, an I/O
error) is a DataError naming it and the OS's reason.
"""

from jaxtune.data.image import ImageSettings, image_settings_from_model
from jaxtune.data.pipeline import Data, build_data, prepare
from jaxtune.data.report import DataReport, FileReport
from jaxtune.data.specs import Spec, parse_spec
from jaxtune.data.text import load_tokenizer, make_buckets
from jaxtune.errors import DataError

__all__ = [
    "Data",
    "DataError",
    "DataReport",
    "FileReport",
    "ImageSettings",
    "Spec",
    "build_data",
    "image_settings_from_model",
    "load_tokenizer",
    "make_buckets",
    "parse_spec",
    "prepare",
]
