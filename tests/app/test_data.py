import numpy as np
import pytest

from trainwell.app.data import load_splits, split_indices
from trainwell.app.data_files import load_arrays


def test_split_is_stratified_seeded_and_scaled_on_train_only():
    a = load_splits("digits", seed=3)
    b = load_splits("digits", seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797
    # stratified: every split keeps the class proportions to within one sample per class
    full = np.bincount(np.concatenate([a.y_train, a.y_val, a.y_test])) / total
    test_share = np.bincount(a.y_test, minlength=10) / len(a.y_test)
    assert np.abs(test_share - full).max() < 0.02
    # scaler fitted on train only: train is standardized, test is not exactly
    assert np.allclose(a.x_train.mean(axis=0), 0, atol=1e-6)
    assert not np.allclose(a.x_test.mean(axis=0), 0, atol=1e-6)
    c = load_splits("digits", seed=4)
    assert not np.array_equal(a.y_test, c.y_test)


def test_train_fraction_keeps_a_stratified_subset_and_leaves_val_test_alone():
    full = load_splits("wine", seed=0)
    small = load_splits("wine", seed=0, train_fraction=0.3)
    assert len(small.y_train) == round(0.3 * len(full.y_train))
    assert set(small.y_train) == {0, 1, 2}
    assert len(small.y_test) == len(full.y_test)
    sized = load_splits("breast_cancer", seed=0, train_size=40)
    assert len(sized.y_train) == 40


def test_csv_and_npz_sources(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    assert load_splits(str(tmp_path / "d.npz")).n_features == 3
    rows = "\n".join(f"{a},{b},{c},{t}" for (a, b, c), t in zip(x, y, strict=True))
    (tmp_path / "d.csv").write_text("f1,f2,f3,label\n" + rows + "\n")
    splits = load_splits(str(tmp_path / "d.csv"), target="label")
    assert splits.n_features == 3 and splits.n_classes == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "nope.csv", "target": "y"}, "does not exist"),
        ({"source": "mnist"}, "neither an embedded dataset"),
        ({"source": "CSV", "target": "missing"}, "is not a column"),
        ({"source": "NAN"}, "NaN or Inf"),
        ({"source": "ONECLASS"}, "single class"),
        ({"source": "wine", "train_fraction": 1.5}, "train_fraction"),
    ],
)
def test_bad_data_is_refused_with_a_clear_message(tmp_path, kwargs, match):
    x = np.arange(40, dtype=float).reshape(20, 2)
    (tmp_path / "d.csv").write_text(
        "a,b,y\n" + "\n".join(f"{a},{b},{i % 2}" for i, (a, b) in enumerate(x))
    )
    bad = x.copy()
    bad[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=bad, y=np.arange(20) % 2)
    np.savez(tmp_path / "one.npz", X=x, y=np.zeros(20))
    source = {
        "CSV": str(tmp_path / "d.csv"),
        "NAN": str(tmp_path / "nan.npz"),
        "ONECLASS": str(tmp_path / "one.npz"),
    }.get(kwargs["source"], kwargs["source"])
    with pytest.raises(ValueError, match=match):
        load_splits(**{**kwargs, "source": source})


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    splits = load_splits("wine", seed=0)
    loader = splits.loader("train", 16, shuffle=True, seed=1)
    loader.sampler.set_epoch(2)
    first = list(loader.sampler)
    loader.sampler.set_epoch(3)
    assert list(loader.sampler) != first
    loader.sampler.set_epoch(2)
    assert list(loader.sampler) == first


def _csv(path, header, rows):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("cell_row", "column", "line"),
    [
        ((3, 1), "b", 5),  # an integer column: np.genfromtxt read the gap as -1
        ((0, 0), "a", 2),  # a float column (genfromtxt: NaN, refused without naming it)
        ((7, 2), "y", 9),  # the label column
        ((4, 3), "name", 6),  # a text column
    ],
)
def test_csv_empty_cell_is_refused_naming_column_and_first_row(tmp_path, cell_row, column, line):
    (row, col) = cell_row
    cells = [[f"{i}.5", str(i), str(i % 2), f"n{i}"] for i in range(20)]
    cells[row][col] = "  " if col == 3 else ""
    cells[row + 5][col] = ""  # a later gap: the first one is reported
    source = _csv(tmp_path / "d.csv", "a,b,y,name", [",".join(r) for r in cells])
    with pytest.raises(
        ValueError,
        match=rf"d\.csv: column '{column}' has an empty cell at line {line} of the file "
        rf"\(data row {row + 1}; the first one\); fill or drop missing values first",
    ):
        load_splits(source, target="y")


def test_csv_short_row_and_text_feature_are_refused(tmp_path):
    rows = [f"{i},{i},{i % 2}" for i in range(20)]
    short = _csv(tmp_path / "short.csv", "a,b,y", [*rows[:4], "4,1", *rows[5:]])
    with pytest.raises(ValueError, match="column 'y' has an empty cell at line 6"):
        load_splits(short, target="y")
    text = _csv(tmp_path / "text.csv", "a,b,y", [*rows[:2], "2,NA,0", *rows[3:]])
    with pytest.raises(ValueError, match=r"must be numeric; column 'b' holds 'NA' \(data row 3\)"):
        load_splits(text, target="y")


def test_csv_labels_keep_their_type_and_quoted_cells_read(tmp_path):
    rows = [f'{i},"{i}.25",{"cat" if i % 2 else "dog"}' for i in range(20)]
    splits = load_splits(_csv(tmp_path / "d.csv", "a,b,kind", [*rows, ""]), target="kind")
    assert splits.n_features == 2 and splits.n_classes == 2
    x, y, _ = load_arrays(
        _csv(tmp_path / "i.csv", "a,y", [f"{i}.5,{i % 3}" for i in range(9)]), "y"
    )
    assert y.dtype.kind == "i" and x[:, 0].tolist() == [i + 0.5 for i in range(9)]


@pytest.mark.parametrize("big", [1e308, -1e308, 1e200])
@pytest.mark.parametrize("signs", [(1, -1), (1, 1)])  # (1, 1) in train: the mean overflows
@pytest.mark.parametrize("where", ["train", "test"])
def test_features_that_overflow_when_scaled_are_refused(tmp_path, big, signs, where):
    # finite in the file, so the NaN/Inf check before scaling let them through
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 2
    train, _, test = split_indices(60, y, 0.15, 0.2, 0)  # the split load_splits makes
    rows = train[:2] if where == "train" else test[:2]
    x[rows, 1] = [signs[0] * big, signs[1] * big]
    with pytest.raises(
        ValueError, match=r"features overflow when scaled.* \d+ rows .*columns \[1\]"
    ):
        load_splits(str(_npz(tmp_path / "big.npz", x, y)))
    csv_rows = [",".join(map(repr, [*r, t])) for r, t in zip(x.tolist(), y.tolist(), strict=True)]
    with pytest.raises(ValueError, match="features overflow when scaled"):
        load_splits(_csv(tmp_path / "big.csv", "a,b,c,y", csv_rows), target="y")


def test_features_beyond_float32_are_refused_unscaled(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 3))
    x[::7, 2] = 1e39  # finite in float64, Inf in the float32 tensors
    with pytest.raises(ValueError, match=r"overflow when stored as float32: 9 rows"):
        load_splits(str(_npz(tmp_path / "f.npz", x, np.arange(60) % 2)), scale=False)


def _npz(path, x, y):
    np.savez(path, X=x, y=y)
    return path


def test_train_size_larger_than_the_training_split_is_refused():
    n = len(load_splits("wine", seed=0).y_train)
    with pytest.raises(ValueError, match=rf"data.train_size is 10000, .*only {n} samples"):
        load_splits("wine", train_size=10_000)
    with pytest.raises(ValueError, match="train_size"):
        load_splits("wine", train_size=n + 1)
    assert len(load_splits("wine", seed=0, train_size=n).y_train) == n  # equal: all of it


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _table(header, rows):
    return header + "\n" + "\n".join(rows) + "\n"


RNG = np.random.default_rng(0)
X60 = RNG.normal(size=(60, 3))
Y60 = np.arange(60) % 2
NAN_X = X60.copy()
NAN_X[[3, 9], 1] = np.nan
INT_ROWS = [f"{i},{i % 5},{i % 2}" for i in range(60)]
BAD_DATA = [
    # (file name, content, load_splits kwargs, what the line must name)
    ("d.csv", _table("a,b,y", [f"{i},{i % 7},{i * 0.37:.4f}" for i in range(412)]), {},
     ["data:", "the target column 'y'", "distinct non-integer values", 'task.kind = "regression"',
      "integer class labels"]),
    ("d.csv", _table("a,b,y", [f"{i},{i},{i}" for i in range(50)]), {},
     ["the target column 'y'", "seen only once", 'task.kind = "regression"']),
    ("d.csv", _table("a,b,y", [*INT_ROWS[:5], "5,1,nan", *INT_ROWS[6:]]), {},
     ["the target column 'y'", "NaN or Inf in 1 row", "class label"]),
    ("d.csv", _table("a,b,y", [*INT_ROWS[:5], "5,inf,1", "6,nan,0", *INT_ROWS[7:]]), {},
     ["d.csv", "2 rows of features hold NaN or Inf", "columns ['b']"]),
    ("d.csv", _table("a,b,y", [*INT_ROWS[:5], "5,1,0,9", *INT_ROWS[6:]]), {},
     ["d.csv", "line 7 has 4 cells, the header 3"]),
    ("d.csv", _table("a,b,y", [*INT_ROWS[:5], "5,x,0", *INT_ROWS[6:]]), {},
     ["d.csv", "column 'b' holds 'x'", "numeric"]),
    ("d.csv", b"a,b,y\n1,2,0\n1,2,\xff\n", {}, ["d.csv", "not UTF-8", "line 3"]),
    ("d.csv", _table("a,y", ['"' + "1" * 200_000 + '",1']), {},
     ["d.csv", "line 2", "field larger than field limit"]),
    ("d.csv", _table("a,b,y", INT_ROWS), {"task": "regression", "target": "a,b"},
     ["data.target 'a,b' is not a column of d.csv"]),
    ("d.csv", _table("a,b,y", [f"{i},{i},{'cat' if i % 2 else 'dog'}" for i in range(60)]),
     {"task": "regression"}, ["the target column 'y'", "regression targets must be real numbers"]),
    ("d.npz", {"X": X60, "y": RNG.integers(0, 2, size=(60, 3))}, {},
     ["array 'y'", "shape (60, 3)", "one class label per row, shape (60,)", "task.kind"]),
    ("d.npz", {}, {}, ["d.npz", "must hold arrays 'X' and 'y'", "missing ['X', 'y']"]),
    ("d.npz", {"X": X60}, {}, ["d.npz", "missing ['y']"]),
    ("d.npz", {"X": np.zeros((0, 3)), "y": np.zeros(0)}, {},
     ["data.source d.npz", "no data", "(0, 3)"]),
    ("d.npz", {"X": np.zeros((0, 3)), "y": np.zeros(0)}, {"task": "regression"}, ["no data"]),
    ("d.npz", {"X": X60 + 1j, "y": Y60}, {}, ["d.npz", "array 'X' holds complex numbers"]),
    ("d.npz", {"X": np.full((60, 3), "a"), "y": Y60}, {},
     ["d.npz", "array 'X' holds dtype <U1", "real numbers"]),
    ("d.npz", {"X": X60, "y": Y60 + 1j}, {}, ["array 'y' holds complex numbers"]),
    ("d.npz", {"X": X60, "y": Y60 + 1j}, {"task": "regression"},
     ["array 'y' holds complex numbers", "regression"]),
    ("d.npz", {"X": NAN_X, "y": Y60}, {},
     ["d.npz", "2 rows of features hold NaN or Inf", "feature columns [1] (0-based) of X"]),
    ("d.npz", {"X": X60, "y": np.array(3)}, {}, ["array 'y' is a single value"]),
    ("d.npz", {"X": X60[:, 0], "y": Y60}, {}, ["X has shape (60,)", "2-D"]),
    ("d.npz", {"X": X60, "y": Y60[:50]}, {}, ["X has 60 rows but array 'y' 50"]),
    ("d.npz", {"X": X60[:5], "y": Y60[:5]}, {},
     ["5 samples are too few", "stratified over 2 classes", "data.test_fraction = 0.2"]),
    ("d.npz", {"X": X60[:2], "y": np.array([0.5, 1.5])}, {"task": "regression"},
     ["2 samples are too few", "each split needs at least one sample"]),
    ("d.npz", "not a zip file", {}, ["d.npz", "not a NumPy .npz archive"]),
    ("d.npz", b"", {}, ["d.npz", "not a NumPy .npz archive"]),
    ("d.npz", b"PK\x03\x04broken", {}, ["d.npz", "not a NumPy .npz archive"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "kwargs", "needles"), BAD_DATA)
def test_bad_data_files_are_refused_in_one_line(tmp_path, name, content, kwargs, needles):
    source = _write(tmp_path, name, content)
    with pytest.raises(ValueError) as info:
        load_splits(source, **{"target": "y", **kwargs})
    text = str(info.value)
    assert len(text.splitlines()) == 1 and len(text) <= 200, text[:500]
    for needle in needles:
        assert needle in text, (needle, text)


def test_npz_of_other_kinds_are_refused_in_one_line(tmp_path):
    np.save(tmp_path / "a.npy", X60)
    (tmp_path / "single.npz").write_bytes((tmp_path / "a.npy").read_bytes())
    np.savez(tmp_path / "obj.npz", X=np.array([object()] * 60, dtype=object), y=Y60)
    (tmp_path / "dir.npz").mkdir()
    cases = [("single.npz", "holds a single array (a .npy file)"),
             ("obj.npz", "array 'X' holds Python objects"),
             ("dir.npz", "is a directory"), ("missing.npz", "does not exist")]  # fmt: skip
    for name, needle in cases:
        with pytest.raises(ValueError) as info:
            load_splits(str(tmp_path / name))
        assert needle in str(info.value) and len(str(info.value).splitlines()) == 1, name


def test_a_column_of_labels_is_one_label_per_row(tmp_path):
    splits = load_splits(_write(tmp_path, "d.npz", {"X": X60, "y": Y60[:, None]}))
    assert splits.n_classes == 2 and splits.y_train.ndim == 1


def test_train_size_that_leaves_too_few_out_for_the_stratified_subsample():
    n = len(load_splits("wine", seed=0).y_train)
    with pytest.raises(ValueError, match=rf"keeps {n - 1} of {n} .* fewer than the 3 classes"):
        load_splits("wine", train_size=n - 1)


def test_user_datasets_too_small_or_continuous_are_one_line(tmp_path):
    from trainwell.app.config_files import load_config
    from trainwell.app.user_data import load_user_splits

    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def tiny():\n"
        "    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])\n"
        "    return TensorDataset(x, y), TensorDataset(x, y)\n"
        "def smooth():\n"
        "    return TensorDataset(torch.randn(50, 3), torch.rand(50))\n"
    )
    for name, needles in [
        ("tiny", ["data: 4 samples are too few", "data.test_fraction"]),
        ("smooth", ["data.target:", "distinct non-integer values", 'task.kind = "regression"']),
    ]:
        cfg = load_config(None, [f"data.target='{tmp_path / 'mydata.py'}:{name}'"])
        with pytest.raises(ValueError) as info:
            load_user_splits(cfg)
        text = str(info.value)
        assert len(text.splitlines()) == 1 and len(text) <= 200, text
        assert all(needle in text for needle in needles), text
