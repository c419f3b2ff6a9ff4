"""Build a real spoken-digits recording set offline with Debian's speech synthesizers.

    apt-get install -y espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
    python tools/speech_clips.py data/speech_digits              # 2400 train + 300 test clips
    python tools/speech_clips.py OUT --train 40 --test 10 --seed 1

Each clip speaks a string of 1 to 4 digits ("three seven one") as words. Voices:

- espeak-ng: six English accents (en-us, en-gb, en-gb-scotland, en-gb-x-rp, en-gb-x-gbclan,
  en-029), each clip with one of espeak's voice variants (male m1-m7, female f1-f4, and others),
  a speed of 120-200 words per minute and a pitch of 20-80, drawn per clip;
- Festival: `kal_diphone` (festvox-kallpc16k) and `cmu_us_slt_arctic_hts` (festvox-us-slt-hts),
  at duration stretches 0.85-1.2;
- held out entirely for the test split: Festival's `ked_diphone` (festvox-kdlpc16k), a voice no
  training clip uses (`--test-voice` chooses another: `espeak:VOICE` or `festival:VOICE`).

Output (the `audio:DIR` layout jaxtune reads, a .txt transcript beside every .wav):

    OUT/train/<voice>/<n>.wav + .txt      training voices
    OUT/test/<voice>/<n>.wav + .txt       the held-out voice
    OUT/clips.csv                         split, path, text, voice, settings per clip

The clips are the synthesizers' own output (espeak-ng at 22.05 kHz, Festival at 16 kHz, the HTS
voice at 32 kHz); jaxtune resamples them when it reads them. The HTS voice ignores Festival's
Duration_Stretch, so its clips of the same text are identical recordings (jaxtune's
de-duplication keeps one: 2164 of the default 2400 training clips remain). The same --seed gives the same texts and settings. A voice
whose synthesizer is not installed stops the tool with one line naming the package.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2")
FESTIVAL_TRAIN = ("kal_diphone", "cmu_us_slt_arctic_hts")
TEST_VOICE = "festival:ked_diphone"
PACKAGES = {"espeak": "espeak-ng", "kal_diphone": "festvox-kallpc16k", "ked_diphone": "festvox-kdlpc16k",
            "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}


class ToolError(Exception):
    """One line for the user (exit code 2)."""


@dataclass
class Clip:
    split: str
    voice: str  # espeak:en-us or festival:kal_diphone
    text: str
    settings: str  # e.g. "variant=f3 speed=150 pitch=40" or "stretch=1.05"
    path: Path = None


def digit_text(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 4)))


def _espeak_clip(rng: random.Random, split: str, voice: str) -> Clip:
    variant = rng.choice(ESPEAK_VARIANTS)
    settings = f"variant={variant} speed={rng.randint(120, 200)} pitch={rng.randint(20, 80)}"
    return Clip(split, f"espeak:{voice}", digit_text(rng), settings)


def _festival_clip(rng: random.Random, split: str, voice: str) -> Clip:
    return Clip(split, f"festival:{voice}", digit_text(rng), f"stretch={rng.uniform(0.85, 1.2):.2f}")


def plan_clips(n_train: int, n_test: int, seed: int, test_voice: str = TEST_VOICE) -> list[Clip]:
    """Every clip's split, voice, text and settings; train voices exclude `test_voice`. Half the
    training clips are espeak-ng's, half Festival's."""
    rng = random.Random(seed)
    kind, _, name = test_voice.partition(":")
    if kind not in ("espeak", "festival") or not name:
        raise ToolError(f"--test-voice {test_voice!r}: expected espeak:VOICE or festival:VOICE")
    espeak = [v for v in ESPEAK_VOICES if f"espeak:{v}" != test_voice]
    festival = [v for v in FESTIVAL_TRAIN if f"festival:{v}" != test_voice]
    clips, n_espeak, n_festival = [], 0, 0
    for i in range(n_train):  # voices in turn within each synthesizer
        if festival and i % 2:
            clips.append(_festival_clip(rng, "train", festival[n_festival % len(festival)]))
            n_festival += 1
        else:
            clips.append(_espeak_clip(rng, "train", espeak[n_espeak % len(espeak)]))
            n_espeak += 1
    make = _espeak_clip if kind == "espeak" else _festival_clip
    clips += [make(rng, "test", name) for _ in range(n_test)]
    return clips


def _need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        raise ToolError(f"{program} is not installed: apt-get install -y {package}")


def synth_espeak(clips: list[Clip]) -> None:
    _need("espeak-ng", PACKAGES["espeak"])
    for c in clips:
        voice = c.voice.split(":", 1)[1]
        s = dict(kv.split("=") for kv in c.settings.split())
        cmd = ["espeak-ng", "-v", f"{voice}+{s['variant']}", "-s", s["speed"], "-p", s["pitch"], "-w", str(c.path),
               c.text]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not c.path.is_file():
            raise ToolError(f"espeak-ng failed for {c.path}: {done.stderr.strip() or done.returncode}")


def synth_festival(voice: str, clips: list[Clip]) -> None:
    """All clips of one Festival voice in one festival process (its start-up dominates a clip)."""
    _need("festival", "festival")
    lines = [f"(voice_{voice})"]
    for c in clips:
        stretch = c.settings.split("=")[1]
        text = c.text.replace('"', "")
        lines.append(f"(Parameter.set 'Duration_Stretch {stretch})")
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{c.path}" \'riff)')
    with tempfile.NamedTemporaryFile("w", suffix=".scm", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        script = f.name
    try:
        done = subprocess.run(["festival", "-b", script], capture_output=True, text=True)
    finally:
        Path(script).unlink(missing_ok=True)
    missing = [c.path for c in clips if not c.path.is_file()]
    if done.returncode != 0 or missing or "not a known voice" in done.stderr or "unbound variable" in done.stderr:
        package = PACKAGES.get(voice, "its festvox package")
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{len(missing)} clips not written"
        raise ToolError(f"festival voice {voice} failed ({why}); is it installed? apt-get install -y {package}")


def build(out: Path, n_train: int, n_test: int, seed: int, test_voice: str = TEST_VOICE) -> list[Clip]:
    """Synthesize every clip into `out` (see the module docstring); returns the clips."""
    clips = plan_clips(n_train, n_test, seed, test_voice)
    counters: dict = {}
    for c in clips:
        folder = out / c.split / c.voice.replace(":", "-")
        folder.mkdir(parents=True, exist_ok=True)
        n = counters[folder] = counters.get(folder, 0) + 1
        c.path = folder / f"{n:05d}.wav"
        c.path.with_suffix(".txt").write_text(c.text + "\n")
    synth_espeak([c for c in clips if c.voice.startswith("espeak:")])
    for voice in sorted({c.voice for c in clips if c.voice.startswith("festival:")}):
        synth_festival(voice.split(":", 1)[1], [c for c in clips if c.voice == voice])
    with open(out / "clips.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "path", "text", "voice", "settings"])
        for c in clips:
            w.writerow([c.split, c.path.relative_to(out), c.text, c.voice, c.settings])
    return clips


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=2400)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-voice", default=TEST_VOICE)
    a = p.parse_args(argv)
    try:
        if a.out.exists() and any(a.out.iterdir()):
            raise ToolError(f"{a.out} exists and is not empty; choose a new folder")
        clips = build(a.out, a.train, a.test, a.seed, a.test_voice)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    voices = sorted({c.voice for c in clips})
    print(f"{len(clips)} clips ({a.train} train, {a.test} test: {a.test_voice}) from {len(voices)} voices in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
