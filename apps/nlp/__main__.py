"""lstm-nlp: character-level text generation and sentiment classification.

    python -m apps.nlp textgen train --run-dir runs/shakespeare [--data input.txt]
    python -m apps.nlp textgen evaluate --run-dir runs/shakespeare --json
    python -m apps.nlp textgen generate --run-dir runs/shakespeare --prime "ROMEO:" --length 300
    python -m apps.nlp sentiment train --run-dir runs/reviews [--data reviews.csv]
    python -m apps.nlp sentiment predict --run-dir runs/reviews "a wonderful film"

Data loading and every check on the input happen before TensorFlow is imported
and before the run directory is opened, so bad input fails fast and never
touches an existing run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from common.cli import (
    add_members_flag,
    build_parser,
    dropout_rate,
    non_negative_float,
    non_negative_int,
    positive_int,
    print_json,
    run_main,
)
from common.errors import UserError

APP = "nlp"

TEXTGEN_DATA_HELP = ("a UTF-8 text file (see --encoding), or tfds:tiny_shakespeare; default: "
                     "the bundled Shakespeare excerpt")
# The sentiment model's shape when neither a flag nor --init-from gives it.
SENTIMENT_SHAPE = {"max_tokens": 20000, "embedding_dim": 64, "units": 64, "layers": 1,
                   "pooling": "last"}
SENTIMENT_DATA_HELP = ("a CSV (see --text-col/--label-col), a folder or file of the Pang & Lee "
                       "rt-polarity.pos/.neg pair, or tfds:imdb_reviews; default: the bundled "
                       "sample CSV")


def top_p_value(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def vocabulary_size(text: str) -> int:
    value = int(text)
    if value < 3:  # the padding id, [UNK] and at least one word
        raise argparse.ArgumentTypeError(f"must be >= 3 (padding, [UNK] and at least one "
                                         f"word), got {text}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {text}")
    return value


def _set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


# textgen model and optimiser defaults by time budget: what reached the 5- and
# 60-minute Tiny Shakespeare targets on 2 CPU cores (docs/nlp.md, Quality).
TEXTGEN_PRESETS: dict[str, dict[str, Any]] = {
    "small": {"units": 256, "layers": 1, "dropout": 0.0, "learning_rate": 3e-3,
              "lr_schedule": "constant"},
    "large": {"units": 512, "layers": 2, "dropout": 0.25, "learning_rate": 2e-3,
              "lr_schedule": "cosine"},
}
LARGE_FROM_MINUTES = 30.0


def _preset_flags(name: str) -> str:
    return " ".join(f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                    else f"--{key.replace('_', '-')} {value}"
                    for key, value in TEXTGEN_PRESETS[name].items())


def resolve_textgen_preset(args: argparse.Namespace, trained: dict[str, Any] | None = None
                           ) -> str:
    """Fill the textgen flags left unset; returns where their values came from.

    `trained`: the values of the run being resumed (`--resume` with
    `--preset auto`): a resumed run goes on as it was trained, whatever its
    new `--max-minutes`. Otherwise `--preset` (auto: by `--max-minutes`).
    """
    name = args.preset
    if name == "auto" and trained:
        source = dict(trained)
        name = "as trained"
    else:
        if name == "auto":
            budget = args.max_minutes
            name = "large" if budget is not None and budget >= LARGE_FROM_MINUTES else "small"
        source = TEXTGEN_PRESETS[name]
    for key in TEXTGEN_PRESETS["small"]:
        if getattr(args, key) is None:
            setattr(args, key, source.get(key, TEXTGEN_PRESETS["small"][key]))
    return name


def _trained_textgen_choices(run_dir: str) -> dict[str, Any]:
    """The preset-controlled values a textgen run was trained with ({} for no run yet)."""
    from common import runs

    config = runs.stored_config(run_dir, app=APP, task="textgen") or {}
    model, training = config.get("app_settings") or {}, config.get("training") or {}
    choices = {key: model[key] for key in ("units", "layers", "dropout") if key in model}
    choices |= {key: training[key] for key in ("learning_rate", "lr_schedule")
                if key in training}
    return choices


def make_parser() -> argparse.ArgumentParser:
    parser, commands = build_parser(
        "lstm-nlp", "Character-level text generation and sentiment classification with LSTMs.",
        {"textgen": "learn a text character by character and generate more of it",
         "sentiment": "classify short texts as positive or negative"},
        predict_command={"textgen": "generate", "sentiment": "predict"},
        train_defaults={"textgen": {"epochs": 200, "batch_size": 64},
                        "sentiment": {"epochs": 6, "batch_size": 64}},
        extra_commands={"sentiment": {"ensemble": "combine trained runs into one run whose "
                                                  "probability is the mean of theirs"}})

    # -- textgen
    for command in ("train", "evaluate"):
        sub = commands["textgen", command]
        sub.add_argument("--encoding", default="utf-8",
                         help="text encoding of --data files (e.g. cp1252, latin-1)")
    _set_help(commands["textgen", "train"], "data", TEXTGEN_DATA_HELP)
    _set_help(commands["textgen", "evaluate"], "data",
              "text to evaluate on (all of it); default: the validation split (last 10%%) of "
              "the training data")
    train = commands["textgen", "train"]
    train.add_argument("--seq-len", type=positive_int, default=100,
                       help="characters per training window (backpropagation through time)")
    train.add_argument("--embedding-dim", type=positive_int, default=64,
                       help="size of the character embedding")
    train.add_argument("--preset", choices=("auto", *TEXTGEN_PRESETS), default="auto",
                       help="defaults of --units, --layers, --dropout, --learning-rate and "
                            "--lr-schedule, by time budget: small = "
                            + _preset_flags("small") + " (best in a few minutes); large = "
                            + _preset_flags("large") + " (best given an hour); auto = large "
                            f"when --max-minutes is {LARGE_FROM_MINUTES:g} or more, else small. "
                            "A flag given explicitly wins")
    train.add_argument("--units", type=positive_int, default=None,
                       help="units per LSTM layer (default: from --preset)")
    train.add_argument("--layers", type=positive_int, default=None,
                       help="number of stacked LSTMs (default: from --preset)")
    train.add_argument("--dropout", type=dropout_rate, default=None,
                       help="dropout after each LSTM layer (default: from --preset)")
    # The optimiser flags come from common.cli; their textgen defaults come from --preset.
    train.set_defaults(learning_rate=None, lr_schedule=None)
    _set_help(train, "learning_rate", "peak learning rate of the Adam optimizer (default: "
              "from --preset)")
    _set_help(train, "lr_schedule", "learning-rate schedule: constant, or cosine decay to 0 by "
              "the end of the run (the last epoch, or --max-minutes if that comes first) "
              "(default: from --preset)")
    train.add_argument("--steps-per-epoch", type=non_negative_int, default=50,
                       help="batches per epoch (random windows, reshuffled every epoch), so "
                            "validation, checkpoints, samples and --max-minutes act often on "
                            "big texts; 0 or more than one pass: one pass over the text; "
                            "--stateful always makes one pass")
    train.add_argument("--stateful", action="store_true",
                       help="char-rnn style: the text is cut into --batch-size contiguous "
                            "streams and the LSTM state is carried from batch to batch")
    train.add_argument("--sample-length", type=non_negative_int, default=300,
                       help="characters of the sample written to TensorBoard after each epoch "
                            "(0: none)")
    gen = commands["textgen", "generate"]
    gen.add_argument("--prime", default=None,
                     help="text to start from (the model reads it first); default: a newline")
    gen.add_argument("--length", type=non_negative_int, default=500,
                     help="number of characters to generate")
    gen.add_argument("--temperature", type=non_negative_float, default=0.8,
                     help="sampling temperature; 0 = always the most likely character")
    gen.add_argument("--top-k", type=non_negative_int, default=0,
                     help="sample only among the K most likely characters (0: all)")
    gen.add_argument("--top-p", type=top_p_value, default=1.0,
                     help="nucleus sampling: the smallest set of characters with this much "
                          "probability (1.0: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")

    # -- sentiment
    for command in ("train", "evaluate", "predict"):
        sub = commands["sentiment", command]
        sub.add_argument("--encoding", default=None,
                         help="encoding of the files; default: utf-8 for CSV and text files, "
                              "cp1252 for rt-polarity files")
    for command in ("train", "evaluate"):
        sub = commands["sentiment", command]
        sub.add_argument("--text-col", default="review", help="CSV column holding the text")
        sub.add_argument("--label-col", default="sentiment", help="CSV column holding the label")
        sub.add_argument("--positive-label", default=None,
                         help="the label value meaning positive when it is not one of "
                              "positive/pos/1/true/yes")
    _set_help(commands["sentiment", "train"], "data", SENTIMENT_DATA_HELP)
    _set_help(commands["sentiment", "evaluate"], "data",
              "labelled data to evaluate on (all of it; same formats as train); default: the "
              "test split of the training data")
    train = commands["sentiment", "train"]
    train.add_argument("--split-seed", type=non_negative_int, default=None, metavar="N",
                       help="seed of the train/validation/test split and of --cv's folds; "
                            "default: --seed. Runs that differ only in --seed then start "
                            "from other weights on the same examples (e.g. the members of "
                            "`sentiment ensemble`, or a seed-to-seed spread)")
    train.add_argument("--max-tokens", type=vocabulary_size, default=None,
                       help="vocabulary size (most frequent words of the training split); "
                            f"default {SENTIMENT_SHAPE['max_tokens']}")
    train.add_argument("--max-len", type=positive_int, default=256,
                       help="words per text: longer texts are cut, shorter ones padded")
    train.add_argument("--embedding-dim", type=positive_int, default=None,
                       help=f"size of the word embedding; default: {SENTIMENT_SHAPE['embedding_dim']}"
                            ", or the dimension of --embeddings")
    train.add_argument("--embeddings", metavar="PATH", default=None,
                       help="initialise the embedding with pre-trained word vectors: a "
                            "GloVe/word2vec text file (`word v1 ... vD` per line, optional "
                            "`count D` header); build one with `python -m apps.nlp.embeddings "
                            "build`; words without a vector start random")
    train.add_argument("--freeze-embeddings", action="store_true",
                       help="keep the --embeddings vectors fixed (default: fine-tune them)")
    train.add_argument("--embeddings-vocabulary", type=non_negative_int, default=0, metavar="N",
                       help="also put the N commonest words of the --embeddings file in the "
                            "vocabulary (files list words by frequency), so that words the "
                            "labelled training text lacks still get their pre-trained vector "
                            "when the model reads them; best with --freeze-embeddings; "
                            "default 0: the training text's words only")
    train.add_argument("--units", type=positive_int, default=None,
                       help="units per direction of each bidirectional LSTM; default "
                            f"{SENTIMENT_SHAPE['units']}")
    train.add_argument("--layers", type=positive_int, default=None,
                       help="number of stacked bidirectional LSTMs; default "
                            f"{SENTIMENT_SHAPE['layers']}")
    train.add_argument("--dropout", type=dropout_rate, default=0.3,
                       help="dropout after each LSTM layer")
    train.add_argument("--embedding-dropout", type=dropout_rate, default=0.0,
                       help="dropout on the word vectors, before the first LSTM")
    train.add_argument("--pooling", choices=("last", "max"), default=None,
                       help="what the classifier sees of the last LSTM layer: its final "
                            "states, or the max over time of all its states; default "
                            f"{SENTIMENT_SHAPE['pooling']}")
    train.add_argument("--init-from", metavar="RUN", default=None,
                       help="fine-tune: start from an earlier sentiment run's vocabulary and "
                            "weights (embedding, LSTMs, output), e.g. a model trained on a "
                            "larger review corpus; the model's shape (--max-tokens, "
                            "--embedding-dim, --units, --layers, --pooling) comes from RUN, "
                            "while --max-len, the dropouts and the optimiser flags apply")
    train.add_argument("--cv", type=at_least_two, default=None, metavar="K",
                       help="K-fold cross-validation instead of one run: trains K models and "
                            "writes per-fold test metrics and the mean and std of accuracy to "
                            "RUN/cv.json and every example's out-of-fold probability to "
                            "RUN/cv_predictions.csv")
    add_members_flag(
        commands["sentiment", "ensemble"],
        "sentiment run directories (not --cv runs) with the same --data, split seed "
        "(--split-seed, or --seed without it) and loader flags, so they share the test split; "
        "they may differ in anything else (vocabulary, vectors, --init-from, shape)")
    predict = commands["sentiment", "predict"]
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--file", metavar="PATH",
                         help="classify every non-empty line of this file")
    predict.add_argument("--json", action="store_true",
                         help="print the results as one JSON object on the last line")
    return parser


# -- textgen ---------------------------------------------------------------------


def _check_prime(prime: str | None, vocabulary: str | list[str]) -> None:
    """Refuse a --prime the model cannot read at all; warn about its unknown characters."""
    if not prime or not vocabulary:
        return
    unknown = sorted(set(prime) - set(vocabulary))
    shown = "".join(unknown[:10]) + ("..." if len(unknown) > 10 else "")
    if len(unknown) == len(set(prime)):
        raise UserError(f"--prime {prime!r}: none of its characters is in the model's "
                        f"vocabulary (the {len(vocabulary)} characters of its training text); "
                        "prime it with text like the training text")
    if unknown:
        print(f"warning: --prime: {len(unknown)} character(s) not in the model's vocabulary "
              f"are read as unknown: {shown!r}", file=sys.stderr)


def textgen_handle(args: argparse.Namespace) -> int:
    from apps.nlp import data as nlp_data
    from common import runs

    if args.command == "train":
        return textgen_train(args)
    run = runs.load_run(args.run_dir, app=APP, task="textgen")
    settings = run.app_settings()
    if args.command == "evaluate":
        if args.data is not None:
            text = nlp_data.load_text(args.data, args.encoding)
            what = f"--data {args.data}"
        else:
            full = nlp_data.load_text(settings.get("data"), settings.get("encoding", "utf-8"))
            text = nlp_data.split_text(full)[1]
            what = "the validation split"
        from apps.nlp import textgen

        model = run.load_model()
        config = textgen_config(settings)
        ds = textgen.make_dataset(text, config, what)
        for layer in model.layers:  # a stateful model starts from a zero state
            if getattr(layer, "stateful", False):
                layer.reset_states()
        results = model.evaluate(ds, verbose=0, return_dict=True)
        batch_shape = ds.element_spec[1].shape
        metrics = {"loss_nats_per_char": float(results["loss"]),
                   "bits_per_char": float(results["loss"]) / textgen.LN2,
                   "characters": int(ds.cardinality()) * batch_shape[0] * batch_shape[1],
                   "data": what}
        if args.json:
            print_json(metrics)
        else:
            print(f"{what}: {metrics['loss_nats_per_char']:.4f} nats/char, "
                  f"{metrics['bits_per_char']:.4f} bits/char")
    elif args.command == "generate":
        _check_prime(args.prime, settings.get("vocabulary") or "")
        import tensorflow as tf

        from apps.nlp import textgen

        generator = textgen.Generator(run.load_model(compile=False))
        out = generator.sample(tf.constant(args.prime or ""), tf.constant(args.length),
                               tf.constant(args.temperature), tf.constant(args.top_k),
                               tf.constant(args.top_p), tf.constant(args.seed, tf.int64))
        print(out["text"].numpy().decode("utf-8"))
    elif args.command == "export":
        from apps.nlp import textgen
        from common.export import export_saved_model

        generator = textgen.Generator(run.load_model(compile=False))
        out = export_saved_model(generator, runs.export_path(run, args.out),
                                 textgen.serving_sample(list(settings["vocabulary"])))
        print(f"exported {out}")
    return 0


def textgen_config(settings: dict):
    from apps.nlp.textgen import TextgenConfig

    keys = TextgenConfig.__dataclass_fields__
    return TextgenConfig(**{k: (tuple(v) if k == "vocabulary" else v)
                            for k, v in settings.items() if k in keys})


def textgen_train(args: argparse.Namespace) -> int:
    from apps.nlp import data as nlp_data

    preset = resolve_textgen_preset(
        args, _trained_textgen_choices(args.run_dir) if args.resume else None)
    shown = preset if preset == "as trained" else f"preset {preset}" + (
        " (auto)" if args.preset == "auto" else "")
    print(f"model: {shown}: "
          f"{args.layers} x LSTM({args.units}), dropout {args.dropout:g}, Adam "
          f"{args.learning_rate:g} ({args.lr_schedule})", flush=True)

    text = nlp_data.load_text(args.data, args.encoding)
    train_text, val_text = nlp_data.split_text(text)
    vocabulary = nlp_data.build_vocabulary(train_text)
    # Checked before TensorFlow loads: too little text fails in a second.
    for part, what in ((train_text, "the training split (first 90%)"),
                       (val_text, "the validation split (last 10%)")):
        ids = nlp_data.encode(part, vocabulary)
        if args.stateful:
            nlp_data.make_streams(ids, args.seq_len, args.batch_size, f"--data: {what}")
        else:
            nlp_data.make_windows(ids, args.seq_len, f"--data: {what}")

    from apps.nlp import textgen
    from common import runs, training

    config = textgen.TextgenConfig(
        vocabulary=tuple(vocabulary), seq_len=args.seq_len, embedding_dim=args.embedding_dim,
        units=args.units, layers=args.layers, dropout=args.dropout, stateful=args.stateful,
        batch_size=args.batch_size)
    train_ds = textgen.make_dataset(train_text, config, "the training split", shuffle=True,
                                    seed=args.seed)
    if args.steps_per_epoch and not args.stateful:
        # take() restarts the (reshuffled) dataset each epoch: a fresh random sample.
        train_ds = train_ds.take(args.steps_per_epoch)
    val_ds = textgen.make_dataset(val_text, config, "the validation split")
    settings = {**config.to_json(), "data": args.data, "encoding": args.encoding,
                "steps_per_epoch": args.steps_per_epoch,
                "characters": {"train": len(train_text), "validation": len(val_text)}}
    with runs.open_run(args.run_dir, app=APP, task="textgen", resume=args.resume) as run:
        callbacks = []
        if args.stateful:
            callbacks.append(textgen.ResetStates())
        if args.sample_length:
            callbacks.append(textgen.TextSamples(str(run.logs / "samples"), prime=val_text[:40],
                                                 length=args.sample_length))
        probe = next(iter(val_ds))[0][:4] if not args.stateful else None
        result = training.train(
            run, training.TrainConfig.from_args(args), lambda: textgen.build_model(config),
            train_ds, val_ds, None, loss=textgen.loss_fn(), metrics=[textgen.bits_per_char],
            data_source=args.data or str(nlp_data.SHAKESPEARE_SAMPLE), settings=settings,
            serving=textgen.Generator, serving_sample=textgen.serving_sample(vocabulary),
            probe_inputs=probe, extra_callbacks=callbacks)
    val = result.metrics["validation"]
    print(f"validation: {val['loss']:.4f} nats/char, {val['loss'] / textgen.LN2:.4f} bits/char "
          f"after {result.metrics['epochs_completed']} epochs ({result.metrics['stopped']})")
    return 0


# -- sentiment -------------------------------------------------------------------


def load_sentiment_splits(args: argparse.Namespace, data: str | None, seed: int):
    """(train, validation, test) `Labelled` splits of --data."""
    import numpy as np

    from apps.nlp import data as nlp_data

    name = nlp_data.tfds_name(data)
    if name is not None:
        x, y, tx, ty = nlp_data.load_tfds_reviews(name)
        # TFDS has its own test split; 10% of its training split validates.
        order = np.random.default_rng(seed).permutation(len(x))
        cut = max(1, len(x) // 10)
        full = nlp_data.Labelled(x, y)
        return full.take(order[cut:]), full.take(order[:cut]), nlp_data.Labelled(tx, ty)
    full = nlp_data.load_labelled(data, text_col=args.text_col, label_col=args.label_col,
                                  encoding=args.encoding, positive_label=args.positive_label)
    return nlp_data.split_labelled(full, seed)


def sentiment_handle(args: argparse.Namespace) -> int:
    from apps.nlp import data as nlp_data
    from common import runs

    if args.command == "train":
        return sentiment_cv(args) if args.cv else sentiment_train(args)
    if args.command == "ensemble":
        return sentiment_ensemble(args)
    run = runs.load_run(args.run_dir, app=APP, task="sentiment")
    settings = run.app_settings()
    if args.command == "evaluate":
        if args.data is not None:
            name = nlp_data.tfds_name(args.data)
            if name is not None:
                _, _, tx, ty = nlp_data.load_tfds_reviews(name)
                test = nlp_data.Labelled(tx, ty)
            else:
                test = nlp_data.load_labelled(args.data, text_col=args.text_col,
                                              label_col=args.label_col, encoding=args.encoding,
                                              positive_label=args.positive_label)
        else:
            saved = argparse.Namespace(**settings["loader"])
            splits = load_sentiment_splits(saved, settings["data"], settings["split_seed"])
            test = splits[2]
            # The split is redrawn from the data: if the file (or how it is read)
            # changed since training, former training rows could be scored as test.
            sizes = {"train": len(splits[0]), "validation": len(splits[1]), "test": len(test)}
            trained = settings.get("examples")
            if trained and trained != sizes:
                raise UserError(f"--run-dir {run.root}: its data {settings['data']} now gives "
                                f"{sizes} examples, not the {trained} it was trained on (the "
                                "file changed, or rows are now skipped), so the test split "
                                "cannot be rebuilt; pass --data to score a file as a whole")
        from apps.nlp import sentiment

        model = run.load_model(compile=False)
        probs = sentiment.predict_texts(model, test.texts, args.batch_size)
        metrics = sentiment.classification_metrics(test.labels, probs)
        if args.json:
            print_json(metrics)
        else:
            cm = metrics["confusion_matrix"]
            auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}"
            print(f"accuracy {metrics['accuracy']:.4f}  roc_auc {auc}  f1 {metrics['f1']:.4f}  "
                  f"precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  "
                  f"({metrics['examples']} examples)")
            print("confusion matrix (rows: true negative/positive, columns: predicted)")
            print(f"  {cm[0][0]:6d} {cm[0][1]:6d}\n  {cm[1][0]:6d} {cm[1][1]:6d}")
    elif args.command == "predict":
        texts = list(args.texts)
        blank = [i for i, text in enumerate(texts, 1) if not text.strip()]
        if blank:  # a model scores "" too (about 0.5), which would look like an answer
            raise UserError(f"text {blank[0]} of the arguments is empty; give the texts to "
                            "classify, or --file PATH")
        if args.file:
            raw = nlp_data.read_bytes(args.file, "--file")
            text = nlp_data.decode(raw, args.encoding or "utf-8", f"--file {args.file}")
            # Split on "\n" only: U+0085 (byte 0x85 in latin-1) is not a line break here.
            texts += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        if not texts:
            raise UserError("nothing to classify: give texts as arguments or --file PATH")
        from apps.nlp import sentiment

        model = run.load_model(compile=False)
        probs = sentiment.predict_texts(model, texts)
        if args.json:
            print_json({"probability": [float(p) for p in probs],
                        "label": ["positive" if p >= 0.5 else "negative" for p in probs]})
        else:
            for text, p in zip(texts, probs, strict=True):
                label = "positive" if p >= 0.5 else "negative"
                print(f"{p:.3f}\t{label}\t{text}")
    elif args.command == "export":
        from apps.nlp import sentiment
        from common.export import export_saved_model

        out = export_saved_model(sentiment.Serving(run.load_model(compile=False)),
                                 runs.export_path(run, args.out), sentiment.serving_sample())
        print(f"exported {out}")
    return 0


def load_word_vectors(args: argparse.Namespace, texts: list[str]):
    """The --embeddings vectors of the words of `texts`, or None without --embeddings.

    Runs before TensorFlow is imported and before the run directory is opened,
    so a bad vectors file fails fast. Sets args.embedding_dim to the file's
    dimension (and rejects an explicit --embedding-dim that differs), and
    args.extra_words to the --embeddings-vocabulary words `_sentiment_config` adds.
    """
    from apps.nlp import embeddings

    if args.embeddings is None:
        if args.embeddings_vocabulary:
            raise UserError("--embeddings-vocabulary needs --embeddings PATH")
        if args.freeze_embeddings and args.init_from is None:
            raise UserError("--freeze-embeddings needs --embeddings PATH or --init-from RUN")
        args.embedding_dim = args.embedding_dim or SENTIMENT_SHAPE["embedding_dim"]
        args.extra_words = ()
        return None
    # The file's own commonest words join the vocabulary, with their vectors.
    words = {w for text in texts for w in embeddings.tokenize(text)}
    vectors, dim, args.extra_words = embeddings.read_vectors(
        args.embeddings, words, leading=args.embeddings_vocabulary)
    words |= set(args.extra_words)
    if args.embedding_dim not in (None, dim):
        raise UserError(f"--embedding-dim {args.embedding_dim}: the vectors in --embeddings "
                        f"{args.embeddings} have dimension {dim}; drop --embedding-dim or "
                        "make them match")
    args.embedding_dim = dim
    print(f"--embeddings: vectors for {len(vectors)} of the {len(words)} words of the data "
          f"(dimension {dim})", flush=True)
    return vectors


def resolve_model_shape(args: argparse.Namespace):
    """Fill in the model-shape flags; with --init-from, from that run.

    Returns the run to start from (its `RunDir`), or None. Reads only its
    config.json, so a wrong --init-from fails before TensorFlow is imported. A
    shape flag that disagrees with the run, --max-tokens (the vocabulary is the
    run's) and --embeddings/--embeddings-vocabulary (so are the word vectors)
    are refused.
    """
    from common import runs

    if args.init_from is None:
        for key, value in SENTIMENT_SHAPE.items():
            if key != "embedding_dim" and getattr(args, key) is None:
                setattr(args, key, value)  # embedding_dim: see load_word_vectors
        return None
    source = runs.load_run(args.init_from, app=APP, task="sentiment", flag="--init-from")
    args.init_from = str(source.root)  # as recorded in config.json / cv.json
    if (source.root / "cv.json").exists():
        raise UserError(f"--init-from {source.root}: a --cv run keeps no model; pass a run "
                        "trained without --cv")
    # Runs from before --pooling existed pooled the final states.
    settings = {"pooling": "last", **source.app_settings("embedding_dim", "units", "layers")}
    if "ensemble_members" in settings:
        raise UserError(f"--init-from {source.root}: an ensemble has no single vocabulary and "
                        "weights to start from; pass one of its members")
    for flag, given in (("--max-tokens", args.max_tokens), ("--embeddings", args.embeddings),
                        ("--embeddings-vocabulary", args.embeddings_vocabulary or None)):
        if given is not None:
            raise UserError(f"{flag}: the vocabulary and word vectors come from --init-from "
                            f"{source.root}; drop {flag}")
    for key in ("embedding_dim", "units", "layers", "pooling"):
        given = getattr(args, key)
        if given is not None and given != settings[key]:
            raise UserError(f"--{key.replace('_', '-')} {given}: --init-from {source.root} has "
                            f"{settings[key]}; the model's shape comes from that run, so drop "
                            "the flag")
        setattr(args, key, settings[key])
    return source


def load_pretrained(source):
    """(vocabulary, weights by layer name) of the --init-from run, or None."""
    if source is None:
        return None
    from apps.nlp import sentiment

    vocabulary, weights = sentiment.pretrained_parts(source.load_model(compile=False))
    print(f"--init-from: {len(vocabulary)} words and the weights of {source.root}", flush=True)
    return vocabulary, weights


def _sentiment_config(args, texts, pretrained=None):
    from apps.nlp import sentiment

    if pretrained is not None:
        vocabulary, known = pretrained[0], set(pretrained[0])
    else:
        vocabulary = sentiment.adapt_vocabulary(texts, args.max_tokens)
        known = set(vocabulary)
        vocabulary += tuple(w for w in args.extra_words if w not in known)
    return sentiment.SentimentConfig(
        vocabulary=vocabulary, max_len=args.max_len,
        embedding_dim=args.embedding_dim, units=args.units, layers=args.layers,
        dropout=args.dropout, embedding_dropout=args.embedding_dropout, pooling=args.pooling,
        embeddings=args.embeddings, freeze_embeddings=args.freeze_embeddings,
        embeddings_vocabulary=len(vocabulary) - len(known),
        init_from=args.init_from)


def _build_sentiment_model(config, vectors, pretrained, seed: int):
    """A new model: random, from --embeddings vectors, or from the --init-from run."""
    from apps.nlp import sentiment

    if vectors is None:
        matrix = None
    else:
        from apps.nlp import embeddings

        matrix = embeddings.embedding_matrix(config.vocabulary, vectors, config.embedding_dim,
                                             seed)
    model = sentiment.build_model(config, matrix)
    if pretrained is not None:
        sentiment.set_pretrained_weights(model, pretrained[1])
    return model


def _loader_settings(args) -> dict:
    return {"text_col": args.text_col, "label_col": args.label_col, "encoding": args.encoding,
            "positive_label": args.positive_label}


def _split_seed(args: argparse.Namespace) -> int:
    return args.seed if args.split_seed is None else args.split_seed


def sentiment_train(args: argparse.Namespace) -> int:
    source = resolve_model_shape(args)
    split_seed = _split_seed(args)
    train, val, test = load_sentiment_splits(args, args.data, split_seed)
    vectors = load_word_vectors(args, train.texts)
    if args.resume:
        from common import runs

        for name in ("cv_progress.json", "cv.json"):
            if (Path(args.run_dir) / name).exists():
                raise UserError(f"--resume: {Path(args.run_dir) / name}: this is a --cv run; "
                                "resume it with the same --cv flags")
        runs.check_resume_settings(args.run_dir, {
            "split_seed": split_seed,
            **{key: getattr(args, key)
               for key in ("init_from", "embedding_dim", "units", "layers", "pooling")}},
            app=APP, task="sentiment")
    pretrained = load_pretrained(source)

    import keras
    import tensorflow as tf

    from apps.nlp import sentiment
    from common import runs, training

    config = _sentiment_config(args, train.texts, pretrained)
    settings = {**config.to_json(), "data": args.data, "split_seed": split_seed,
                "loader": _loader_settings(args),
                "examples": {"train": len(train), "validation": len(val), "test": len(test)}}
    as_xy = lambda part: (sentiment.as_inputs(part.texts), part.labels.astype("float32"))  # noqa
    with runs.open_run(args.run_dir, app=APP, task="sentiment", resume=args.resume) as run:
        result = training.train(
            run, training.TrainConfig.from_args(args),
            lambda: _build_sentiment_model(config, vectors, pretrained, args.seed),
            as_xy(train), as_xy(val), as_xy(test), loss="binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
            data_source=args.data or str(nlp_data_sample()), settings=settings,
            serving=sentiment.Serving, serving_sample=tf.constant(test.texts[:4]),
            probe_inputs=sentiment.as_inputs((val.texts if len(val) else train.texts)[:16]))
        probs = sentiment.predict_texts(result.model, test.texts)
        metrics = {**result.metrics,
                   "test_classification": sentiment.classification_metrics(test.labels, probs)}
        runs.write_json(run.metrics, metrics)
    cls = metrics["test_classification"]
    print(f"test: accuracy {cls['accuracy']:.4f}, roc_auc {cls['roc_auc']}, f1 {cls['f1']:.4f} "
          f"({len(test)} examples)")
    return 0


def sentiment_ensemble(args: argparse.Namespace) -> int:
    from apps.nlp import sentiment
    from common import ensemble
    from common.export import export_saved_model

    members = ensemble.load_members(args.members, app=APP, task="sentiment",
                                    run_dir=args.run_dir)
    ensemble.check_shared(members, ("split_seed", "loader"),
                          "members must be trained on the same --data, split seed "
                          "(--split-seed, or --seed without it) and loader flags")
    model = ensemble.average_models([m.load_model(compile=False) for m in members],
                                    name="sentiment_ensemble")
    ensemble.write_ensemble_run(
        args.run_dir, app=APP, task="sentiment", members=members, model=model,
        settings=members[0].app_settings(),
        export=lambda model, path: export_saved_model(sentiment.Serving(model), path,
                                                      sentiment.serving_sample()))
    return 0


def nlp_data_sample() -> Path:
    from apps.nlp.data import SENTIMENT_SAMPLE

    return SENTIMENT_SAMPLE


def sentiment_cv(args: argparse.Namespace) -> int:
    """K-fold cross-validation: fold k tests a model trained on the other folds."""
    from apps.nlp import data as nlp_data

    if nlp_data.tfds_name(args.data):
        raise UserError("--cv: use a local file (TFDS datasets come with their own test split)")
    # Each fold trains to --epochs/--patience in this one process.
    if args.max_minutes is not None:
        raise UserError("--cv trains K models and has no time budget; drop --max-minutes "
                        "(--epochs and --patience bound each fold)")
    if args.strategy == "multiworker":
        raise UserError("--cv runs in one process; use --strategy default or mirrored")
    source = resolve_model_shape(args)
    full = nlp_data.load_labelled(args.data, text_col=args.text_col, label_col=args.label_col,
                                  encoding=args.encoding, positive_label=args.positive_label)
    if len(full) < 2 * args.cv:
        raise UserError(f"--cv {args.cv}: the data has only {len(full)} examples")
    split_seed = _split_seed(args)
    parts = nlp_data.folds(len(full), args.cv, split_seed)
    # The vectors of every word of the data (each fold keeps those of its vocabulary).
    vectors = load_word_vectors(args, full.texts)
    pretrained = load_pretrained(source)

    import keras
    import numpy as np

    from apps.nlp import sentiment
    from common import runs, training

    config = training.TrainConfig.from_args(args)
    settings = {k: v for k, v in vars(args).items()
                if isinstance(v, (int, float, str, bool, type(None)))
                and k not in ("resume", "debug")}
    # What a --resume must find unchanged: the settings that shape the folds'
    # models, and the contents of every input (the data, word vectors, source run).
    # Not compared: where and how the command runs, and how the data was read
    # (the digest of the texts and labels covers that).
    not_compared = ("run_dir", "data", "text_col", "label_col", "encoding", "positive_label",
                    "strategy", "deterministic", "split_seed", "embeddings", "init_from")
    fixed = {"settings": {k: v for k, v in settings.items() if k not in not_compared},
             "split_seed": split_seed,
             "data_digest": _digest_of_texts(full.texts, full.labels),
             "embeddings_digest": _file_digest(args.embeddings),
             "init_from_digest": _file_digest(source and source.model)}
    with runs.open_run(args.run_dir, app=APP, task="sentiment", resume=args.resume) as run:
        progress = run.root / "cv_progress.json"
        done = _cv_folds_done(run, fixed) if args.resume else []
        results = [fold["metrics"] for fold in done]
        # (index in the data, fold, label, probability): each example once
        predictions = [tuple(row) for fold in done for row in fold["predictions"]]
        for k, test_idx in enumerate(parts):
            if k < len(done):
                print(f"fold {k + 1}/{args.cv}: accuracy {results[k]['accuracy']:.4f} "
                      "(done before --resume)", flush=True)
                continue
            rest = np.setdiff1d(np.arange(len(full)), test_idx)
            # 10% of the training folds pick the best epoch; the test fold stays unseen.
            rest = np.random.default_rng(split_seed + k).permutation(rest)
            cut = max(1, len(rest) // 10)
            train, val, test = full.take(rest[cut:]), full.take(rest[:cut]), full.take(test_idx)
            training.set_seed(args.seed + k)
            keras.backend.clear_session()
            model_config = _sentiment_config(args, train.texts, pretrained)
            train_ds = training.as_dataset(
                (sentiment.as_inputs(train.texts), train.labels.astype("float32")),
                args.batch_size, shuffle=True, seed=args.seed + k)
            # --mixed-precision and --strategy as in a single run.
            model = training.build_and_compile(
                config, functools.partial(_build_sentiment_model, model_config, vectors,
                                          pretrained, args.seed + k),
                "binary_crossentropy", ["accuracy"], training.count_steps(train_ds))
            model.fit(train_ds, epochs=args.epochs, verbose=2, shuffle=False,  # shuffled
                      validation_data=training.as_dataset(
                          (sentiment.as_inputs(val.texts), val.labels.astype("float32")),
                          args.batch_size),
                      callbacks=[keras.callbacks.EarlyStopping(
                          patience=args.patience or args.epochs, restore_best_weights=True)])
            probs = sentiment.predict_texts(model, test.texts)
            fold = sentiment.classification_metrics(test.labels, probs)
            fold_rows = list(zip(test_idx.tolist(), [k + 1] * len(test), test.labels.tolist(),
                                 probs.tolist(), strict=True))
            results.append(fold)
            predictions += fold_rows
            # After every fold, so that a killed run resumes with the next one.
            done.append({"metrics": fold, "predictions": fold_rows})
            runs.write_json(progress, {**fixed, "folds": done})
            print(f"fold {k + 1}/{args.cv}: accuracy {fold['accuracy']:.4f}", flush=True)
        acc = np.array([r["accuracy"] for r in results])
        summary = {"folds": args.cv, "split_seed": split_seed, "accuracy_mean": float(acc.mean()),
                   "accuracy_std": float(acc.std()), "per_fold": results,
                   "data": args.data or str(nlp_data.SENTIMENT_SAMPLE),
                   "settings": settings}
        runs.write_json(run.root / "cv.json", summary)
        rows = "".join(f"{i},{k},{y},{p:.6f}\n" for i, k, y, p in sorted(predictions))
        runs.atomic_write_text(run.root / "cv_predictions.csv",
                               "index,fold,label,probability\n" + rows)
        runs.write_json(run.metrics, {"cv": {k: v for k, v in summary.items()
                                             if k != "per_fold"}})
    print(f"{args.cv}-fold accuracy {acc.mean():.4f} +- {acc.std():.4f}")
    return 0


def _digest_of_texts(texts, labels) -> str:
    import hashlib

    digest = hashlib.sha1()
    for text, label in zip(texts, labels, strict=True):
        digest.update(f"{int(label)}\t{len(text)}\t{text}".encode())
    return digest.hexdigest()[:16]


def _file_digest(path) -> str | None:
    if path is None:
        return None
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()[:16]


def _cv_folds_done(run, fixed: dict) -> list[dict]:
    """The folds a killed (or finished) --cv run completed, if it ran as this one would."""
    from common.runs import read_json

    progress = run.root / "cv_progress.json"
    single_run = "training" in read_json(run.config) or any(
        p.exists() for p in (run.model, run.last_checkpoint))
    if single_run or (not progress.exists() and (run.root / "cv.json").exists()):
        # A single run, or a --cv run from before per-fold progress was kept:
        # resuming would train every fold over what it holds.
        raise UserError(f"--resume --cv: {run.root} holds no --cv run to continue "
                        f"({'a run trained without --cv' if single_run else 'no cv_progress.json'}"
                        "); start a new --run-dir")
    if not progress.exists():
        return []
    stored = read_json(progress)
    for key, what in (("data_digest", "--data (texts or labels)"),
                      ("embeddings_digest", "the --embeddings file"),
                      ("init_from_digest", "the --init-from run's model.keras"),
                      ("split_seed", "the split seed (--split-seed, or --seed without it)")):
        if stored.get(key) != fixed[key]:
            raise UserError(f"--resume: {what} differs from what the folds in {run.root} were "
                            "trained with; resume with the same inputs or start a new --run-dir")
    old = stored.get("settings", {})
    changed = [f"--{key.replace('_', '-')}: {old.get(key)!r} -> {value!r}"
               for key, value in fixed["settings"].items() if old.get(key) != value]
    if changed:
        raise UserError(f"--resume: the folds in {progress.parent} were trained with other "
                        f"settings ({'; '.join(changed)}); resume with the same flags or start "
                        "a new --run-dir")
    return list(stored.get("folds", []))


# -- entry -------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    if args.task == "textgen":
        return textgen_handle(args)
    return sentiment_handle(args)


def main(argv: list[str] | None = None) -> int:
    return run_main(make_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
