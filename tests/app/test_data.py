import numpy as np
import pytest

from trainwell.app.data import load_splits


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
