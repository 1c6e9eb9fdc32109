"""Fixtures shared by the server tests."""

from __future__ import annotations

import pytest

from tests.server.support import HandMadeClient


@pytest.fixture
def hand_made_client(request):
    """Factory: ``start(answer, deployment=None)``, a HandMadeClient on ``deployment`` (default: plain_deployment)."""
    clients = []

    def start(answer, deployment=None) -> HandMadeClient:
        client = HandMadeClient(deployment or request.getfixturevalue("plain_deployment"), answer)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()
