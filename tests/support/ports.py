"""Free loopback ports for the servers and rendezvous points that tests start.

Never a port from bind(0): those come from Linux's ephemeral range (32768-60999), from which
the kernel also picks the local port of every outgoing connection on the machine, so another
process can take it between our pick and the server's bind ("address already in use", seen
in CI). `launch/local-stack` picks below that range; tests use the same picker, loaded from
the script so there is one definition.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

LOCAL_STACK = Path(__file__).resolve().parents[2] / "launch" / "local-stack"


@cache
def _local_stack() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sg2dist_local_stack", str(LOCAL_STACK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


def free_port() -> int:
    """A loopback port that is free now, below the ephemeral range (local-stack's picker)."""
    return _local_stack().free_port()
