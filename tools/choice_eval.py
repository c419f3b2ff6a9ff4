"""Score a causal LM as a classifier: for each row, render a prompt (through the tokenizer's chat
template when it has one) and read the next-token distribution right after it.

    python tools/choice_eval.py MODEL data/tweets/test.jsonl --label-column sentiment \\
        --prompt-template "Sentiment of this tweet (negative, neutral or positive)?\\n{text}"

MODEL: a GGUF file, an HF folder or a jaxtune run folder (its best checkpoint). Two accuracies:

- `likelihood`: the choice (label) whose first token is the most likely next token, among the
  choices only (how a zero-shot model that would answer in a sentence is fairly scored);
- `generated`: the model's own greedy next token is the first token of the right label (what
  greedy decoding answers; 0 when the model starts with anything else).

Both with macro-F1 over the choices. The choices are the distinct values of the label column
(or `--choices a,b,c`); their first tokens after the prompt must differ. `--system` puts a system
message first, as `data.system_prompt` does in training (a run folder's is the default). Prompts
are padded on the left and batched by length (one compile per length bucket of 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.chat import ChatFormat
from jaxtune.errors import JaxtuneError
from jaxtune.models import merge, split

BUCKET = 16


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> float:
    """Mean F1 over classes 0..n-1 (a class never predicted nor present scores 0).

    >>> macro_f1(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    0.6666666666666666
    """
    f1s = []
    for c in range(n):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


def load_model(path: str):
    """(model, tokenizer, the run recipe's data.system_prompt) of a run folder, an HF folder or a
    GGUF file, causal-LM head."""
    from jaxtune import inference
    from jaxtune.data.text import load_tokenizer
    from jaxtune.models import from_pretrained
    from jaxtune.run.folder import is_run_dir

    if is_run_dir(Path(path)):
        loaded = inference.load(path)
        return loaded.model, load_tokenizer(loaded.tokenizer_dir), loaded.recipe.data.system_prompt
    return from_pretrained(path, task="causal-lm"), load_tokenizer(path), None


def render(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The prompt's token ids, ending where the model's answer starts: rendered as a one-turn chat
    (after `system`) as jaxtune renders training pairs, when the tokenizer has a chat template."""
    chat = ChatFormat.of(tokenizer, system)
    if chat is not None:
        return tokenizer(chat.prompt(prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def choice_tokens(tokenizer, prompt_ids: list[int], choices: list[str]) -> list[int]:
    """Each choice's first token as it follows a rendered prompt (BPE may merge across the seam:
    tokenize prompt + choice and take the first token after the prompt's)."""
    text = tokenizer.decode(prompt_ids)
    firsts = []
    for c in choices:
        ids = tokenizer(text + c, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= n:
            raise JaxtuneError(f"choice '{c}' adds no token after the prompt")
        firsts.append(ids[n])
    if len(set(firsts)) != len(firsts):
        shown = ", ".join(f"{c!r}: {tokenizer.decode([t])!r}" for c, t in zip(choices, firsts))
        raise JaxtuneError(f"the choices' first tokens collide ({shown}); pick choices that start differently")
    return firsts


def next_token_logits_fn(model):
    graphdef, params, rest = split(model)

    @jax.jit
    def run(params, ids_BT, mask_BT):
        position_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        out = merge(graphdef, params, rest)(ids_BT, mask_BT, position_ids=position_BT, last_only=True)
        return out.logits

    return lambda ids, mask: run(params, ids, mask)


def evaluate(model, tokenizer, rows: list[dict], prompt_template: str, label_column: str,
             choices: list[str] | None = None, batch_size: int = 32, system: str | None = None) -> dict:
    choices = choices or sorted({str(r[label_column]) for r in rows})
    index = {c: i for i, c in enumerate(choices)}
    try:
        prompts = [render(tokenizer, prompt_template.format(**r), system) for r in rows]
    except KeyError as e:
        raise JaxtuneError(f"--prompt-template names column {e}, which the rows lack "
                           f"(they have: {', '.join(rows[0])})") from None
    unknown = sorted({str(r[label_column]) for r in rows} - set(choices))
    if unknown:
        raise JaxtuneError(f"labels outside the choices: {', '.join(unknown[:5])}")
    firsts = np.asarray(choice_tokens(tokenizer, prompts[0], choices))
    truth = np.asarray([index[str(r[label_column])] for r in rows])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits_of = next_token_logits_fn(model)
    likely = np.zeros(len(rows), np.int64)
    greedy = np.zeros(len(rows), np.int64)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        length = -(-max(len(prompts[i]) for i in idx) // BUCKET) * BUCKET
        ids = np.full((batch_size, length), pad, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for row, i in enumerate(idx):
            ids[row, length - len(prompts[i]):] = prompts[i]
            mask[row, length - len(prompts[i]):] = 1
        mask[len(idx):, -1] = 1  # filler rows of the last batch: one token, ignored
        logits = np.asarray(logits_of(ids, mask))[:len(idx)]
        likely[idx] = np.argmax(logits[:, firsts], axis=-1)
        top = np.argmax(logits, axis=-1)
        greedy[idx] = [int(np.flatnonzero(firsts == t)[0]) if t in firsts else -1 for t in top]
    n = len(choices)
    return {
        "examples": len(rows),
        "choices": choices,
        "likelihood_accuracy": float(np.mean(likely == truth)),
        "likelihood_macro_f1": macro_f1(truth, likely, n),
        "generated_accuracy": float(np.mean(greedy == truth)),
        "generated_macro_f1": macro_f1(truth, greedy, n),
        "generated_a_choice": float(np.mean(greedy >= 0)),
    }


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    # split on "\n" only: a JSON string may hold U+0085 or U+2028, which splitlines() breaks at
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise JaxtuneError(f"{path}:{i}: not JSON ({e.msg})") from None
    if not rows:
        raise JaxtuneError(f"{path}: no rows")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF file, HF folder or run folder")
    p.add_argument("data", type=Path, help="a JSONL file of rows")
    p.add_argument("--prompt-template", required=True, help="str.format template over the row's columns")
    p.add_argument("--label-column", required=True)
    p.add_argument("--system", help="a system message before each prompt (default: a run folder's "
                   "data.system_prompt, else none)")
    p.add_argument("--choices", help="comma-separated labels (default: the distinct labels in the data)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows = read_jsonl(args.data)[:args.limit]
        model, tokenizer, run_system = load_model(args.model)
        system = args.system if args.system is not None else run_system
        result = evaluate(model, tokenizer, rows, args.prompt_template.replace("\\n", "\n"), args.label_column,
                          args.choices.split(",") if args.choices else None, args.batch, system)
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(model=args.model, data=str(args.data), seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
