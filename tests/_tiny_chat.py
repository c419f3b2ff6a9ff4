"""A tiny chat setup for the chat-data tests: the byte-level BPE of `_tiny_lm` trained on chat
lines, with ChatML special tokens (`<|im_start|>`, `<|im_end|>`, as SmolLM2 has them; EOS is
`<|im_end|>`) and a SmolLM2-style chat template that rejects unknown roles, a random GPT-2 sized to
it (128 positions), and JSONL files of arithmetic conversations (two assistant turns each).

Test files import it as `import _tiny_chat` (tests/ is on pytest's pythonpath).
"""

from __future__ import annotations

import random
from pathlib import Path

from _tiny_lm import GPT2, NUMBERS, write_jsonl

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' + message['role'] + ' is not system, user or assistant') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(n: int, seed: int, skip: int = 0) -> list[dict]:
    """n distinct two-turn conversations: 'a plus b ?' -> '<a + b>', 'and c more ?' -> '<a + b + c>'
    (a, b, c in 0..5), a system message on every third, from a seeded shuffle, after `skip`."""
    combos = [(a, b, c) for a in range(6) for b in range(6) for c in range(1, 7)]
    random.Random(seed).shuffle(combos)
    out = []
    for k, (a, b, c) in enumerate(combos[skip:skip + n]):
        msgs = [{"role": "system", "content": "you add numbers"}] if k % 3 == 0 else []
        msgs += [{"role": "user", "content": f"{a} plus {b} ?"},
                 {"role": "assistant", "content": NUMBERS[a + b]},
                 {"role": "user", "content": f"and {c} more ?"},
                 {"role": "assistant", "content": NUMBERS[a + b + c]}]
        out.append({"messages": msgs, "a": a, "b": b})
    return out


def make_tokenizer(folder: Path, lines: list[str]):
    """A byte-level BPE (vocab 400) with the ChatML specials and chat template, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL[0], eos_token=SPECIAL[2],
                                  unk_token=SPECIAL[0], pad_token=SPECIAL[0],
                                  additional_special_tokens=SPECIAL[1:])
    tok.chat_template = CHATML
    tok.save_pretrained(str(folder))
    return tok


def make_assets(root: Path, with_model: bool = True) -> dict:
    """`root/chat` (tokenizer [+ GPT-2]), `root/train.jsonl` (80 conversations), `root/val.jsonl` (20)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    root = Path(root)
    train, val = conversations(80, seed=0), conversations(20, seed=0, skip=80)
    lines = [m["role"] + "\n" + m["content"] for c in train + val for m in c["messages"]] + NUMBERS
    folder = root / "chat"
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, lines * 3)
    if with_model:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tok), **{**GPT2, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 2})
        GPT2LMHeadModel(config).save_pretrained(str(folder))
    return {"model": folder, "tok": tok, "train_rows": train, "val_rows": val,
            "train": write_jsonl(root / "train.jsonl", train), "val": write_jsonl(root / "val.jsonl", val)}
