"""Speech recognition with LSTMs on MFCCs: spoken words and connected digits.

    python -m apps.speech words train --run-dir runs/words            # shipped FSDD sample
    python -m apps.speech words evaluate --run-dir runs/words --json
    python -m apps.speech words predict --run-dir runs/words a.wav b.flac
    python -m apps.speech digits train --run-dir runs/digits --data /path/to/fsdd/recordings
    python -m apps.speech digits predict --run-dir runs/digits utterance.wav

The pipeline: data.py (recordings, splits, the connected-digit corpus) ->
features.py (librosa MFCCs, cached) -> model.py (LSTM models, CTC, serving)
-> common.training.train (fit, checkpoints, logs, export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.cli import (
    add_members_flag,
    build_parser,
    dropout_rate,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_json,
    run_main,
)
from common.errors import UserError

APP = "speech"
# Masking widths are in frames, so they follow the hop: ~50 ms for words, ~60 ms
# for digits (shorter than a digit, so CTC's labels stay right).
WORD_DEFAULTS = {"hop_ms": 10.0, "units": 64, "layers": 2, "time_mask_width": 5}
DIGIT_DEFAULTS = {"hop_ms": 20.0, "units": 96, "layers": 2, "time_mask_width": 3}


# -- command line -------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser, commands = build_parser(
        "lstm-speech",
        "Speech recognition with LSTMs on MFCC features: isolated spoken words "
        "(FSDD, Speech Commands) and connected-digit strings (CTC).",
        {"words": "recognise an isolated spoken word (one label per recording)",
         "digits": "transcribe a string of spoken digits (CTC)"},
        train_defaults={"words": {"epochs": 30, "batch_size": 32, "patience": 8},
                        "digits": {"epochs": 40, "batch_size": 32, "patience": 8}},
        extra_commands={"words": {"ensemble": "combine trained runs into one run whose "
                                              "probabilities are the mean of theirs"},
                        "digits": {"ensemble": "combine trained runs into one run that "
                                               "transcribes with the string their mean CTC "
                                               "probability prefers"}})
    data_help = ("recordings: an FSDD folder ({digit}_{speaker}_{index}.wav), a Speech "
                 "Commands folder (one sub-folder per label), or tfds:speech_commands; "
                 "default: the FSDD sample shipped in apps/speech/samples/fsdd")
    for task, defaults in (("words", WORD_DEFAULTS), ("digits", DIGIT_DEFAULTS)):
        train = commands[task, "train"]
        _replace_help(train, "--data", data_help)
        _feature_flags(train, defaults)
        _model_flags(train, defaults)
        train.add_argument("--test-speakers", metavar="A,B", type=_names, default=(),
                           help="speaker-independent split: these speakers are the test set "
                                "(default: words: FSDD's official split, indices 0-4 are test; "
                                "digits: the last speaker in alphabetical order)")
        for command in ("train", "evaluate", "predict"):
            _cache_flags(commands[task, command])
        _replace_help(commands[task, "evaluate"], "--data",
                      "recordings to evaluate on, all of them (for tfds: its test split); "
                      "default: the test split of the run's training data")
    words = commands["words", "train"]
    words.add_argument("--max-frames", type=positive_int,
                       help="frames per example (longer ones are cut); default: the longest "
                            "training example, rounded up to 16, at most 200")
    words.add_argument("--noise", type=non_negative_float, default=0.05,
                       help="augmentation: std of Gaussian noise added to the normalised MFCCs")
    words.add_argument("--shift", type=non_negative_int, default=4,
                       help="augmentation: random time shift of up to this many frames")
    words.add_argument("--gain", type=non_negative_float, default=0.1,
                       help="augmentation: random gain, features scaled by 1 +/- this")
    digits = commands["digits", "train"]
    digits.add_argument("--utterances", type=positive_int, default=2000,
                        help="connected-digit training utterances to generate")
    digits.add_argument("--test-utterances", type=positive_int, default=200,
                        help="test utterances (from the test speakers); validation gets "
                             "a tenth of --utterances")
    digits.add_argument("--max-digits", type=positive_int, default=7,
                        help="digit strings are 1 to this many digits long")
    digits.add_argument("--corpus-seed", type=int, default=0,
                        help="seed of the generated corpus (same seed, same utterances)")
    digits.add_argument("--noise", type=non_negative_float, default=0.05,
                        help="augmentation: std of Gaussian noise added to the normalised MFCCs")
    digits.add_argument("--gain", type=non_negative_float, default=0.1,
                        help="augmentation: random gain, features scaled by 1 +/- this")
    for task, defaults in (("words", WORD_DEFAULTS), ("digits", DIGIT_DEFAULTS)):
        _augment_flags(commands[task, "train"], defaults)
    for command in ("train", "evaluate", "predict", "export", "ensemble"):
        commands["digits", command].add_argument(
            "--beam-width", type=non_negative_int, default=8,
            help="CTC beam-search width for evaluation/prediction/export; 0 decodes greedily")
    for task in ("words", "digits"):
        commands[task, "predict"].add_argument("files", nargs="+", metavar="FILE",
                                               help="audio files (WAV/FLAC/OGG), any rate, "
                                                    "mono or stereo")
    add_members_flag(commands["words", "ensemble"],
                     "`words` run directories with the same data, labels and features (e.g. "
                     "the same command with different --seed)")
    add_members_flag(commands["digits", "ensemble"],
                     "`digits` run directories with the same data, features, test speakers "
                     "and test corpus (--corpus-seed, --test-utterances, --max-digits; e.g. "
                     "the same command with different --seed)")
    return parser


def _replace_help(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    for action in parser._actions:  # argparse has no public way to edit a help string
        if flag in action.option_strings:
            action.help = text


def _names(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected speaker names separated by commas")
    return names


def _feature_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--sample-rate", type=positive_int,
                        help="audio is resampled to this rate (Hz); default: 8000 for FSDD "
                             "folders, 16000 for Speech Commands")
    parser.add_argument("--n-mfcc", type=positive_int, default=13,
                        help="MFCC coefficients per frame")
    parser.add_argument("--window-ms", type=positive_float, default=32.0,
                        help="analysis window (= FFT size) in milliseconds")
    parser.add_argument("--hop-ms", type=positive_float, default=defaults["hop_ms"],
                        help="hop between frames in milliseconds")
    parser.add_argument("--n-mels", type=positive_int, default=40, help="mel bands")
    parser.add_argument("--trim-db", type=positive_float, default=40.0,
                        help="trim leading/trailing audio quieter than this many dB below "
                             "the loudest frame")
    parser.add_argument("--floor-db", type=positive_float, default=60.0,
                        help="log-mel values are floored this many dB below the clip's "
                             "loudest, so that the quietest parts (background noise, "
                             "microphone) matter less; 80 is librosa's own floor")
    parser.add_argument("--no-deltas", action="store_true",
                        help="MFCCs only, without deltas and delta-deltas")


def _speeds(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("none", "1", "1.0", ""):
        return ()
    try:
        factors = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected speed factors separated by commas (e.g. 0.9,1.1) or 'none', "
            f"got '{text}'") from None
    if not factors or any(not 0.5 <= f <= 2.0 for f in factors):
        raise argparse.ArgumentTypeError(f"speed factors must be between 0.5 and 2, got '{text}'")
    return tuple(f for f in dict.fromkeys(factors) if f != 1.0)


def _augment_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """SpecAugment-style masking and speed perturbation (training data only)."""
    parser.add_argument("--time-masks", type=non_negative_int, default=2,
                        help="augmentation: time spans per example set to the mean "
                             "(SpecAugment); 0 disables")
    parser.add_argument("--time-mask-width", type=non_negative_int,
                        default=defaults["time_mask_width"],
                        help="augmentation: longest masked time span, in frames (and at most "
                             "an eighth of the example)")
    parser.add_argument("--freq-masks", type=non_negative_int, default=2,
                        help="augmentation: bands of MFCC coefficients per example set to the "
                             "mean (the same ones in the deltas); 0 disables")
    parser.add_argument("--freq-mask-width", type=non_negative_int, default=2,
                        help="augmentation: widest masked band, in coefficients")
    parser.add_argument("--speed", type=_speeds, default=(0.9, 1.1), metavar="F,F",
                        help="augmentation: speed perturbation factors besides 1 (audio "
                             "resampled, so tempo and pitch change; features cached per "
                             "factor); 'none' disables (default: 0.9,1.1)")


def _model_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--units", type=positive_int, default=defaults["units"],
                        help="LSTM units per direction")
    parser.add_argument("--layers", type=positive_int, default=defaults["layers"],
                        help="stacked LSTM layers")
    parser.add_argument("--unidirectional", action="store_true",
                        help="forward LSTMs only (default: bidirectional)")
    parser.add_argument("--dropout", type=dropout_rate, default=0.2,
                        help="dropout after every LSTM layer")


def _masking(args: argparse.Namespace) -> dict[str, int]:
    return {"time_masks": args.time_masks, "time_mask_width": args.time_mask_width,
            "freq_masks": args.freq_masks, "freq_mask_width": args.freq_mask_width}


def _augment(args: argparse.Namespace, feat_cfg, shift: int = 0):
    """The training-data map function (`augment_fn`) of the augmentation flags."""
    from apps.speech.model import augment_fn

    return augment_fn(args.seed, args.noise, shift, args.gain, **_masking(args),
                      blocks=3 if feat_cfg.deltas else 1)


def _cache_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="MFCC cache folder ('none' disables it); default: "
                             "~/.cache/lstm-suite/mfcc")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unusable recording instead of skipping it "
                             "with a warning")


# -- shared steps ----------------------------------------------------------------------


def _feature_config(args: argparse.Namespace, layout: str):
    from apps.speech.features import FeatureConfig

    rate = args.sample_rate or (16000 if layout in ("speech_commands", "tfds") else 8000)
    cfg = FeatureConfig(sample_rate=rate, n_mfcc=args.n_mfcc, window_ms=args.window_ms,
                        hop_ms=args.hop_ms, n_mels=args.n_mels, trim_db=args.trim_db,
                        floor_db=args.floor_db, deltas=not args.no_deltas)
    if cfg.hop < 1 or cfg.n_fft < 16:
        raise UserError(f"--window-ms {args.window_ms} / --hop-ms {args.hop_ms}: too small at "
                        f"{rate} Hz")
    if cfg.n_mfcc > cfg.n_mels:
        raise UserError(f"--n-mfcc {cfg.n_mfcc}: at most --n-mels ({cfg.n_mels})")
    masks = getattr(args, "freq_masks", 0)  # train only
    if masks and masks * args.freq_mask_width >= cfg.n_mfcc:
        raise UserError(f"--freq-masks {masks} x --freq-mask-width {args.freq_mask_width}: "
                        f"must be smaller than --n-mfcc ({cfg.n_mfcc}), or the bands could "
                        "mask every coefficient")
    return cfg


def _check_resume_features(args: argparse.Namespace, cfg, task: str) -> None:
    """Refuse to resume a run on other features than it was trained on (the weights
    would not change shape, so nothing else would notice)."""
    from apps.speech.features import FEATURES_CHANGE, FEATURES_VERSION
    from common import runs

    config = runs.stored_config(args.run_dir, app=APP, task=task)
    stored = ((config or {}).get("app_settings") or {}).get("features")
    if stored is None:
        return
    version = _features_version(config["app_settings"])
    if version != FEATURES_VERSION:
        raise UserError(f"--resume: {Path(args.run_dir).absolute()} was trained with an older "
                        f"feature computation (version {version}, now {FEATURES_VERSION}: "
                        f"{FEATURES_CHANGE}); resuming would change its inputs mid-training, "
                        "so start a new --run-dir")
    trained, given = _features_as_trained(stored), cfg.to_dict()
    changed = [f"{key}: {value!r} -> {given[key]!r}" for key, value in trained.items()
               if given[key] != value]
    if changed:
        raise UserError(f"--resume: {Path(args.run_dir).absolute()} was trained on other "
                        f"features ({'; '.join(changed)}); repeat the run's feature flags "
                        "(runs from before --floor-db need --floor-db 80), or choose another "
                        "--run-dir")


def _cache(args: argparse.Namespace, cfg):
    from apps.speech.features import DEFAULT_CACHE_DIR, FeatureCache

    root = args.cache_dir
    if root is None:
        root = DEFAULT_CACHE_DIR
    elif root.lower() == "none":
        root = None
    elif Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        raise UserError(f"--cache-dir {root}: is a file, not a folder (pass 'none' to "
                        "compute features without a cache)")
    return FeatureCache(root, cfg)


def _model_config(args: argparse.Namespace):
    from apps.speech.model import ModelConfig

    return ModelConfig(units=args.units, layers=args.layers,
                       bidirectional=not args.unidirectional, dropout=args.dropout)


def _features_version(settings: dict[str, Any]) -> int:
    """The feature computation a run's app_settings come from (runs before it was stored: 1)."""
    return settings.get("features_version", 1)


def _saved_settings(run) -> tuple[dict[str, Any], Any]:
    from apps.speech.features import FEATURES_CHANGE, FEATURES_VERSION, FeatureConfig

    settings = run.app_settings("features")
    version = _features_version(settings)
    if version != FEATURES_VERSION:
        print(f"note: {run.root} was trained with feature computation version {version}; "
              f"this is version {FEATURES_VERSION} ({FEATURES_CHANGE}), so clips that end in "
              "exact zeros get slightly other features than in training", file=sys.stderr)
    return settings, FeatureConfig.from_dict(settings["features"])


def _load_model(run):
    import apps.speech.model  # noqa: F401  (registers DropMask, which the CTC model uses)

    return run.load_model(compile=False)


def _read_files(files: list[str], cfg) -> tuple[list, list[str], list, int]:
    """(features, names, waveforms, bad count) of the files; one error line per bad file."""
    from apps.speech.features import AudioError, load_audio, mfcc

    features, names, waves, errors = [], [], [], []
    for name in files:
        try:
            y = load_audio(name, cfg.sample_rate)
            features.append(mfcc(y, cfg, name=name))
            names.append(name)
            waves.append(y)
        except AudioError as exc:
            errors.append(str(exc))
    if errors and not features:  # nothing to answer: one error line
        raise UserError(errors[0] if len(errors) == 1 else
                        f"none of the {len(files)} files could be read; first: {errors[0]}")
    for message in errors:
        print(f"lstm-speech: error: {message}", file=sys.stderr)
    bad = len(errors)
    return features, names, waves, bad


def _padded_waves(waves: list, limit: int = 2):
    import numpy as np

    waves = waves[:limit]
    out = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
    for i, w in enumerate(waves):
        out[i, :len(w)] = w
    return out


# -- words ----------------------------------------------------------------------------------


def words_train(args: argparse.Namespace) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    from apps.speech import data
    from apps.speech.features import FEATURES_VERSION, load_audio, pad_sequences
    from apps.speech.model import WordServing, build_word_model
    from common import runs, training

    clips, layout = data.load_clips(args.data)
    feat_cfg = _feature_config(args, layout)
    if args.resume:
        _check_resume_features(args, feat_cfg, "words")
    splits = data.split_clips(clips, test_speakers=args.test_speakers, seed=args.seed)
    cache = _cache(args, feat_cfg)
    feats: dict[str, tuple[list, list]] = {}
    for split in data.SPLITS:
        feats[split] = data.clip_features(splits[split], cache, strict=args.strict,
                                          what=f"{split} recordings")
        if splits[split] and not feats[split][1]:
            raise UserError(f"--data {args.data or data.SAMPLES}: every one of the "
                            f"{len(splits[split])} {split} recordings was skipped (the "
                            "warnings above say why)")
    # Speed-perturbed copies of every training clip; each epoch draws one version
    # (original or a perturbed one) per clip, so an epoch costs the same.
    variants = [data.clip_features(feats["train"][1], cache, strict=False, speed=f,
                                   what=f"training recordings at speed {f:g}")
                for f in args.speed]
    if any(len(kept) != len(feats["train"][1]) for _, kept in variants):
        variants = []  # a clip too short once perturbed: keep the originals only
    labels = sorted(data.label_counts(feats["train"][1]))
    if len(labels) < 2:
        raise UserError(f"--data {args.data or data.SAMPLES}: need at least 2 labels to train, "
                        f"found {labels}")
    index = {label: i for i, label in enumerate(labels)}
    longest = max(len(x) for xs, _ in [feats["train"], *variants] for x in xs)
    frames = args.max_frames or min(200, -(-longest // 16) * 16)

    def arrays(split, xs=None):
        cs = feats[split][1]
        xs = feats[split][0] if xs is None else xs
        keep = [i for i, c in enumerate(cs) if c.label in index]
        if len(keep) < len(cs):
            print(f"warning: {split}: skipped {len(cs) - len(keep)} recording(s) whose label "
                  "is not among the training labels", file=sys.stderr)
        if not keep:
            return None
        x = pad_sequences([xs[i] for i in keep], frames)
        y = np.array([index[cs[i].label] for i in keep], np.int32)
        return x, y

    train_xy, val_xy, test_xy = arrays("train"), arrays("validation"), arrays("test")
    keras.utils.set_random_seed(args.seed)
    batch = min(args.batch_size, len(train_xy[1]))
    augment = _augment(args, feat_cfg, shift=args.shift)
    train_ds = tf.data.Dataset.from_tensor_slices(train_xy)
    if variants:
        # (N, versions, frames, dim): the original first, then one per speed factor.
        stacked = np.stack([train_xy[0], *(arrays("train", xs)[0] for xs, _ in variants)], 1)
        train_ds = tf.data.Dataset.from_tensor_slices((stacked, train_xy[1])).map(
            lambda xs, y: (xs[tf.random.uniform([], 0, len(variants) + 1, tf.int32)], y))
    train_ds = (train_ds
                .shuffle(len(train_xy[1]), seed=args.seed, reshuffle_each_iteration=True)
                .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch, drop_remainder=True)  # one batch shape: one XLA compile
                .prefetch(tf.data.AUTOTUNE))
    test_clips = feats["test"][1] or feats["validation"][1] or feats["train"][1]
    sample = _padded_waves([load_audio(c.name, feat_cfg.sample_rate) if c.audio is None
                            else c.audio for c in test_clips[:2]])
    model_cfg = _model_config(args)
    settings = {"layout": layout, "features": feat_cfg.to_dict(),
                "features_version": FEATURES_VERSION, "model": vars(model_cfg),
                "labels": labels, "max_frames": frames, "test_speakers": list(args.test_speakers),
                "split_seed": args.seed,
                "augmentation": {"noise": args.noise, "shift": args.shift, "gain": args.gain,
                                 **_masking(args), "speed": list(args.speed) if variants else []},
                "examples": {s: len(feats[s][1]) for s in data.SPLITS}}
    print(f"words: {len(labels)} labels, {settings['examples']} examples, {frames} frames of "
          f"{feat_cfg.dim} features", flush=True)
    with runs.open_run(args.run_dir, app=APP, task="words", resume=args.resume) as run:
        result = training.train(
            run, training.TrainConfig.from_args(args),
            lambda: build_word_model(frames, feat_cfg.dim, len(labels), model_cfg),
            train_ds, val_xy, test_xy, loss="sparse_categorical_crossentropy",
            metrics=["accuracy"], monitor="val_loss",
            data_source=str(args.data or data.SAMPLES), settings=settings,
            serving=lambda m: WordServing(m, feat_cfg, labels), serving_sample=sample,
            probe_inputs=(val_xy or train_xy)[0][:8])
    test = result.metrics.get("test") or {}
    print(f"trained: test accuracy {test.get('accuracy', float('nan')):.4f}")
    return 0


def words_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from apps.speech import data
    from apps.speech.features import pad_sequences
    from common import runs

    run = runs.load_run(args.run_dir, app=APP, task="words")
    settings, feat_cfg = _saved_settings(run)
    model = _load_model(run)
    labels = settings["labels"]
    source = args.data or run.read_config().get("data")
    clips, layout = data.load_clips(source)
    if args.data:  # all of them; tfds has its own test split
        chosen = [c for c in clips if layout != "tfds" or c.split == "test"]
    else:
        chosen = data.split_clips(clips, test_speakers=settings["test_speakers"],
                                  seed=settings["split_seed"])["test"]
    chosen = _known_labels(chosen, labels, args.strict)
    xs, kept = data.clip_features(chosen, _cache(args, feat_cfg), strict=args.strict)
    if not kept:
        raise UserError(f"--data {source}: no usable "
                        f"recordings to evaluate (all {len(chosen)} were skipped)")
    x = pad_sequences(xs, settings["max_frames"])
    truth = np.array([labels.index(c.label) for c in kept])
    probs = model.predict(x, batch_size=args.batch_size, verbose=0)
    predicted = probs.argmax(-1)
    confusion = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {label: float(confusion[i, i] / confusion[i].sum())
                 for i, label in enumerate(labels) if confusion[i].sum()}
    nll = -np.log(np.maximum(probs[np.arange(len(truth)), truth], 1e-12)).mean()
    metrics = {"accuracy": float((predicted == truth).mean()), "loss": float(nll),
               "examples": len(kept), "per_class_accuracy": per_class,
               "confusion_matrix": confusion.tolist(), "labels": labels}
    image = _confusion_png(confusion, labels, run.root / "confusion_matrix.png")
    _tensorboard_image(run.logs / "evaluate", "confusion_matrix", image)
    if args.json:
        print_json(metrics)
    else:
        print(f"accuracy {metrics['accuracy']:.4f} on {len(kept)} recordings "
              f"(loss {metrics['loss']:.4f})")
        for label, acc in per_class.items():
            print(f"  {label:>12s}  {acc:.3f}")
        print(f"confusion matrix: {run.root / 'confusion_matrix.png'}")
    return 0


def _known_labels(clips: list, labels: list[str], strict: bool) -> list:
    unknown = [c for c in clips if c.label not in labels]
    if unknown:
        message = (f"{unknown[0].name}: label '{unknown[0].label}' is not one the model knows "
                   f"({', '.join(labels)})")
        if strict:
            raise UserError(message)
        print(f"warning: skipped {len(unknown)} recording(s) with labels the model does not "
              f"know, e.g. {message}", file=sys.stderr)
    known = [c for c in clips if c.label in labels]
    if not known:
        raise UserError(f"none of the recordings has a label the model knows ({', '.join(labels)})")
    return known


def _confusion_png(confusion, labels: list[str], path: Path) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    size = max(4, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for (i, j), n in __import__("numpy").ndenumerate(confusion):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if n > confusion.max() / 2 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _atomic_write_bytes(path, buffer.getvalue())
    return buffer.getvalue()


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def _tensorboard_image(logdir: Path, name: str, png: bytes) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        tf.summary.image(name, tf.image.decode_png(png, channels=4)[None], step=0)
    writer.close()


def words_predict(args: argparse.Namespace) -> int:
    from apps.speech.features import pad_sequences
    from common import runs

    run = runs.load_run(args.run_dir, app=APP, task="words")
    settings, feat_cfg = _saved_settings(run)
    features, names, _, bad = _read_files(args.files, feat_cfg)
    model = _load_model(run)
    probs = model.predict(pad_sequences(features, settings["max_frames"]), verbose=0)
    for name, p in zip(names, probs, strict=True):
        print(f"{name}\t{settings['labels'][int(p.argmax())]}\t{float(p.max()):.4f}")
    return 2 if bad else 0


def words_export(args: argparse.Namespace) -> int:
    from apps.speech.model import WordServing
    from common import runs
    from common.export import export_saved_model

    run = runs.load_run(args.run_dir, app=APP, task="words")
    settings, feat_cfg = _saved_settings(run)
    model = _load_model(run)
    sample = _synthetic_waves(feat_cfg.sample_rate)
    out = export_saved_model(WordServing(model, feat_cfg, settings["labels"]),
                             runs.export_path(run, args.out), sample)
    print(f"exported {out}")
    return 0


def _features_as_trained(stored: dict[str, Any]) -> dict[str, Any]:
    """Stored feature settings with the defaults older runs did not store."""
    from apps.speech.features import FeatureConfig

    return FeatureConfig.from_dict(stored).to_dict()


_CANONICAL = {"features": _features_as_trained}


def words_ensemble(args: argparse.Namespace) -> int:
    from apps.speech.model import WordServing
    from common import ensemble
    from common.export import export_saved_model

    members = ensemble.load_members(args.members, app=APP, task="words", run_dir=args.run_dir)
    ensemble.check_shared(members, ("labels", "features", "features_version", "max_frames",
                                    "test_speakers"),
                          "members must be trained on the same data, labels and features",
                          canonical=_CANONICAL)
    settings, feat_cfg = _saved_settings(members[0])
    model = ensemble.average_models([_load_model(m) for m in members],
                                    name="speech_words_ensemble")
    ensemble.write_ensemble_run(
        args.run_dir, app=APP, task="words", members=members, model=model, settings=settings,
        export=lambda model, path: export_saved_model(
            WordServing(model, feat_cfg, settings["labels"]), path,
            _synthetic_waves(feat_cfg.sample_rate)))
    return 0


def _synthetic_waves(rate: int):
    """Two short tone bursts: a self-check input that needs no data files."""
    import numpy as np

    t = np.arange(int(0.6 * rate)) / rate
    burst = np.sin(2 * np.pi * 300 * t) * np.hanning(len(t))
    return np.stack([burst, 0.5 * burst[::-1]]).astype(np.float32)


# -- digits -------------------------------------------------------------------------------------


def _digit_corpus(clips, test_speakers, seed: int, count: int, test_count: int,
                  max_digits: int, rate: int, strict: bool):
    from apps.speech import data

    train_side = [c for c in clips if c.speaker not in test_speakers]
    test_side = [c for c in clips if c.speaker in test_speakers]
    # Validation strings use other recordings of the training speakers (FSDD
    # indices 0-4) so no recording is in both.
    val_side = [c for c in train_side if 0 <= c.index <= 4] or train_side
    fit_side = [c for c in train_side if not 0 <= c.index <= 4] or train_side
    kw = {"sample_rate": rate, "max_digits": max_digits, "strict": strict}
    return (data.connected_digits(fit_side, count, seed=seed, **kw),
            data.connected_digits(val_side, max(count // 10, 1), seed=seed + 1, **kw),
            data.connected_digits(test_side, test_count, seed=seed + 2, **kw))


def _utterance_features(utterances, cache, strict: bool, speeds=(), seed: int = 0):
    """MFCCs of the utterances; with `speeds`, each one is played at a speed drawn
    (seeded) from 1 and those factors."""
    import keras
    import numpy as np

    from apps.speech.data import SkipWarnings
    from apps.speech.features import AudioError

    factors = np.random.default_rng(seed).choice([1.0, *speeds], size=len(utterances))
    out, kept, skips = [], [], SkipWarnings()
    bar = keras.utils.Progbar(len(utterances), unit_name="utterance",
                              verbose=1 if sys.stdout.isatty() else 2)
    for i, u in enumerate(utterances):
        try:
            out.append(cache.wave_features(u.waveform, f"utterance '{u.digits}' ({u.speaker})",
                                           float(factors[i])))
            kept.append(u)
        except AudioError as exc:
            if strict:
                raise
            skips.add(exc)
        bar.update(i + 1)
    skips.summary("utterances", len(utterances))
    if utterances and not kept:
        raise UserError(f"every one of the {len(utterances)} utterances was skipped (the "
                        "warnings above say why)")
    return out, kept


BUCKET = 32  # digits: frames are padded to a multiple of this (a few XLA shapes)


def _bucketed(features, targets, batch_size: int, *, shuffle: bool, seed: int, augment=None):
    """A tf.data pipeline of (padded features, CTC targets), one bucket per batch."""
    import numpy as np
    import tensorflow as tf

    lengths = np.array([len(x) for x in features])
    ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(features), lengths)
    ds = tf.data.Dataset.from_tensor_slices((ragged, targets))
    if shuffle:
        ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    top = int(-(-lengths.max() // BUCKET) * BUCKET)
    boundaries = list(range(BUCKET + 1, top + 2, BUCKET))  # bucket i pads to boundary - 1
    ds = ds.map(lambda x, y: (x.to_tensor() if isinstance(x, tf.RaggedTensor) else x, y))
    ds = ds.bucket_by_sequence_length(
        lambda x, y: tf.shape(x)[0], boundaries, [batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=True)
    # The batch count is known (per bucket, rounded up): tell Keras, so it needs
    # no counting pass and no "ran out of data" guess.
    buckets = np.searchsorted(boundaries, lengths, side="right")
    batches = sum(-(-int(n) // batch_size) for n in np.bincount(buckets) if n)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    if augment is not None:
        # One example after another: parallel iterations would draw their random
        # numbers in a varying order, and --deterministic could not hold.
        ds = ds.map(lambda x, y: (tf.map_fn(lambda e: augment(e, 0)[0], x,
                                            parallel_iterations=1), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def _transcribe(model, features, batch_size: int, beam_width: int) -> list[str]:
    """Digit strings of variable-length features, batch by batch, padded to BUCKET."""
    import numpy as np

    from apps.speech.features import pad_sequences
    from apps.speech.model import decode

    order = np.argsort([len(x) for x in features])
    out: list[str] = [""] * len(features)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        lengths = np.array([len(features[i]) for i in chunk])
        frames = int(-(-lengths.max() // BUCKET) * BUCKET)
        x = pad_sequences([features[i] for i in chunk], frames)
        logits = model(x, training=False)
        strings = decode(logits, lengths, beam_width=beam_width).numpy()
        for i, s in zip(chunk, strings, strict=True):
            out[i] = s.decode()
    return out


def digits_train(args: argparse.Namespace) -> int:
    import keras

    from apps.speech import data
    from apps.speech.features import FEATURES_VERSION, pad_sequences
    from apps.speech.model import (
        DIGITS,
        DigitServing,
        build_ctc_model,
        ctc_loss,
        ctc_targets,
        digit_metrics,
    )
    from common import runs, training
    from common.runs import read_json, write_json

    clips, layout = data.load_clips(args.data)
    feat_cfg = _feature_config(args, layout)
    if args.resume:
        _check_resume_features(args, feat_cfg, "digits")
    speakers = sorted({c.speaker for c in clips if c.label in set(DIGITS)})
    test_speakers = tuple(args.test_speakers) or tuple(speakers[-1:])
    if len(set(speakers) - set(test_speakers)) < 1 or not set(test_speakers) & set(speakers):
        raise UserError(f"digits needs at least one training and one test speaker; speakers: "
                        f"{', '.join(speakers)}; --test-speakers {','.join(test_speakers)}")
    sets = _digit_corpus(clips, test_speakers, args.corpus_seed, args.utterances,
                         args.test_utterances, args.max_digits, feat_cfg.sample_rate, args.strict)
    cache = _cache(args, feat_cfg)
    print(f"digits: building MFCCs of {sum(len(s) for s in sets)} utterances "
          f"(test speakers: {', '.join(test_speakers)})", flush=True)
    # Training utterances only are speed-perturbed (one seeded factor each).
    prepared = [_utterance_features(s, cache, args.strict, args.speed if i == 0 else (),
                                    args.corpus_seed) for i, s in enumerate(sets)]
    keras.utils.set_random_seed(args.seed)
    augment = _augment(args, feat_cfg)
    if not (args.noise or args.gain or args.time_masks * args.time_mask_width
            or args.freq_masks * args.freq_mask_width):
        augment = None  # nothing to perturb: no per-batch map
    datasets = []
    for i, (xs, us) in enumerate(prepared):
        targets = ctc_targets([u.digits for u in us], [len(x) for x in xs], args.max_digits)
        datasets.append(_bucketed(xs, targets, args.batch_size, shuffle=i == 0, seed=args.seed,
                                  augment=augment if i == 0 else None))
    model_cfg = _model_config(args)
    settings = {"layout": layout, "features": feat_cfg.to_dict(),
                "features_version": FEATURES_VERSION, "model": vars(model_cfg),
                "test_speakers": list(test_speakers), "corpus_seed": args.corpus_seed,
                "utterances": args.utterances, "test_utterances": args.test_utterances,
                "max_digits": args.max_digits, "beam_width": args.beam_width,
                "augmentation": {"noise": args.noise, "gain": args.gain, **_masking(args),
                                 "speed": list(args.speed)}}
    test_xs, test_us = prepared[2]
    probe = (prepared[1][0] or prepared[0][0])[:8]  # for the LSTM gate inspection logs
    with runs.open_run(args.run_dir, app=APP, task="digits", resume=args.resume) as run:
        result = training.train(
            run, training.TrainConfig.from_args(args),
            lambda: build_ctc_model(feat_cfg.dim, model_cfg), datasets[0], datasets[1],
            datasets[2], loss=ctc_loss, data_source=str(args.data or data.SAMPLES),
            settings=settings,
            serving=lambda m: DigitServing(m, feat_cfg, args.beam_width),
            serving_sample=_padded_waves([u.waveform for u in test_us]),
            probe_inputs=pad_sequences(probe, max(len(x) for x in probe)))
        predicted = _transcribe(result.model, test_xs, args.batch_size, args.beam_width)
        scores = digit_metrics([u.digits for u in test_us], predicted)
        metrics = read_json(run.metrics)
        metrics["test_transcription"] = {**scores, "beam_width": args.beam_width}
        write_json(run.metrics, metrics)
    print(f"trained: test {_wer_summary(scores)} ({len(test_us)} utterances of "
          f"{', '.join(test_speakers)})")
    return 0


def _wer_summary(scores: dict[str, Any]) -> str:
    """'WER 0.0688 (12 substituted, 20 deleted, 6 inserted of 552 digits), sequence accuracy ...'."""
    return (f"WER {scores['wer']:.4f} ({scores['substitutions']} substituted, "
            f"{scores['deletions']} deleted, {scores['insertions']} inserted of "
            f"{scores['digits']} digits), sequence accuracy {scores['sequence_accuracy']:.4f}")


def digits_evaluate(args: argparse.Namespace) -> int:
    from apps.speech import data
    from apps.speech.model import digit_metrics
    from common import runs

    run = runs.load_run(args.run_dir, app=APP, task="digits")
    settings, feat_cfg = _saved_settings(run)
    model = _load_model(run)
    source = args.data or run.read_config().get("data")
    clips, _ = data.load_clips(source)
    test_speakers = set(settings["test_speakers"])
    if args.data:  # every speaker of the given recordings is test material
        test_speakers = {c.speaker for c in clips}
    test = data.connected_digits([c for c in clips if c.speaker in test_speakers],
                                 settings["test_utterances"],
                                 seed=settings["corpus_seed"] + 2,
                                 sample_rate=feat_cfg.sample_rate,
                                 max_digits=settings["max_digits"], strict=args.strict,
                                 source=f"--data {source}")
    xs, kept = _utterance_features(test, _cache(args, feat_cfg), args.strict)
    truth = [u.digits for u in kept]
    metrics: dict[str, Any] = {}
    for name, width in (("greedy", 0), ("beam", args.beam_width)):
        if name == "beam" and width == 0:
            continue
        scores = digit_metrics(truth, _transcribe(model, xs, args.batch_size, width))
        metrics.update({f"{k}_{name}" if k not in ("utterances", "digits") else k: v
                        for k, v in scores.items()})
    best = "beam" if args.beam_width else "greedy"
    for key in ("wer", "sequence_accuracy", "substitutions", "deletions", "insertions"):
        metrics[key] = metrics[f"{key}_{best}"]
    metrics["test_speakers"] = sorted(test_speakers)
    if args.json:
        print_json(metrics)
    else:
        print(f"{_wer_summary(metrics)} on {metrics['utterances']} utterances of "
              f"{', '.join(sorted(test_speakers))}")
    return 0


def digits_predict(args: argparse.Namespace) -> int:
    from common import runs

    run = runs.load_run(args.run_dir, app=APP, task="digits")
    _, feat_cfg = _saved_settings(run)
    features, names, _, bad = _read_files(args.files, feat_cfg)
    model = _load_model(run)
    for name, digits in zip(names, _transcribe(model, features, 16, args.beam_width), strict=True):
        print(f"{name}\t{digits}")
    return 2 if bad else 0


def digits_export(args: argparse.Namespace) -> int:
    from apps.speech.model import DigitServing
    from common import runs
    from common.export import export_saved_model

    run = runs.load_run(args.run_dir, app=APP, task="digits")
    _, feat_cfg = _saved_settings(run)
    model = _load_model(run)
    out = export_saved_model(DigitServing(model, feat_cfg, args.beam_width),
                             runs.export_path(run, args.out), _synthetic_waves(feat_cfg.sample_rate))
    print(f"exported {out}")
    return 0


def digits_ensemble(args: argparse.Namespace) -> int:
    from apps.speech.model import DigitServing
    from common import ensemble
    from common.export import export_saved_model

    members = ensemble.load_members(args.members, app=APP, task="digits", run_dir=args.run_dir)
    ensemble.check_shared(
        members, ("features", "features_version", "test_speakers", "corpus_seed",
                  "test_utterances", "max_digits"),
        "members must be trained on the same data, features, --test-speakers, --corpus-seed, "
        "--test-utterances and --max-digits", canonical=_CANONICAL)
    settings, feat_cfg = _saved_settings(members[0])
    # The members' logits side by side: `model.decode` combines their decodings.
    model = ensemble.stack_models([_load_model(m) for m in members],
                                  name="speech_digits_ensemble")
    ensemble.write_ensemble_run(
        args.run_dir, app=APP, task="digits", members=members, model=model,
        settings={**settings, "beam_width": args.beam_width},
        export=lambda model, path: export_saved_model(
            DigitServing(model, feat_cfg, args.beam_width), path,
            _synthetic_waves(feat_cfg.sample_rate)),
        test_metrics="test_transcription", headline="wer")
    return 0


HANDLERS = {
    ("words", "train"): words_train, ("words", "evaluate"): words_evaluate,
    ("words", "predict"): words_predict, ("words", "export"): words_export,
    ("words", "ensemble"): words_ensemble,
    ("digits", "train"): digits_train, ("digits", "evaluate"): digits_evaluate,
    ("digits", "predict"): digits_predict, ("digits", "export"): digits_export,
    ("digits", "ensemble"): digits_ensemble,
}


def handle(args: argparse.Namespace) -> int:
    return HANDLERS[args.task, args.command](args)


def main(argv: list[str] | None = None) -> int:
    return run_main(make_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
