"""A tiny but real run for the trainer tests: a random BERT with a word-level tokenizer, a CSV of
texts whose words carry the label, and a recipe that checkpoints often.

`make_assets(folder)` writes `bert/` (config.json, model.safetensors, tokenizer files), `data.csv`
and returns a function `recipe(out_dir, **changes) -> path of a recipe YAML`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

WORDS = {
    "pos": ["good", "great", "nice", "happy", "love"],
    "neg": ["bad", "awful", "sad", "hate", "poor"],
    "neu": ["table", "green", "paper", "seven", "road"],
}
FILLER = ["the", "a", "is", "was", "it", "day", "movie", "food", "very", "quite"]


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + sum(WORDS.values(), [])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab)
    tok.save_pretrained(str(folder))
    return tok


def make_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
                        initializer_range=0.3)  # wide: random features that tell words apart
    BertModel(config).save_pretrained(str(folder))
    return folder


def make_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    labels = list(WORDS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % 3]
            if rnd.random() < 0.15:  # some noise: the task is learnable, not trivial
                words = rnd.sample(WORDS[labels[(i + 1) % 3]], 2)
            else:
                words = rnd.sample(WORDS[label], 2)
            text = rnd.sample(FILLER, rnd.randint(1, 8)) + words
            rnd.shuffle(text)
            w.writerow([f"{i} " + " ".join(text), label])
    return path


BASE = {
    "task": "sequence-classification",
    "model": {"dropout": 0.1},
    "data": {"validation_fraction": 0.2, "test_fraction": 0.2, "max_length": 16},
    "optim": {"lr": 3e-3, "warmup": 2, "weight_decay": 0.01},
    "train": {"batch_size": 8, "steps": 24, "eval_every": 6, "log_every": 2, "seed": 0},
    "checkpoint": {"every": 2, "keep": 2, "keep_best": 1},
}


def make_assets(folder: Path):
    folder = Path(folder)
    bert = make_bert(folder / "bert")
    data = make_csv(folder / "data.csv")

    def recipe(out_dir, name="tiny", **changes) -> Path:
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
        raw["model"]["path"] = str(bert)
        raw["data"].update(train=f"csv:{data}", cache_dir=str(folder / "cache"))
        raw["output_dir"] = str(out_dir)
        for key, value in changes.items():
            section, _, leaf = key.partition("__")
            if leaf:
                raw.setdefault(section, {})[leaf] = value
            else:
                raw[section] = value
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return recipe


def cli(*args, env=None, timeout=240, **kw) -> subprocess.CompletedProcess:
    """`jaxtune ARGS` in a subprocess (8 fake CPU devices, inherited from the test session)."""
    return subprocess.run([sys.executable, "-m", "jaxtune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def one_device_env() -> dict:
    """XLA_FLAGS without the test session's 8 fake CPU devices: one device, as a user's machine has."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return {"XLA_FLAGS": " ".join(flags.split())}  # XLA reads a flags value that is not "--..." as a file


def popen(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxtune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def shared_tiny(tmp_path_factory):
    """(recipe, env, reference run folder): the tiny assets, a JAX compilation cache and one
    uninterrupted run (a fresh `jaxtune run` subprocess; its stdout in reference.stdout beside it),
    made once per test session and shared by test_checkpoint_damage, test_kill_resume,
    test_failures, test_trainer and run/test_run_folder_failures (copy the run before changing
    it). Recipes made by `recipe` name the same bert/, data.csv and data cache."""
    root = tmp_path_factory.getbasetemp() / "tiny-shared"
    recipe, env = shared_assets(tmp_path_factory)
    ref = root / "reference"
    if not (ref / "summary.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        proc = cli("run", recipe(ref, name="reference"), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (root / "reference.stdout").write_text(proc.stdout)
    return recipe, env, ref


def shared_assets(tmp_path_factory):
    """(recipe, env) of `shared_tiny` without its reference run (the assets are made once)."""
    root = tmp_path_factory.getbasetemp() / "tiny-shared"
    if root not in _assets:
        _assets[root] = make_assets(root / "assets")
    return _assets[root], shared_env(tmp_path_factory)


_assets: dict = {}


def shared_env(tmp_path_factory) -> dict:
    """The environment of every tiny subprocess of a test session: one JAX compilation cache
    (programs compiled once, for every run with the same shapes and device count), shared by
    pytest-xdist's workers too: each has its own basetemp (pytest-N/popen-gwK), their parent is
    the session's. A size limit turns on JAX's file lock around cache reads and writes, so one
    process never reads an entry another is still writing."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache"
    return {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30)}


# ---------------------------------------------------------------------------------------------
# Warm processes: `jaxtune` forked from a process that has already imported it

# The parent imports what `jaxtune run / eval / export / predict` import (jax, flax, orbax,
# transformers, grain, tfds: ~5-8 s a process on 2 cores) and never initialises a JAX backend, so
# a fork is safe; then, per request, it forks a child that becomes `jaxtune ARGS`: its own pid,
# argv, working folder, stdin /dev/null, stdout and stderr files at the file-descriptor level,
# real signals, and Python's own exit (SystemExit, tracebacks, atexit, thread joins) when it
# returns from the CLI. The parent reaps children and reports each exit status on its stdout.
ZYGOTE = r"""
import json, os, select, sys
import jaxtune.cli, jaxtune.checkpoint, jaxtune.inference, jaxtune.run, jaxtune.run.build  # noqa: F401
assert "jax._src.xla_bridge" not in sys.modules or not sys.modules["jax._src.xla_bridge"]._backends
control, report = sys.stdin.fileno(), sys.stdout
print("ready", flush=True)
buffer, child = b"", None
while child is None:
    if select.select([control], [], [], 0.005)[0]:
        chunk = os.read(control, 65536)
        if not chunk:
            break
        buffer += chunk
    while b"\n" in buffer and child is None:
        line, buffer = buffer.split(b"\n", 1)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child = req
        else:
            print("pid", req["id"], pid, flush=True)
    try:
        while child is None:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
    except ChildProcessError:
        pass
if child is None:
    sys.exit(0)
os.chdir(child["cwd"])
os.environ.update(child["env"])
for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, child["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                       (2, child["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
    new = os.open(path, mode, 0o644)
    os.dup2(new, fd)
    os.close(new)
sys.stdin = open(0, closefd=False)
if "code" in child:  # as `python -c CODE ARGS`
    sys.argv, code = ["-c", *child["args"]], child["code"]
    del buffer, child, control, report, req
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = ["jaxtune", *child["args"]]
    del buffer, child, control, report, req
    jaxtune.cli.entry()
"""


class WarmProcess:
    """A `jaxtune` process forked by a `Warm` parent: pid, poll, wait, send_signal, kill,
    communicate and returncode as in subprocess.Popen (a signal: minus its number)."""

    def __init__(self, warm: "Warm", pid: int, stdout: Path, stderr: Path, args):
        self.warm, self.pid, self.args = warm, pid, args
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.warm.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:  # not reaped yet, so the pid is still this process's
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")


class Warm:
    """A parent process with jaxtune imported, which forks `jaxtune ARGS` processes on request.

    Its environment is fixed when it starts (jax reads JAX_* variables at import); a request may
    add variables that are read later (JAXTUNE_*, XLA_FLAGS: read when the backend starts)."""

    def __init__(self, folder: Path, env=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lock = threading.Lock()
        self.pids, self.exits, self.count = {}, {}, 0
        assert self.proc.stdout.readline() == "ready\n", "the warm jaxtune process did not start"
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            kind, a, b = line.split()
            with self.lock:
                if kind == "pid":
                    self.pids[int(a)] = int(b)
                    self.exits.pop(int(b), None)  # an earlier child's, whose pid this one reuses
                else:
                    self.exits[int(a)] = int(b)

    def exit_code(self, pid):
        with self.lock:
            code = self.exits.get(pid)
        if code is None and self.proc.poll() is not None:
            raise RuntimeError("the warm jaxtune process died")
        return code

    def popen(self, *args, env=None, cwd=None, code=None) -> WarmProcess:
        """`jaxtune ARGS` (or, given `code`, `python -c CODE ARGS`) in a forked process."""
        for key in env or {}:
            assert not key.startswith("JAX_"), f"{key} is read when jax is imported: start a Warm with it"
        with self.lock:
            self.count += 1
            n = self.count
        out, err = self.folder / f"{n}.stdout", self.folder / f"{n}.stderr"
        for f in (out, err):  # a child killed before it opens them has written nothing, not no file
            f.touch()
        args = [str(a) for a in args]
        request = {"id": n, "args": args, "env": env or {}, "cwd": str(cwd or os.getcwd()),
                   "stdout": str(out), "stderr": str(err), **({"code": code} if code is not None else {})}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        deadline = time.time() + 60
        while True:
            with self.lock:
                pid = self.pids.get(n)
            if pid is not None:
                return WarmProcess(self, pid, out, err, args)
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the warm jaxtune process did not fork")
            time.sleep(0.002)

    def run(self, *args, env=None, cwd=None, timeout=300, code=None) -> subprocess.CompletedProcess:
        """As `cli`: `jaxtune ARGS` (or `python -c CODE ARGS`) to its end: exit code, stdout, stderr."""
        proc = self.popen(*args, env=env, cwd=cwd, code=code)
        try:
            stdout, stderr = proc.communicate(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_warm: dict = {}


def shared_warm(tmp_path_factory) -> Warm:
    """One `Warm` parent per test session, with `shared_tiny`'s JAX compilation cache (it ends
    when the session does: its stdin closes)."""
    root = tmp_path_factory.getbasetemp() / "tiny-shared"
    if root not in _warm:
        # unbuffered: a test that watches a run's stdout sees each line when it is printed
        _warm[root] = Warm(root / "warm", env={**shared_env(tmp_path_factory), "PYTHONUNBUFFERED": "1"})
    return _warm[root]
