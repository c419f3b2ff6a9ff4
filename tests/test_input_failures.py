"""Inputs a user gets wrong, met as the user meets them: `jaxtune run` in a subprocess exits 2 with
one line that names the culprit (the file, the key), before any work and without a traceback.

Model folders (missing, bad config.json, unknown model_type, no tokenizer files), data.max_length
past the model's positions, data files the OS will not give (a named pipe, a device, an I/O
error, no read permission), a data cache that cannot be written and TSVs with bare quotes
(data.quoting). Tests run as root, who reads and writes anything: the permission cases run the
CLI without the capabilities that let root ignore permissions
(`setpriv --bounding-set=-dac_override,-dac_read_search`), so the OS really refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import _tiny_run as tr

WARM = None  # set by the `warm` fixture


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    recipe = tr.make_assets(root)
    bert = root / "bert"

    def variant(name, drop=(), **config):
        folder = root / name
        shutil.copytree(bert, folder)
        for f in drop:
            (folder / f).unlink()
        if config:
            c = json.loads((folder / "config.json").read_text())
            c.update(config)
            (folder / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
        return folder

    bad_json = variant("bad_json")
    (bad_json / "config.json").write_text('{"model_type": "bert",')
    folders = {
        "bad_json": bad_json,
        "llama_x": variant("llama_x", model_type="llama_x"),
        "no_type": variant("no_type", model_type=None),
        "no_tokenizer": variant("no_tokenizer", drop=("tokenizer.json", "tokenizer_config.json")),
    }
    os.mkfifo(root / "pipe.csv")
    (root / "bare.tsv").write_text('text\tlabel\n"12 inch, said the box\ta\nit is 5" wide\tb\nplain\ta\n')
    return root, recipe(root / "run"), folders


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """Cases without a command prefix run as `jaxtune` processes forked from one that has
    imported jaxtune already (`_tiny_run.Warm`); with one (setpriv), as a fresh subprocess."""
    global WARM
    WARM = tr.shared_warm(tmp_path_factory)


def run_fails(recipe, *overrides, prefix=()) -> str:
    """`jaxtune run RECIPE OVERRIDES`: exit 2 and one line on stderr, returned without 'error: '."""
    if prefix:
        out = subprocess.run([*prefix, sys.executable, "-m", "jaxtune.cli", "run", str(recipe), *overrides],
                             capture_output=True, text=True, timeout=120)
    else:
        out = WARM.run("run", recipe, *overrides, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0][len("error: "):]


def test_model_folder_problems_name_the_folder_not_the_tokenizer(assets):
    root, recipe, folders = assets
    missing = root / "no_such_model"
    assert run_fails(recipe, f"model.path={missing}") == f"model folder not found: {missing}"
    msg = run_fails(recipe, f"model.path={folders['bad_json']}")
    assert msg.startswith(f"{folders['bad_json']}/config.json: invalid JSON at line 1"), msg
    msg = run_fails(recipe, f"model.path={folders['llama_x']}")
    assert msg.startswith(f"{folders['llama_x']}/config.json: unsupported model_type 'llama_x'; supported: "), msg
    assert "bert" in msg.split("supported: ")[1].split(", "), msg
    msg = run_fails(recipe, f"model.path={folders['no_type']}")
    assert msg.startswith(f"{folders['no_type']}/config.json: no model_type; supported: "), msg
    assert "bert" in msg.split("supported: ")[1].split(", "), msg


def test_a_folder_without_tokenizer_files_is_refused_not_trained_with_an_empty_one(assets):
    """transformers builds an empty BertTokenizer (5 special tokens: every word [UNK]) from
    config.json alone; the run trained on that and exported no tokenizer."""
    root, recipe, folders = assets
    msg = run_fails(recipe, f"model.path={folders['no_tokenizer']}")
    assert msg.startswith(f"{folders['no_tokenizer']}: no tokenizer files (looked for tokenizer.json, vocab.txt"), msg
    assert not (root / "run" / "export").exists()


def test_max_length_past_the_positions_is_an_error_before_any_work(assets):
    root, recipe, _ = assets
    msg = run_fails(recipe, "data.max_length=33", f"data.cache_dir={root / 'untouched_cache'}")
    assert msg == (f"data.max_length (33) is longer than the model's 32 positions (max_position_embeddings 32 "
                   f"in {root}/bert/config.json); set data.max_length=32 or less")
    assert not (root / "untouched_cache").exists()  # before the data was read


def test_max_positions_per_family():
    from transformers import BertConfig, GPT2Config, RobertaConfig

    from jaxtune.models import get_family
    from jaxtune.models.pretrained import make_config
    from jaxtune.run.build import max_positions

    def limit(hf):
        d = hf.to_dict()
        return max_positions(make_config(get_family(d["model_type"]), d))

    assert limit(BertConfig(max_position_embeddings=512)) == 512
    assert limit(GPT2Config(n_positions=64)) == 64
    # RoBERTa counts positions from pad_token_id + 1: 514 embeddings hold 512 tokens
    assert limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


@pytest.mark.parametrize("spec, message", [
    ("csv:{root}/pipe.csv", "data.train: {root}/pipe.csv is not a regular file (a named pipe); give a saved file"),
    ("csv:/dev/zero", "data.train: /dev/zero is not a regular file (a character device); give a saved file"),
    ("csv:/proc/self/mem", "cannot read /proc/self/mem: Input/output error"),
    ("csv:{root}", "data.train: expected a file, got folder {root}"),
], ids=["named-pipe", "device", "io-error", "folder"])
def test_data_files_the_os_will_not_give(assets, spec, message):
    root, recipe, _ = assets
    assert run_fails(recipe, f"data.train={spec.format(root=root)}") == message.format(root=root)


def without_root_powers() -> tuple:
    """A command prefix under which permissions hold for root too (nothing for another user)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root without setpriv (util-linux, essential on Debian): root ignores "
                    "file permissions, so this test cannot drop that power; install util-linux")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


def test_a_data_file_without_read_permission(assets):
    root, recipe, _ = assets
    secret = root / "secret.csv"
    shutil.copyfile(root / "data.csv", secret)
    secret.chmod(0)
    msg = run_fails(recipe, f"data.train=csv:{secret}", prefix=without_root_powers())
    assert msg == f"cannot read {secret}: Permission denied"


def test_bare_quotes_in_a_tsv_name_the_option(assets):
    root, recipe, _ = assets
    msg = run_fails(recipe, f"data.train=tsv:{root}/bare.tsv")
    assert msg.startswith(f"{root}/bare.tsv line 2: not valid TSV") and msg.endswith(
        'a file with bare " characters needs data.quoting=none'), msg


def test_an_unwritable_data_cache(assets):
    root, recipe, _ = assets
    msg = run_fails(recipe, f"data.cache_dir={root}/data.csv/cache")
    assert msg == (f"cannot write the data cache {root}/data.csv/cache/local: Not a directory "
                   "(set data.cache_dir to a writable folder)")
    locked = root / "locked_cache"
    (locked / "local").mkdir(parents=True)
    (locked / "local").chmod(0o555)
    msg = run_fails(recipe, f"data.cache_dir={locked}", prefix=without_root_powers())
    assert msg == f"cannot write the data cache {locked}/local: Permission denied (set data.cache_dir to a writable folder)"
