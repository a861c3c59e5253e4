"""Session-wide test datasets built with the product's own prepare code."""

import pytest


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory) -> str:
    """The built-in quickstart dataset (1,797 digits, 32 px, labelled), built once per session."""
    from sg2dist.data import ensure_digits_dataset

    return ensure_digits_dataset(str(tmp_path_factory.mktemp("datasets") / "digits32"))
