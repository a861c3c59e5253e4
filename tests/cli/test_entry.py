"""The `sg2dist` entry point (sg2dist/cli/__init__.py): what every command gets on its way out."""

import pytest
import torch.distributed as dist
from support.tiny import set_args, tiny_model_sets

from sg2dist.cli import main


@pytest.fixture
def process_group(tmp_path):
    # A 1-rank gloo group, as a launcher would leave one; a file store needs no port.
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("extra", "exit_code"),
    [((), 0), (("model.no_such_key=1",), 2)],
    ids=["after-success", "after-a-user-error"],
)
def test_a_command_leaves_the_process_group_it_ran_in(process_group, capsys, extra, exit_code):
    # Not left to interpreter shutdown: PyTorch asks programs to destroy their groups.
    assert dist.is_initialized()
    assert main(["summary", *set_args([*tiny_model_sets(), *extra])]) == exit_code
    assert not dist.is_initialized()
    if exit_code:
        assert "model.no_such_key" in capsys.readouterr().err
