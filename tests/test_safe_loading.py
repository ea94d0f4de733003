"""Loading never runs code from a file, and names from data or config never escape.

- .keras files load with safe_mode=True: a Lambda layer (Python bytecode in the
  file) or a config naming an arbitrary callable (``os.system``) is refused
  with one line, and the code does not run;
- no pickle, eval/exec, marshal or unsafe YAML anywhere in the project;
- names that come from data or config files (split lists, label folders,
  config.json fields) cannot make the project read or write outside the data
  folder and the run directory; ``export --out`` never replaces a folder that
  is not an old export.
"""

import json
import re
import shutil
import zipfile
from pathlib import Path

import keras
import pytest
import tiny_task

from common.errors import UserError
from common.runs import atomic_save_model, load_keras, open_run, safe_child

ROOT = Path(__file__).resolve().parents[1]


def lambda_model(marker: Path) -> keras.Model:
    """A model whose Lambda layer creates `marker` whenever its code runs."""
    inputs = keras.Input((tiny_task.STEPS, tiny_task.FEATURES), name="sequence")
    doubled = keras.layers.Lambda(
        lambda x, m=str(marker): (open(m, "w").close(), x * 2)[1])(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(doubled)))


def tiny_run(root: Path, model: keras.Model) -> Path:
    """A run directory of tests/tiny_task.py holding `model` as its model.keras."""
    with open_run(root, app="tests", task="tiny") as run:
        atomic_save_model(model, run.model)
    return root


def with_config(source: Path, target: Path, change) -> Path:
    """A copy of the .keras file `source` whose config.json is `change(config)`."""
    with zipfile.ZipFile(source) as z:
        files = {name: z.read(name) for name in z.namelist()}
    files["config.json"] = json.dumps(change(json.loads(files["config.json"]))).encode()
    with zipfile.ZipFile(target, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return target


# -- .keras files ------------------------------------------------------------------


def test_a_lambda_layer_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "lambda_ran"
    model = lambda_model(marker)
    model.save(tmp_path / "lambda.keras")
    assert marker.exists()  # building the model ran the code: the marker works
    marker.unlink()
    with pytest.raises(UserError, match=r"lambda\.keras: contains a Lambda layer .* will not be "
                                        "loaded"):
        load_keras(tmp_path / "lambda.keras")
    assert not marker.exists()


def test_the_cli_refuses_a_run_whose_model_has_a_lambda(tmp_path, capfd):
    marker = tmp_path / "lambda_ran"
    run_dir = tiny_run(tmp_path / "run", lambda_model(marker))
    marker.unlink()
    for command in ("evaluate", "predict", "export"):
        capfd.readouterr()
        assert tiny_task.main(["tiny", command, "--run-dir", str(run_dir)]) == 2
        err = capfd.readouterr().err.splitlines()
        assert err == [f"tiny_task: error: {run_dir / 'model.keras'}: contains a Lambda layer "
                       "(Python code stored in the file); it will not be loaded, since loading "
                       "it could run that code"]
    assert not marker.exists()
    assert not (run_dir / "saved_model").exists()


@pytest.mark.parametrize("where", ["layer", "model"])
def test_a_config_naming_an_arbitrary_callable_is_refused(tmp_path, where):
    marker = tmp_path / "system_ran"
    os_system = {"module": "os", "class_name": "system", "registered_name": None,
                 "config": {"command": f"touch {marker}"}}

    def change(config):
        if where == "model":
            return os_system
        layer = config["config"]["layers"][1]
        config["config"]["layers"][1] = {**os_system, "name": layer["name"],
                                         "inbound_nodes": layer["inbound_nodes"]}
        return config

    tiny_task.build_model().save(tmp_path / "good.keras")
    crafted = with_config(tmp_path / "good.keras", tmp_path / "crafted.keras", change)
    with pytest.raises(UserError, match=r"crafted\.keras: names a class or function that is "
                                        r"neither a Keras built-in nor one of ours"):
        load_keras(crafted)
    assert not marker.exists()


def test_a_file_that_is_not_a_model_is_one_clear_error(tmp_path):
    tiny_task.build_model().save(tmp_path / "good.keras")
    data = (tmp_path / "good.keras").read_bytes()
    (tmp_path / "half.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"half\.keras: not a loadable \.keras model"):
        load_keras(tmp_path / "half.keras")
    with pytest.raises(UserError, match=r"nothing\.keras: no such model file"):
        load_keras(tmp_path / "nothing.keras")
    load_keras(tmp_path / "good.keras")  # and a good one loads


# Whatever can turn bytes into running code. An entry of ALLOWED needs a reason.
UNSAFE = {
    "pickle": r"\b(c?pickle|dill|shelve|joblib)\b",
    "marshal": r"\bmarshal\b",
    "eval/exec": r"(?<![\w.])(eval|exec)\(",
    "unsafe Keras loading": r"safe_mode\s*=\s*False|enable_unsafe_deserialization",
    "Lambda layer": r"\bLambda\(|layers\.Lambda\b",
    "unsafe YAML": r"yaml\.(unsafe_)?load\(|yaml\.Loader\b",
    "pickled numpy": r"allow_pickle\s*=\s*True",
    "Keras loading outside load_keras": r"(models|saving)\.load_model\(|model_from_\w+\(|"
                                        r"import .*\bload_model\b",
    "torch.load": r"torch\.load\(",
}
ALLOWED = {
    # load_keras itself (safe_mode=True) and RunDir.load_model, which calls it.
    ("common/runs.py", "Keras loading outside load_keras"),
}


def test_no_unsafe_deserialisation_in_the_project():
    found = []
    for path in sorted([*ROOT.glob("common/**/*.py"), *ROOT.glob("apps/**/*.py")]):
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            for what, pattern in UNSAFE.items():
                if re.search(pattern, code) and (rel, what) not in ALLOWED:
                    found.append(f"{rel}:{n}: {what}: {line.strip()}")
    assert found == []
    assert "safe_mode=True" in (ROOT / "common" / "runs.py").read_text()


# -- paths from data and config ----------------------------------------------------


def test_safe_child_keeps_names_inside_the_root(tmp_path):
    root = tmp_path / "data"
    (root / "yes").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert safe_child(root, "yes/a.wav", source="list") == root / "yes" / "a.wav"
    for name, why in [("../x", "points outside"), ("yes/../../x", "points outside"),
                      ("/etc/passwd", "points outside"), ("link/a.wav", "symbolic link"),
                      ("a\0b", "not a valid relative path"), ("..\\x", "not a valid"),
                      ("", "not a valid")]:
        with pytest.raises(UserError, match=f"^list line 3: .*{why}"):
            safe_child(root, name, source="list line 3")


def speech_commands_folder(folder: Path, labels) -> Path:
    """A Speech Commands-style folder: label sub-folders of 3 speakers' sample clips."""
    from apps.speech import data

    samples = sorted(data.SAMPLES.glob("*.wav"))
    for label in labels:
        (folder / label).mkdir(parents=True)
        for i, speaker in enumerate(("aa11", "bb22", "cc33", "dd44")):
            shutil.copy(samples[i], folder / label / f"{speaker}_nohash_{i}.wav")
    (folder / "validation_list.txt").write_text(f"{labels[0]}/bb22_nohash_1.wav\n")
    (folder / "testing_list.txt").write_text(
        "".join(f"{label}/cc33_nohash_2.wav\n" for label in labels))
    return folder


def test_a_split_list_entry_leading_outside_is_refused(tmp_path, capfd):
    from apps.speech import data
    from apps.speech.__main__ import main

    folder = speech_commands_folder(tmp_path / "data", ["yes", "no"])
    (tmp_path / "x").mkdir()
    with open(folder / "testing_list.txt", "a") as f:
        f.write("\n../../x/evil.wav\n")
    with pytest.raises(UserError, match=r"testing_list\.txt line 4: '\.\./\.\./x/evil\.wav' "
                                        "points outside"):
        data.load_clips(str(folder))
    capfd.readouterr()
    assert main(["words", "train", "--data", str(folder), "--run-dir", str(tmp_path / "run"),
                 "--cache-dir", "none"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "testing_list.txt line 4" in err[0]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == []


def files_outside(tmp_path: Path, *inside: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")
            if p.is_file() and not any(p.is_relative_to(d) for d in inside)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_odd_labels_and_a_tampered_config_write_only_inside_the_run(tmp_path, capfd):
    from apps.speech.__main__ import main

    labels = ["-rf", "a..b", "two words", "ça"]
    folder = speech_commands_folder(tmp_path / "data", labels)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    before = files_outside(tmp_path, run_dir, cache)
    assert main(["words", "train", "--data", str(folder), "--run-dir", str(run_dir),
                 "--cache-dir", str(cache), "--epochs", "1", "--units", "4", "--layers", "1",
                 "--batch-size", "8"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["app_settings"]["labels"] == sorted(labels)
    assert files_outside(tmp_path, run_dir, cache) == before

    # config.json names the data folder: point it elsewhere, through "..".
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(folder, moved)
    config["data"] = str(run_dir / ".." / "elsewhere" / "data")
    (run_dir / "config.json").write_text(json.dumps(config))
    before = files_outside(tmp_path, run_dir, cache)
    capfd.readouterr()
    assert main(["words", "evaluate", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                 "--json"]) == 0
    assert set(json.loads(capfd.readouterr().out.splitlines()[-1])["labels"]) == set(labels)
    assert files_outside(tmp_path, run_dir, cache) == before  # read there, wrote nothing there


def test_export_never_replaces_a_folder_that_is_not_an_export(tmp_path, capfd):
    run_dir = tiny_run(tmp_path / "run", tiny_task.build_model())
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "exports").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "exports")
    for out, why in [(documents, "exists and is not a SavedModel (it would be replaced); "
                                 "choose a new or empty folder"),
                     (tmp_path / "notes.txt", "exists and is not a folder; choose a new "
                                              "export path"),
                     (tmp_path / "latest", "is a symbolic link (the export would replace the "
                                           "link, not write where it points); give the real "
                                           f"path, {tmp_path.resolve() / 'exports'}")]:
        capfd.readouterr()
        assert tiny_task.main(["tiny", "export", "--run-dir", str(run_dir),
                               "--out", str(out)]) == 2
        assert capfd.readouterr().err.splitlines() == [f"tiny_task: error: {out}: {why}"]
    assert (documents / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in documents.iterdir()) == ["thesis.txt"]
    assert (tmp_path / "notes.txt").read_text() == "notes"
    assert (tmp_path / "latest").is_symlink() and not any((tmp_path / "exports").iterdir())

