"""Request ids of the public front: unique, uuid-sized hex, and distinct across forked workers."""

import os
import re

from tun2g.front import new_request_id


def test_request_ids_are_unique_32_hex_digits():
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)


def test_a_forked_worker_draws_its_own_prefix():
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave without running pytest's teardown
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    parent_id = new_request_id()
    assert len(child_id) == 32
    assert child_id[:20] != parent_id[:20]
