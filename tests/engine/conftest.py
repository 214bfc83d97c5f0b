import pytest

from tests.threads import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    threads of concurrent processes spin against each other (5-8x slower). Restored after."""
    with torch_threads(1):
        yield
