"""Pre-trained word vectors: reading them, --embeddings in sentiment train, building them."""

import json
from collections import Counter

import keras
import numpy as np
import pytest

from apps.nlp import embeddings
from apps.nlp.__main__ import main
from apps.nlp.data import load_labelled

TINY = ["--epochs", "1", "--units", "8", "--max-len", "16", "--batch-size", "32",
        "--max-tokens", "200"]


def write_vectors(path, rows: dict, header: bool = False):
    lines = [f"{len(rows)} {len(next(iter(rows.values())))}"] if header else []
    lines += [w + " " + " ".join(f"{v:g}" for v in vec) for w, vec in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sample_vectors(tmp_path_factory):
    """Dimension-6 vectors for the 40 most frequent words of the bundled sample (+ noise words)."""
    texts = load_labelled(None).texts
    words = [w for w, _ in Counter(
        w for t in texts for w in embeddings.tokenize(t)).most_common(40)]
    rng = np.random.default_rng(0)
    rows = {w: np.round(rng.normal(size=6), 3) for w in [*words, "zzznotaword"]}
    return write_vectors(tmp_path_factory.mktemp("vec") / "vectors.txt", rows, header=True), rows


def test_tokenize_matches_text_vectorization():
    texts = ["It's a GREAT film, isn't it?!", "the 21st century's new \" conan \"", "a-b/c d"]
    layer = keras.layers.TextVectorization()
    layer.adapt(texts)
    assert {w for t in texts for w in embeddings.tokenize(t)} == set(
        layer.get_vocabulary()[2:])


@pytest.mark.parametrize("header", [False, True])
def test_read_vectors_keeps_only_the_vocabulary(tmp_path, header):
    rows = {"good": [0.5, -1.0, 2.0], "bad": [1.5, 0.0, -3.25], "other": [9.0, 9.0, 9.0]}
    path = write_vectors(tmp_path / "v.txt", rows, header=header)
    found, dim, _ = embeddings.read_vectors(path, ["good", "bad", "missing"])
    assert dim == 3
    assert set(found) == {"good", "bad"}
    np.testing.assert_array_equal(found["bad"], np.float32([1.5, 0.0, -3.25]))


@pytest.mark.parametrize("content, problem", [
    ("good 1 2 3\nbad 1 2\n", "line 2: expected 3 numbers after the word, found 2"),
    ("2 3\ngood 1 2 3 4\n", "line 2: expected 3 numbers after the word, found 4"),
    ("good 1 2 3\nbad 1 x 3\n", "line 2: 'x' is not a number"),
    ("good 1 2 3\nbad 1 nan 3\n", "line 2: the vector of 'bad' has a NaN"),
    ("", "no vectors in the file"),
])
def test_malformed_vectors_name_file_and_line(tmp_path, content, problem):
    path = tmp_path / "v.txt"
    path.write_text(content)
    with pytest.raises(embeddings.UserError, match="--embeddings .*v.txt") as info:
        embeddings.read_vectors(path, ["good", "bad"])
    assert problem in str(info.value)


@pytest.mark.parametrize("header", [False, True])
def test_leading_words_skip_what_text_vectorization_never_makes(tmp_path, header):
    rows = {"the": [1, 2], ",": [0, 1], "Film": [1, 1], "good": [2, 2], "don't": [3, 3],
            "bad": [4, 4]}
    path = write_vectors(tmp_path / "v.txt", rows, header=header)
    found, _, leading = embeddings.read_vectors(path, ["bad"], leading=2)
    assert leading == ("the", "good") and set(found) == {"the", "good", "bad"}
    np.testing.assert_array_equal(found["good"], np.float32([2, 2]))
    assert embeddings.read_vectors(path, [], leading=10)[2] == ("the", "good", "bad")
    assert embeddings.read_vectors(path, ["bad"])[2:] == ((),)


@pytest.mark.slow
def test_embeddings_vocabulary_serves_words_the_training_text_lacks(sample_vectors, tmp_path):
    path, rows = sample_vectors
    extra = {"splendiferous": np.float32([9, 8, 7, 6, 5, 4]),
             "abysmally": np.float32([-9, -8, -7, -6, -5, -4])}
    vectors = write_vectors(tmp_path / "v.txt", {**extra, **rows})
    run = tmp_path / "run"
    assert main(["sentiment", "train", "--run-dir", str(run), *TINY, "--embeddings",
                 str(vectors), "--freeze-embeddings", "--embeddings-vocabulary", "3"]) == 0
    model = keras.models.load_model(run / "model.keras")
    vocab = model.get_layer("vectorizer").get_vocabulary()
    matrix = model.get_layer("embedding").get_weights()[0]
    for word, vector in extra.items():  # not in the sample's text, yet known with its vector
        assert word in vocab
        np.testing.assert_allclose(matrix[vocab.index(word)], vector)
    # Only the flag put them there: the training text never has them.
    sample_words = {w for t in load_labelled(None).texts for w in embeddings.tokenize(t)}
    assert not set(extra) & sample_words
    settings = json.loads((run / "config.json").read_text())["app_settings"]
    assert settings["embeddings_vocabulary"] >= 2


def test_embedding_matrix_rows():
    vocab = ("good", "bad", "unknown")
    vectors = {"good": np.float32([1, 2]), "bad": np.float32([3, 4])}
    matrix = embeddings.embedding_matrix(vocab, vectors, 2)
    assert matrix.shape == (5, 2)
    np.testing.assert_array_equal(matrix[0], 0.0)  # padding
    np.testing.assert_array_equal(matrix[2:4], [[1, 2], [3, 4]])
    assert not np.array_equal(matrix[4], 0.0)  # no vector: random, not zeros


@pytest.mark.slow
def test_train_with_embeddings_starts_from_the_vectors(sample_vectors, tmp_path, capsys):
    path, rows = sample_vectors
    run = tmp_path / "run"
    # Frozen: after training the matrix must still hold the file's vectors.
    assert main(["sentiment", "train", "--run-dir", str(run), *TINY, "--embeddings", str(path),
                 "--freeze-embeddings"]) == 0
    assert "--embeddings: vectors for" in capsys.readouterr().out
    settings = json.loads((run / "config.json").read_text())["app_settings"]
    assert settings["embedding_dim"] == 6 and settings["freeze_embeddings"] is True
    model = keras.models.load_model(run / "model.keras")
    vocab = model.get_layer("vectorizer").get_vocabulary()
    matrix = model.get_layer("embedding").get_weights()[0]
    assert matrix.shape == (len(vocab), 6)
    checked = [w for w in rows if w in vocab]
    assert len(checked) >= 30
    for word in checked:
        np.testing.assert_allclose(matrix[vocab.index(word)], rows[word], rtol=1e-6)
    # The vectors live in the weights: serving still takes raw strings.
    import tensorflow as tf

    serve = tf.saved_model.load(str(run / "saved_model")).signatures["serving_default"]
    probs = serve(text=tf.constant(["a fine film", "dull"]))["probability"].numpy()
    assert probs.shape == (2,) and np.all((probs >= 0) & (probs <= 1))


@pytest.mark.slow
def test_fine_tuned_embeddings_move(sample_vectors, tmp_path):
    path, rows = sample_vectors
    run = tmp_path / "run"
    assert main(["sentiment", "train", "--run-dir", str(run), *TINY, "--embeddings",
                 str(path)]) == 0
    model = keras.models.load_model(run / "model.keras")
    vocab = model.get_layer("vectorizer").get_vocabulary()
    matrix = model.get_layer("embedding").get_weights()[0]
    moved = [not np.allclose(matrix[vocab.index(w)], rows[w]) for w in rows if w in vocab]
    assert any(moved)


@pytest.mark.parametrize("extra, problem", [
    (["--embeddings", "{bad}"], "line 2: expected 3 numbers after the word, found 1"),
    (["--embeddings", "{good}", "--embedding-dim", "8"], "have dimension 3"),
    (["--embeddings", "{missing}"], "cannot read"),
    (["--freeze-embeddings"], "--freeze-embeddings needs --embeddings"),
    (["--embeddings-vocabulary", "5"], "--embeddings-vocabulary needs --embeddings"),
])
def test_bad_embeddings_fail_before_the_run_dir(tmp_path, capsys, extra, problem):
    files = {"bad": tmp_path / "bad.txt", "good": tmp_path / "good.txt",
             "missing": tmp_path / "nope.txt"}
    files["bad"].write_text("the 1 2 3\na 1\n")
    files["good"].write_text("the 1 2 3\n")
    run = tmp_path / "run"
    argv = ["sentiment", "train", "--run-dir", str(run), *TINY,
            *[a.format(**files) for a in extra]]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0], err
    assert not run.exists()


def test_build_vectors_tool(tmp_path, capsys):
    # Two topics that never mix: words of one topic end up nearer each other.
    rng = np.random.default_rng(0)
    a, b = ["cat", "dog", "mouse", "horse"], ["car", "bus", "train", "truck"]
    lines = [" ".join(rng.choice(topic, 8)) for _ in range(200) for topic in (a, b)]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vectors.txt"
    assert embeddings.main(["build", "--text", str(text), "--out", str(out), "--dim", "3",
                          "--window", "2", "--min-count", "1"]) == 0
    vectors, dim, _ = embeddings.read_vectors(out, a + b)
    assert dim == 3 and set(vectors) == set(a + b)
    unit = {w: v / np.linalg.norm(v) for w, v in vectors.items()}
    within = np.mean([unit[x] @ unit[y] for t in (a, b) for x in t for y in t if x != y])
    across = np.mean([unit[x] @ unit[y] for x in a for y in b])
    assert within > across + 0.5


def test_build_bad_csv_column(tmp_path, capsys):
    csv = tmp_path / "r.csv"
    csv.write_text("text,label\nfine,1\n")
    assert embeddings.main(["build", "--text", str(csv), "--out", str(tmp_path / "v.txt")]) != 0
    assert "no column 'review'" in capsys.readouterr().err
