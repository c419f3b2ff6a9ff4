"""A tiny causal-LM setup for the packing and causal-LM run tests: a byte-level BPE tokenizer
trained offline on the data's own lines, a random GPT-2 sized to it (saved with transformers), and
JSONL files of prompt/response pairs ("3 plus 4 is" -> " seven").

Test files import it as `import _tiny_lm` (tests/ is on pytest's pythonpath, see pyproject.toml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
EOS = "<|endoftext|>"
GPT2 = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def pairs(n: int, seed: int, skip: int = 0) -> list[dict]:
    """n distinct prompt/response pairs of varied length, 'a plus b is' -> ' <a + b in words>'
    (two prompt forms, sometimes a chatty tail), from a seeded shuffle of all 400, after `skip`.
    Each row also has `text` = prompt + response (for plain-text runs)."""
    combos = [(a, b, form, tail) for a in range(10) for b in range(10) for form in range(2) for tail in range(2)]
    random.Random(seed).shuffle(combos)
    out = []
    for a, b, form, tail in combos[skip:skip + n]:
        prompt = f"{a} plus {b} is" if form == 0 else f"what is {a} plus {b} ? it is"
        response = " " + NUMBERS[a + b] + (" , i think" if tail else "")
        out.append({"prompt": prompt, "response": response, "text": prompt + response})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(folder: Path, lines: list[str]):
    """A GPT-2-style byte-level BPE (vocab 300, EOS = BOS = id 0, no pad token) saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tok.save_pretrained(str(folder))
    return tok


def make_gpt2(folder: Path, vocab_size: int, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **GPT2)).save_pretrained(str(folder))
    return folder


def make_assets(root: Path) -> dict:
    """`root/gpt2` (model + tokenizer), `root/train.jsonl` (80 pairs), `root/val.jsonl` (20 pairs)."""
    root = Path(root)
    train, val = pairs(80, seed=0), pairs(20, seed=0, skip=80)
    lines = [p["prompt"] + p["response"] for p in train + val] + NUMBERS
    folder = root / "gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, lines)
    make_gpt2(folder, len(tok))
    return {"model": folder, "train": write_jsonl(root / "train.jsonl", train),
            "val": write_jsonl(root / "val.jsonl", val), "train_rows": train, "val_rows": val}
