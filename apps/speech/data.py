"""Speech data: where recordings come from, how they are split, and the digit corpus.

Three sources of labelled clips:

- a Free Spoken Digit Dataset folder: ``{digit}_{speaker}_{index}.wav`` files;
- a Speech Commands folder: one sub-folder per label, ``validation_list.txt``
  and ``testing_list.txt`` naming the held-out files, speaker = the file name
  before ``_nohash_``;
- ``tfds:speech_commands`` through tensorflow_datasets (already split).

Splits: FSDD's official one (indices 0-4 are test), or speaker-independent
(``test_speakers``); a seeded 10% of the remaining training clips validates.

The connected-digit corpus (`connected_digits`) joins isolated recordings of
one speaker into digit strings, deterministically from a seed.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from apps.speech.features import AUDIO_SUFFIXES, AudioError, FeatureCache
from common.errors import UserError
from common.runs import safe_child

SAMPLES = Path(__file__).parent / "samples" / "fsdd"
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)$")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Clip:
    """One labelled recording: a file, or a waveform already in memory."""

    name: str  # the path, or a readable id for in-memory audio
    label: str
    speaker: str = ""
    index: int = -1  # FSDD repetition index
    split: str | None = None  # set by the source when it has its own split
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    rate: int = 0  # sample rate of `audio`


# -- sources ---------------------------------------------------------------------


def load_clips(data: str | None) -> tuple[list[Clip], str]:
    """Clips of `data` (a folder, or ``tfds:NAME``) and the layout's name."""
    if data is None:
        return fsdd_clips(SAMPLES), "fsdd"
    if data.startswith("tfds:"):
        return tfds_clips(data[len("tfds:"):]), "tfds"
    folder = Path(data)
    if not folder.exists():
        raise UserError(f"--data {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder (expected FSDD recordings or one "
                        "sub-folder per label)")
    # FSDD-named recordings at the top decide; otherwise label sub-folders.
    if not any(FSDD_NAME.match(p.stem) and p.suffix.lower() in AUDIO_SUFFIXES
               for p in folder.iterdir()) and \
            any(p.is_dir() and not p.name.startswith((".", "_")) for p in folder.iterdir()):
        return speech_commands_clips(folder), "speech_commands"
    return fsdd_clips(folder), "fsdd"


def fsdd_clips(folder: Path) -> list[Clip]:
    """FSDD recordings named ``{digit}_{speaker}_{index}.wav`` (other files ignored)."""
    clips, ignored = [], []
    for path in sorted(folder.iterdir()):
        match = FSDD_NAME.match(path.stem)
        if path.suffix.lower() not in AUDIO_SUFFIXES or not match:
            ignored.append(path.name)
            continue
        digit, speaker, index = match.groups()
        clips.append(Clip(str(path), digit, speaker, int(index)))
    if not clips:
        raise UserError(f"--data {folder}: no recordings named {{digit}}_{{speaker}}_{{index}}"
                        ".wav (FSDD) and no label sub-folders (Speech Commands)"
                        + (f"; {len(ignored)} other file(s), e.g. {ignored[0]}" if ignored else ""))
    if ignored:
        print(f"note: {folder}: ignored {len(ignored)} file(s) not named "
              f"{{digit}}_{{speaker}}_{{index}}.wav/.flac/.ogg, e.g. {ignored[0]}",
              file=sys.stderr)
    return clips


def speech_commands_clips(folder: Path) -> list[Clip]:
    """The Speech Commands layout; the split comes from the two list files."""
    lists = {}
    for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt")):
        path = folder / name
        lists[split] = _listed_files(folder, path) if path.exists() else set()
    clips = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if label_dir.name.startswith((".", "_")):  # _background_noise_
            continue
        for path in sorted(label_dir.iterdir()):
            if path.suffix.lower() not in AUDIO_SUFFIXES:
                continue
            rel = f"{label_dir.name}/{path.name}"
            split = ("validation" if rel in lists["validation"]
                     else "test" if rel in lists["test"] else "train")
            speaker = path.stem.split("_nohash_")[0]
            clips.append(Clip(str(path), label_dir.name, speaker, split=split))
    if not clips:
        raise UserError(f"--data {folder}: no .wav/.flac/.ogg files in the label sub-folders")
    return clips


def _listed_files(folder: Path, list_file: Path) -> set[str]:
    """The ``LABEL/FILE`` entries of a split list; one leading outside `folder` is refused."""
    entries = set()
    for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if entry:
            safe_child(folder, entry, source=f"--data {list_file} line {n}")
            entries.add(entry)
    return entries


def tfds_clips(name: str, data_dir: str | None = None) -> list[Clip]:
    """Clips of a tensorflow_datasets audio dataset (``audio`` + ``label`` features)."""
    import tensorflow_datasets as tfds

    try:
        splits, info = tfds.load(name, split=["train", "validation", "test"], with_info=True,
                                 data_dir=data_dir, download=False)
    except Exception as exc:  # noqa: BLE001  (tfds raises many kinds)
        raise UserError(f"--data tfds:{name}: cannot load it with tensorflow_datasets "
                        f"(prepare it first with `tfds build {name}`): "
                        f"{str(exc).splitlines()[0][:200]}") from None
    names = info.features["label"].names
    rate = int(getattr(info.features["audio"], "sample_rate", None) or 16000)
    clips = []
    for split, dataset in zip(SPLITS, splits, strict=True):
        for i, example in enumerate(tfds.as_numpy(dataset)):
            audio = np.asarray(example["audio"])
            if audio.dtype.kind in "iu":  # int16 PCM
                audio = audio.astype(np.float32) / 32768.0
            clips.append(Clip(f"tfds:{name}/{split}/{i}", names[int(example["label"])],
                              split=split, audio=audio.astype(np.float32).reshape(-1),
                              rate=rate))
    return clips


# -- splits -----------------------------------------------------------------------


def split_clips(clips: Sequence[Clip], *, test_speakers: Sequence[str] = (),
                seed: int = 0, validation_fraction: float = 0.1) -> dict[str, list[Clip]]:
    """train/validation/test lists.

    With `test_speakers`, those speakers are the test set (speaker-independent);
    otherwise a source's own split is kept, and FSDD uses its official one
    (indices 0-4 are test). A seeded `validation_fraction` of the training clips
    validates when the source has no validation split.
    """
    speakers = {c.speaker for c in clips}
    unknown = [s for s in test_speakers if s not in speakers]
    if unknown:
        raise UserError(f"--test-speakers: no recordings of {', '.join(unknown)} "
                        f"(speakers: {', '.join(sorted(speakers))})")
    out: dict[str, list[Clip]] = {s: [] for s in SPLITS}
    for c in clips:
        if test_speakers:
            split = "test" if c.speaker in test_speakers else "train"
        elif c.split is not None:
            split = c.split
        else:
            split = "test" if 0 <= c.index <= 4 else "train"
        out[split].append(c)
    if not out["validation"] and out["train"]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(out["train"]))
        n_val = max(1, int(round(validation_fraction * len(order)))) if len(order) > 1 else 0
        chosen = set(order[:n_val].tolist())
        out["validation"] = [c for i, c in enumerate(out["train"]) if i in chosen]
        out["train"] = [c for i, c in enumerate(out["train"]) if i not in chosen]
    if not out["train"]:
        raise UserError("no training recordings left after the split")
    return out


# -- features -------------------------------------------------------------------------


class SkipWarnings:
    """Warns about the first `shown` skipped recordings, then only counts; `summary`
    prints the count.

    A setting that rules out every file (e.g. an analysis window longer than
    the clips) would otherwise print one line per file before its error.
    """

    def __init__(self, shown: int = 10):
        self.shown = shown
        self.count = 0

    def add(self, exc: AudioError) -> None:
        self.count += 1
        if self.count <= self.shown:
            print(f"warning: skipped {exc}", file=sys.stderr)
        elif self.count == self.shown + 1:
            print(f"warning: more skipped; only the first {self.shown} are named",
                  file=sys.stderr)

    def summary(self, what: str, total: int | None = None) -> None:
        """'skipped N [of TOTAL] WHAT that could not be used', if any was skipped."""
        if self.count:
            of = f" of {total}" if total is not None else ""
            print(f"warning: skipped {self.count}{of} {what} that could not be used "
                  "(--strict stops at the first)", file=sys.stderr)


def clip_features(clips: Sequence[Clip], cache: FeatureCache, *, strict: bool = False,
                  what: str = "recordings", speed: float = 1.0,
                  ) -> tuple[list[np.ndarray], list[Clip]]:
    """MFCCs of every usable clip (speed-perturbed by `speed`), with a progress bar.

    Bad clips are skipped with a warning naming each and a count at the end, or,
    with `strict`, the first one raises `AudioError`.

    Returns:
        (features, the clips they belong to).
    """
    import keras

    features, kept, skips = [], [], SkipWarnings()
    bar = (keras.utils.Progbar(len(clips), unit_name="clip",
                                verbose=1 if sys.stdout.isatty() else 2)
           if len(clips) > 200 else None)
    for i, clip in enumerate(clips):
        try:
            features.append(_features_of(clip, cache, speed))
            kept.append(clip)
        except AudioError as exc:
            if strict:
                raise
            skips.add(exc)
        if bar is not None:
            bar.update(i + 1)
    skips.summary(what, len(clips))
    return features, kept


def _features_of(clip: Clip, cache: FeatureCache, speed: float = 1.0) -> np.ndarray:
    if clip.audio is None:
        return cache.file_features(clip.name, speed)
    audio = clip.audio
    if clip.rate and clip.rate != cache.cfg.sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=clip.rate, target_sr=cache.cfg.sample_rate)
    return cache.wave_features(audio, clip.name, speed)


def label_counts(clips: Iterable[Clip]) -> Counter:
    return Counter(c.label for c in clips)


# -- connected digits ----------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """A digit string spoken by one speaker, joined from isolated recordings."""

    digits: str
    speaker: str
    waveform: np.ndarray = field(repr=False, compare=False)


def connected_digits(clips: Sequence[Clip], count: int, *, seed: int, sample_rate: int,
                     min_digits: int = 1, max_digits: int = 7, max_gap: float = 0.25,
                     max_overlap: float = 0.03, trim_db: float = 30.0,
                     strict: bool = False, source: str = "the recordings") -> list[Utterance]:
    """`count` random digit strings, each made of ONE speaker's recordings.

    Every recording is trimmed of silence; between two digits goes a random gap
    of up to `max_gap` seconds of silence, or an overlap of up to `max_overlap`
    seconds (the two add up). The same clips, count and seed give the same
    utterances.
    """
    from apps.speech.features import load_audio

    rng = np.random.default_rng(seed)
    pools: dict[str, dict[str, list[Clip]]] = defaultdict(lambda: defaultdict(list))
    for c in clips:
        if c.label.isdigit() and len(c.label) == 1:
            pools[c.speaker][c.label].append(c)
    speakers = sorted(s for s, by_digit in pools.items() if by_digit)
    if not speakers:
        raise UserError("no digit recordings (labels 0-9) to build connected digits from")
    audio_cache: dict[str, np.ndarray | None] = {}
    skips = SkipWarnings()

    def audio(clip: Clip) -> np.ndarray | None:
        if clip.name not in audio_cache:
            import librosa

            try:
                y = clip.audio if clip.audio is not None else load_audio(clip.name, sample_rate)
                y, _ = librosa.effects.trim(y, top_db=trim_db, frame_length=256, hop_length=64)
                audio_cache[clip.name] = y if y.size >= 256 else None
                if y.size == 0:
                    raise AudioError(f"{clip.name}: silent")
                if y.size < 256:  # less than one trimming frame: not a spoken digit
                    raise AudioError(f"{clip.name}: {y.size} samples after trimming silence, "
                                     "too short for a spoken digit (at least 256)")
            except AudioError as exc:
                if strict:
                    raise
                skips.add(exc)
                audio_cache[clip.name] = None
        return audio_cache[clip.name]

    out = []
    while len(out) < count:
        speaker = speakers[rng.integers(len(speakers))]
        digits = sorted(pools[speaker])
        n = int(rng.integers(min_digits, max_digits + 1))
        string = "".join(digits[rng.integers(len(digits))] for _ in range(n))
        pieces = [audio(pools[speaker][d][rng.integers(len(pools[speaker][d]))]) for d in string]
        gaps = rng.uniform(-max_overlap, max_gap, size=n + 1)
        if any(p is None for p in pieces):
            # Unusable recordings leave the pools, so a folder of bad files cannot
            # make this loop run forever.
            for by_digit in pools.values():
                for digit in list(by_digit):
                    by_digit[digit] = [c for c in by_digit[digit]
                                       if audio_cache.get(c.name, 0) is not None]
                    if not by_digit[digit]:
                        del by_digit[digit]
            speakers = sorted(s for s, by_digit in pools.items() if by_digit)
            if not speakers:
                raise UserError(f"{source}: no usable digit recordings (every one was "
                                "skipped, see the warnings)")
            continue
        out.append(Utterance(string, speaker, _join(pieces, gaps, sample_rate)))
    skips.summary("recording(s)")
    return out


def _join(pieces: list[np.ndarray], gaps: np.ndarray, rate: int) -> np.ndarray:
    lead = int(abs(gaps[0]) * rate)
    tail = int(abs(gaps[-1]) * rate)
    starts, pos = [], lead
    for piece, gap in zip(pieces, gaps[1:], strict=True):
        starts.append(pos)
        pos = max(pos + len(piece) + int(gap * rate), starts[-1] + 1)
    total = max(s + len(p) for s, p in zip(starts, pieces, strict=True)) + tail
    y = np.zeros(total, np.float32)
    for s, p in zip(starts, pieces, strict=True):
        y[s:s + len(p)] += p
    return y


def with_split(clips: Sequence[Clip], split: str) -> list[Clip]:
    return [replace(c, split=split) for c in clips]
