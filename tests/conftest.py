"""Keeps every test off the network, and W&B / Neptune files out of the working directory.

One session-wide environment, set before the first test: W&B and Neptune default to offline
mode with their folders in a temporary directory, no credentials are visible, and HTTP(S)
proxies point at a closed local port, so a client that tries to reach a server anyway fails
at once instead of phoning home. Local addresses bypass the proxy (W&B's own service and
the closed-port tests connect to 127.0.0.1). Tests that need something else (a W&B server
at a closed port, say) change the variables with ``monkeypatch``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

_CREDENTIALS = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT")


def closed_local_port() -> int:
    """A local TCP port with nothing listening (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _no_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("offline-loggers")
    dead_proxy = f"http://127.0.0.1:{closed_local_port()}"
    settings = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "WANDB_ARTIFACT_DIR": str(root / "wandb-artifacts"),
        "NEPTUNE_MODE": "offline",
        "NEPTUNE_DATA_DIRECTORY": str(root / "neptune"),
        "HTTP_PROXY": dead_proxy,
        "HTTPS_PROXY": dead_proxy,
        "http_proxy": dead_proxy,
        "https_proxy": dead_proxy,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.makedirs(settings[key], exist_ok=True)
    saved = {key: os.environ.get(key) for key in (*settings, *_CREDENTIALS)}
    os.environ.update(settings)
    for key in _CREDENTIALS:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
