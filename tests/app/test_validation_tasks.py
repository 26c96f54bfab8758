import pytest

from trainwell.app.tasks import build_task


def test_unknown_task_kind_from_python_is_one_line():
    with pytest.raises(ValueError, match=r"^task.kind must be 'classification' or 'regression', "
                                         r"got 'regresion'$"):  # fmt: skip
        build_task("regresion", None, [])
