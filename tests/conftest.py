import pytest
import torch


def pytest_collection_modifyitems(config, items):
    _skip_inductor_unless_asked(config, items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a keyword: a checkout under a folder named gpu
            item.add_marker(skip_gpu)  # would otherwise skip every test


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models on one torch thread (restored after): a second thread only adds contention, and on a loaded
    2-core machine made them about 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption("--run-inductor", action="store_true", help="also run the torch.compile (inductor) tests")


def _skip_inductor_unless_asked(config, items):
    if config.getoption("--run-inductor"):
        return
    skip = pytest.mark.skip(
        reason="compiles with inductor (minutes); run: python -m pytest -q --run-inductor -m inductor"
    )
    for item in items:
        if item.get_closest_marker("inductor"):
            item.add_marker(skip)
