import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end subprocess runs and tests over ~3 s; "
                            "deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _deterministic():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
