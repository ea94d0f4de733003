"""benchmarks/speech_speakers.py: the training folders of its speaker-count curve."""

import pytest
from helpers import load_benchmark


def _fsdd(folder, speakers, indices=50):
    folder.mkdir()
    for speaker in speakers:
        for digit in range(10):
            for index in range(indices):
                (folder / f"{digit}_{speaker}_{index}.wav").write_bytes(b"RIFF")
    return folder


@pytest.mark.parametrize("k, per_digit", [(1, 50), (2, 25), (3, 17), (4, 13)])
def test_every_subset_trains_on_the_same_amount_and_tests_on_every_clip(tmp_path, k, per_digit):
    bench = load_benchmark("speech_speakers")
    data = _fsdd(tmp_path / "data", ["ann", "bob", "cat", "dan", "eve"])
    speakers = ("ann", "bob", "cat", "dan")[:k]
    folder = bench.subset_folder(tmp_path / "links", data, "eve", speakers)
    names = sorted(p.name for p in folder.iterdir())
    assert sum("_eve_" in n for n in names) == 500
    for speaker in speakers:
        mine = [n for n in names if f"_{speaker}_" in n]
        assert len(mine) == 10 * per_digit
        assert {int(n.split("_")[2][:-4]) for n in mine} == set(range(per_digit))
    assert all((folder / n).resolve().parent == data.resolve() for n in names)


def test_a_speaker_without_enough_clips_is_named(tmp_path):
    bench = load_benchmark("speech_speakers")
    data = _fsdd(tmp_path / "data", ["ann", "eve"], indices=20)
    with pytest.raises(SystemExit, match=r"0_ann_20\.wav: missing"):
        bench.subset_folder(tmp_path / "links", data, "eve", ("ann",))
