import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    # The models under test are tiny: on 2 shared cores, torch's thread pool costs more than it saves.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
