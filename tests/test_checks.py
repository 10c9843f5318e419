import numpy as np
import pytest

from utils.checks import check_positive_int, check_positive_number


def test_check_positive_int_accepts_and_returns_plain_ints():
    assert check_positive_int("k", 3) == 3
    assert type(check_positive_int("k", np.int64(4))) is int
    assert check_positive_int("past", 0, minimum=0) == 0


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None])
def test_check_positive_int_rejects(value):
    with pytest.raises(ValueError, match=r"k must be a positive int \(how many\), got"):
        check_positive_int("k", value, hint="how many")


def test_check_positive_int_names_the_minimum():
    with pytest.raises(ValueError, match="bits must be an int >= 2, got 1"):
        check_positive_int("bits", 1, minimum=2)


def test_check_positive_number():
    assert check_positive_number("beta", 1) == 1.0
    for bad in (0, -0.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="beta must be a positive number"):
            check_positive_number("beta", bad)
