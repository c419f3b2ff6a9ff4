"""The Grain pipeline: splits -> fixed-size, padded, sharded, resumable batches.

Every step has a *global* batch of `batch_size` examples; process `shard_index` of `shard_count`
gets rows [shard_index * b, (shard_index + 1) * b) of it, b = batch_size / shard_count. Processes
run the same plan with the same seed, so their rows are disjoint and together make the global
batch, and (for text) they pick the same bucket length from the whole global batch.

Train order: epoch e visits the split in a permutation drawn by Grain's index shuffle with seed
`seed + e` (`MapDataset.range(n).shuffle(seed).repeat()`). An epoch is ceil(n / batch_size) steps;
its last batch is filled up with examples from the start of the epoch that carry weight 0, so
every example counts exactly once per epoch and no batch changes shape. Eval batches walk the
split in order, with the same zero-weight filling of the last batch.

The train iterator is a Grain `DatasetIterator` over `MapDataset.range(huge).map(plan).map(batch)`:
its state is the number of batches consumed, so `get_state()`/`set_state()` (or Grain's Orbax
handler) resume exactly, whatever the thread or worker count.

Packing (`data.pack`, causal-lm): the plan walks the *rows* of a fixed packed layout instead of
single examples (see `jaxtune.data.packing`); the rest is the same.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import grain
import jax
import numpy as np
from absl import flags

from jaxtune.data.audio import AudioEncoder, AudioFormat, CharVocab, audio_buckets
from jaxtune.data.image import ImageEncoder, ImageSettings, channels_of
from jaxtune.data.local import prepare_local
from jaxtune.data.packing import Layout, PackedBatch, make_layout, token_lengths
from jaxtune.data.report import DataReport
from jaxtune.data.schema import make_schema
from jaxtune.data.sources import Prepared, SplitSource
from jaxtune.data.specs import parse_spec
from jaxtune.data.seq2seq import Seq2SeqEncoder
from jaxtune.data.text import TextEncoder, make_buckets
from jaxtune.data.tfds_source import open_tfds
from jaxtune.errors import ConfigError, DataError
from jaxtune.tasks import get_task

ROLES = ("train", "validation", "test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser() / "data"


class _Plan:
    """step -> the global batch of that step: record positions in the split and weights."""

    def __init__(self, n: int, batch_size: int, seed: Optional[int]):
        self.n, self.batch_size = n, batch_size
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.order = None
        if seed is not None:
            # Grain's index shuffle, reseeded every epoch (seed + epoch) by repeat().
            self.order = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat(None)

    def __call__(self, step: int) -> dict[str, Any]:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        pos = k * self.batch_size + np.arange(self.batch_size)
        weights = (pos < self.n).astype(np.float32)
        pos = pos % self.n  # fill the last batch from the start of the epoch (weight 0)
        if self.order is not None:
            index = np.array([self.order[epoch * self.n + int(p)] for p in pos], np.int64)
        else:
            index = pos.astype(np.int64)
        return {"step": int(step), "index": index, "weights": weights}


class _Batch:
    """Plan -> this process's share of the batch as a dict of numpy arrays. Picklable."""

    def __init__(self, source: SplitSource, encoder, shard_index: int, shard_count: int, *,
                 seed: Optional[int] = None):
        self.source, self.encoder = source, encoder
        self.shard_index, self.shard_count = shard_index, shard_count
        self.seed = seed  # set for training: image augmentation

    def __call__(self, plan: dict) -> dict[str, np.ndarray]:
        index, weights = plan["index"], plan["weights"]
        b = len(index) // self.shard_count
        lo, hi = self.shard_index * b, (self.shard_index + 1) * b
        if isinstance(self.encoder, ImageEncoder):
            examples = self.source.get_many(index[lo:hi])
            rngs = None
            if self.seed is not None:
                rngs = [np.random.default_rng([self.seed % 2**32, plan["step"], lo + j]) for j in range(hi - lo)]
            where = [f"{self.source.name} record {self.source.record_index(i)}" for i in index[lo:hi]]
            out = {"pixel_values": self.encoder(examples, rngs, where),
                   "labels": np.array([e["label"] for e in examples], np.int32)}
        else:
            # The bucket is chosen over the whole global batch so all processes agree on shapes.
            read = index if self.shard_count > 1 else index[lo:hi]
            examples = self.source.get_many(read)
            encoded = self.encoder.encode(examples)
            length = self.encoder.bucket(encoded)
            if self.shard_count > 1:
                examples, encoded = examples[lo:hi], encoded[lo:hi]
            out = self.encoder.collate(encoded, examples, length)
        out["weights"] = weights[lo:hi].copy()
        return out


class Data:
    """Batches for training and evaluation; see `jaxtune.data` for the contract."""

    def __init__(self, prepared: Prepared, encoder, cfg, *, batch_size: int, eval_batch_size: int,
                 seed: int, shard_index: int, shard_count: int, buckets: Optional[tuple[int, ...]],
                 pack: bool = False):
        order = [r for r in ROLES if r in prepared.splits] + [r for r in prepared.splits if r not in ROLES]
        self.splits = {r: prepared.splits[r] for r in order}
        self.label_names = prepared.label_names
        self.problem_type = prepared.problem_type
        self.report: DataReport = prepared.report
        self.notes = list(prepared.notes)
        self.location = prepared.location
        self.encoder = encoder
        self.cfg = cfg
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.local_batch_size = batch_size // shard_count
        self.seed = seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.buckets = buckets
        self.num_examples = {k: len(v) for k, v in self.splits.items()}
        self.pack = pack
        self._layouts: dict[str, Layout] = {}
        self.steps_per_epoch = math.ceil(self._units("train") / batch_size)

    def _units(self, split: str) -> int:
        """What a batch row holds one of: examples, or packed rows."""
        return self.layout(split).rows if self.pack else len(self._split(split))

    def layout(self, split: str) -> Layout:
        """The packed rows of `split` (data.pack): shuffled by seed for train, in order otherwise."""
        if split not in self._layouts:
            lengths = token_lengths(self._split(split), self.encoder)
            seed = self.seed if split == "train" else None
            self._layouts[split] = make_layout(lengths, self.cfg.max_length, seed)
        return self._layouts[split]

    @property
    def num_labels(self) -> Optional[int]:
        if self.problem_type == "regression":
            return 1
        return len(self.label_names) if self.label_names is not None else None

    @property
    def id2label(self) -> Optional[dict[int, str]]:
        return None if self.label_names is None else dict(enumerate(self.label_names))

    def _split(self, split: str) -> SplitSource:
        if split not in self.splits:
            raise DataError(f"no '{split}' split; available: {', '.join(self.splits)}")
        return self.splits[split]

    def _finish(self, ds, workers: bool = True):
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.cfg.num_threads, prefetch_buffer_size=self.cfg.prefetch))
        if workers and self.cfg.num_workers > 0:
            if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.num_workers))
        return ds

    def train_dataset(self):
        """The endless train pipeline as a Grain IterDataset."""
        plan = _Plan(self._units("train"), self.batch_size, self.seed)
        batch = self._batcher("train", self._train_encoder(), seed=self.seed)
        return self._finish(grain.MapDataset.range(sys.maxsize).map(plan).map(batch))

    def _batcher(self, split: str, encoder, seed: Optional[int] = None):
        if self.pack:
            return PackedBatch(self.splits[split], encoder, self.layout(split), self.shard_index, self.shard_count)
        return _Batch(self.splits[split], encoder, self.shard_index, self.shard_count, seed=seed)

    def _train_encoder(self):
        # `augment: true` only: a mapping augments on the device, in the train step (data.augment)
        if isinstance(self.encoder, ImageEncoder) and self.cfg.augment is True:
            e = ImageEncoder(self.encoder.settings, self.encoder.channels, augment=True,
                             crop_scale=self.cfg.crop_scale, hflip=self.cfg.hflip)
            return e
        return self.encoder

    def train_iterator(self):
        """Endless iterator of this process's share of each global train batch (dict of numpy).
        A Grain DatasetIterator: get_state()/set_state(), and Orbax-savable with
        grain.checkpoint.CheckpointSave / CheckpointRestore."""
        return iter(self.train_dataset())

    def eval_steps(self, split: str) -> int:
        return math.ceil(self._units(split) / self.eval_batch_size)

    def eval_dataset(self, split: str):
        plan = _Plan(self._units(split), self.eval_batch_size, None)
        batch = self._batcher(split, self.encoder)
        # Threads only: worker processes would start anew for every evaluation.
        return self._finish(grain.MapDataset.range(plan.steps_per_epoch).map(plan).map(batch), workers=False)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """Every example of `split` exactly once, in order; the last batch is filled with
        weight-0 copies so all batches have eval_batch_size (this process: its share) rows.
        Packed: the split's rows in order (each example in exactly one row), filled the same way."""
        return iter(self.eval_dataset(split))

    def bucket_counts(self, split: str = "train") -> dict[int, int]:
        """How many batches of one pass over `split` get each padded length (text only)."""
        counts: dict[int, int] = {}
        if split == "train":
            it, n = self.train_iterator(), self.steps_per_epoch
        else:
            it, n = self.eval_batches(split), self.eval_steps(split)
        for _ in range(n):
            t = next(it)["input_ids"].shape[1]
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.num_examples.items())
        lines = [f"data: {counts} examples; {self.steps_per_epoch} steps per epoch of {self.batch_size}"]
        if self.label_names is not None:
            shown = ", ".join(self.label_names[:10]) + (", ..." if len(self.label_names) > 10 else "")
            lines.append(f"labels ({len(self.label_names)}): {shown}")
        if self.pack:
            t = self.layout("train")
            lines.append(f"packed: {self.num_examples['train']} train examples into {t.rows} rows of "
                         f"{t.length} tokens ({100 * t.fill():.0f}% filled); train.batch_size counts rows")
        elif self.buckets:
            lines.append(f"padded lengths: {', '.join(map(str, self.buckets))}")
        lines += self.notes
        lines += [str(r) for r in self.report]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Data({self.num_examples}, batch_size={self.batch_size}, shard {self.shard_index}/{self.shard_count})"


def audio_format(cfg, task: str, audio: Optional[AudioFormat] = None) -> Optional[AudioFormat]:
    """A speech task's AudioFormat: the model's settings and vocabulary (`audio`, default 16 kHz,
    normalised, vocabulary from the transcripts) with the recipe's limits; None for other tasks."""
    if get_task(task).data_kind != "audio":
        return None
    audio = audio or AudioFormat()
    return AudioFormat(audio.settings, audio.vocab, max_seconds=cfg.max_seconds, max_length=cfg.max_length)


def prepare(cfg, task: str, *, cache_dir=None, problem_type: Optional[str] = None, tokenizer=None,
            audio: Optional[AudioFormat] = None) -> Prepared:
    """Read (and for local files convert, once) the splits of `cfg`. The tokenizer is needed only
    for causal-lm chat data (its chat template renders the rows: `jaxtune.data.chat`); `audio` (a
    speech task's sampling rate, normalisation and vocabulary) only for speech."""
    schema = make_schema(cfg, task, problem_type, tokenizer, audio_format(cfg, task, audio))
    if not cfg.train:
        raise DataError("data.train is required (a data spec such as csv:train.csv or tfds:NAME)")
    specs = {role: parse_spec(getattr(cfg, role), role) for role in ROLES if getattr(cfg, role)}
    root = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser()
    tfds_specs = [s.text for s in specs.values() if s.kind == "tfds"]
    if tfds_specs and schema.kind == "lm" and (schema.chat is not None or schema.templates):
        what = "the chat template" if schema.chat is not None else "data.prompt_template / data.response_template"
        raise DataError(f"{tfds_specs[0]}: rendering with {what} reads local files (csv:, tsv:, jsonl:); "
                        "for prompt/response pairs from TFDS set data.chat_template=none")
    if tfds_specs and schema.kind == "audio":
        raise DataError(f"{tfds_specs[0]}: speech data is read from local files (audio:DIR, or csv:/tsv:/jsonl: "
                        "tables of audio paths and transcripts)")
    if all(s.kind == "tfds" for s in specs.values()):
        prepared = open_tfds(specs, schema, cfg, root)
    else:
        prepared = prepare_local(specs, schema, cfg, root)
    for k, s in prepared.splits.items():
        if len(s) == 0:
            raise DataError(f"the {k} split is empty ({prepared.location})")
    return prepared


def build_data(cfg, task: str, *, tokenizer=None, image_processor=None, batch_size: int,
               eval_batch_size: Optional[int] = None, seed: int = 0,
               shard_index: Optional[int] = None, shard_count: Optional[int] = None,
               cache_dir=None, problem_type: Optional[str] = None, audio: Optional[AudioFormat] = None,
               decoder_start_token_id: Optional[int] = None) -> Data:
    """Build the data of a recipe; see the `jaxtune.data` docstring. `decoder_start_token_id`: the
    model's, for seq2seq-lm (the decoder inputs are the targets shifted right after it)."""
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    eval_batch_size = eval_batch_size or batch_size
    for name, b in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if b < 1 or b % shard_count:
            raise ConfigError(f"{name} ({b}) must be a positive multiple of the process count ({shard_count})")
    if cfg.pack and get_task(task).data_kind != "lm":
        raise ConfigError(f"data.pack packs causal-lm examples; it does not apply to task {task}")
    for k in ("num_workers", "num_threads"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"data.{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.prefetch < 1:
        raise ConfigError(f"data.prefetch must be >= 1, got {cfg.prefetch}")
    prepared = prepare(cfg, task, cache_dir=cache_dir, problem_type=problem_type, tokenizer=tokenizer, audio=audio)
    audio = audio_format(cfg, task, audio)
    schema = make_schema(cfg, task, problem_type, tokenizer, audio)
    buckets = None
    if schema.kind == "audio":  # labels are the vocabulary's tokens in id order
        vocab = audio.vocab or CharVocab(tuple(prepared.label_names))
        buckets = audio_buckets(audio.max_samples)
        encoder = AudioEncoder(vocab, cfg.max_length, buckets)
    elif schema.kind == "seq2seq":
        buckets = make_buckets(cfg.max_length, cfg.buckets)
        target_length = cfg.max_target_length or cfg.max_length
        encoder = Seq2SeqEncoder(tokenizer, cfg.max_length, target_length, buckets,
                                 make_buckets(target_length, cfg.target_buckets),
                                 decoder_start_token_id=decoder_start_token_id, prefix=cfg.source_prefix)
    elif schema.kind == "image":
        settings = ImageSettings.from_any(image_processor).with_size(cfg.image_size)
        channels = channels_of(prepared.splits["train"][0]["image"])
        encoder = ImageEncoder(settings, channels, augment=False, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
    else:
        # Packed rows are always max_length long.
        buckets = (cfg.max_length,) if cfg.pack else make_buckets(cfg.max_length, cfg.buckets)
        num_labels = len(prepared.label_names) if prepared.label_names else None
        encoder = TextEncoder(tokenizer, schema.kind, cfg.max_length, buckets,
                              problem_type=prepared.problem_type, num_labels=num_labels)
    return Data(prepared, encoder, cfg, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                shard_index=shard_index, shard_count=shard_count, buckets=buckets, pack=cfg.pack)
