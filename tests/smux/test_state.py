"""The pure smux state machine under random orders of peer frames and application calls."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2g.smux.config import Config, ConfigError
from tun2g.smux.frame import FIN, NOP, PSH, SYN, UPD, encode_frame, encode_update
from tun2g.smux.state import CHUNK_OVERHEAD, SessionState

pytestmark = pytest.mark.pure  # socket-free: see pytest.ini


SIDS = [2, 3, 4, 5, 7]
MAX_RECEIVE = 4096
BACKLOG = 1500
STREAM_BUFFER = 1024


class Model:
    """What an independent reading of docs/protocol.md (#receiving, #closing, #flow-control) says each stream should hold."""

    def __init__(self, version: int):
        self.version = version
        self.table: dict[int, dict] = {}  # registered streams
        self.all: dict[int, dict] = {}  # every stream object ever created, by sid of its latest object

    def new(self, sid):
        stream = dict(pending=bytearray(), fin_sent=False, fin_received=False, read_closed=False, reset=False,
                      read_total=0, since_update=0)
        self.table[sid] = self.all[sid] = stream
        return stream


def _operations(version):
    sid = st.sampled_from(SIDS)
    ops = [
        st.tuples(st.just("syn"), sid),
        st.tuples(st.just("psh"), sid, st.integers(0, 700)),
        st.tuples(st.just("fin"), sid),
        st.tuples(st.just("nop")),
        st.tuples(st.just("open")),
        st.tuples(st.just("read"), sid, st.integers(1, 900)),
        st.tuples(st.just("read_into"), sid, st.integers(1, 900)),
        st.tuples(st.just("close"), sid),
        st.tuples(st.just("shut_wr"), sid),
        st.tuples(st.just("shut_rd"), sid),
    ]
    if version == 2:
        ops.append(st.tuples(st.just("upd"), sid, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))
    return st.lists(st.one_of(ops), max_size=60)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), version=st.sampled_from([1, 2]), client=st.booleans())
def test_state_machine_matches_the_model(data, version, client):
    config = Config(version=version, max_receive_buffer=MAX_RECEIVE, max_stream_buffer=STREAM_BUFFER,
                    max_stream_backlog=BACKLOG)
    state = SessionState(config, client)
    model = Model(version)
    objects = {}  # sid -> latest StreamState object
    fins_sent = Counter()  # by id() of the stream object; keep_alive stops ids being reused
    keep_alive = []
    counter = 0

    def feed(wire):
        cut = data.draw(st.integers(0, len(wire)))
        for piece in (wire[:cut], wire[cut:]):
            result = state.receive(piece)
            assert result.error is None
            for opened in result.opened:
                objects[opened.sid] = opened
                keep_alive.append(opened)

    def check_outbox():
        for cmd, sid, value in state.take_outbox():
            if cmd == FIN:
                fins_sent[id(objects[sid])] += 1
                assert fins_sent[id(objects[sid])] == 1, "a second FIN for one stream"
            else:
                assert cmd == UPD and version == 2, "UPD on a v1 session"
                stream = model.all[sid]
                assert value == (stream["read_total"] & 0xFFFFFFFF, STREAM_BUFFER)

    for op in data.draw(_operations(version)):
        kind, sid = op[0], (op[1] if len(op) > 1 else None)
        stream = model.table.get(sid)
        if kind == "syn":
            feed(encode_frame(version, SYN, sid))
            if stream is None:
                model.new(sid)
        elif kind == "psh":
            payload = bytes((counter + i) % 251 for i in range(op[2]))
            counter += op[2]
            feed(encode_frame(version, PSH, sid, payload))
            if stream is not None and not stream["read_closed"]:
                stream["pending"] += payload
                if len(stream["pending"]) > BACKLOG:  # reset: like close, plus a remembered reason
                    stream.update(pending=bytearray(), read_closed=True, fin_sent=True, reset=True)
                    del model.table[sid]
        elif kind == "fin":
            feed(encode_frame(version, FIN, sid))
            if stream is not None:
                stream["fin_received"] = True
                if stream["fin_sent"]:
                    del model.table[sid]
        elif kind == "upd":
            feed(encode_update(version, sid, op[2], op[3]))
            if stream is not None:
                assert (objects[sid].peer_consumed, objects[sid].peer_window) == (op[2], op[3])
        elif kind == "nop":
            feed(encode_frame(version, NOP, 0))
        elif kind == "open":
            opened = state.open_stream()
            assert opened.sid % 2 == (1 if client else 0) and opened.sid not in model.table
            objects[opened.sid] = opened
            keep_alive.append(opened)
            model.new(opened.sid)
        elif sid in objects:
            target, modelled = objects[sid], model.all[sid]
            if kind in ("read", "read_into"):
                size = op[2]
                if kind == "read":
                    got = state.read(target, size)
                else:
                    buffer = bytearray(size)
                    got = bytes(buffer[:state.read_into(target, memoryview(buffer))])
                assert got == bytes(modelled["pending"][:size])
                del modelled["pending"][:len(got)]
                modelled["read_total"] += len(got)
            elif kind == "shut_rd":
                state.shutdown_read(target)
                modelled.update(pending=bytearray(), read_closed=True)
            elif kind == "shut_wr":
                state.shutdown_write(target)
                modelled["fin_sent"] = True
                if modelled["fin_received"] and model.table.get(sid) is modelled:
                    del model.table[sid]
            elif kind == "close":
                state.close_stream(target)
                modelled.update(pending=bytearray(), read_closed=True, fin_sent=True)
                if model.table.get(sid) is modelled:
                    del model.table[sid]
        check_outbox()

        # Invariants, after every single step.
        assert set(state.streams) == set(model.table)
        held = 0
        for sid, stream_state in objects.items():
            modelled = model.all[sid]
            assert b"".join(stream_state.chunks) == bytes(modelled["pending"])
            assert stream_state.buffered == len(modelled["pending"]) <= BACKLOG
            assert stream_state.fin_sent == modelled["fin_sent"]
            assert (stream_state.reset_message is not None) == modelled["reset"]
            held += stream_state.buffered + CHUNK_OVERHEAD * len(stream_state.chunks)
        assert state.budget == MAX_RECEIVE - held


def test_v2_update_fires_on_first_read_and_every_half_buffer():
    state = SessionState(Config(version=2, max_stream_buffer=1000), client=True)
    stream = state.open_stream()
    state.receive(encode_frame(2, PSH, stream.sid, b"x" * 2000))
    sizes = [10, 400, 89, 1, 500, 499, 501]
    updates = []
    for size in sizes:
        state.read(stream, size)
        updates += [value[0] for cmd, sid, value in state.take_outbox()]
    # First read (10); then whenever 500 (half of 1000) were read since the last UPD.
    assert updates == [10, 1000, 2000]


@pytest.mark.parametrize("changes, message", [
    (dict(version=3), "version must be 1 or 2"),
    (dict(keepalive_interval=0), "keepalive_interval must be positive"),
    (dict(keepalive_timeout=5, keepalive_interval=10), "keepalive_timeout (5) must be at least"),
    (dict(max_frame_size=0), "max_frame_size must be between 1 and 65535"),
    (dict(max_frame_size=65536), "max_frame_size must be between 1 and 65535"),
    (dict(max_receive_buffer=0), "max_receive_buffer must be positive"),
    (dict(max_stream_buffer=0), "max_stream_buffer must be between 1"),
    (dict(max_stream_buffer=2**31, max_receive_buffer=2**32), "max_stream_buffer must be between 1 and 2147483647"),
    (dict(max_stream_buffer=10, max_receive_buffer=5), "must not be larger than max_receive_buffer"),
    (dict(max_stream_backlog=0), "max_stream_backlog must be positive"),
])
def test_config_rules_match_go_verify_config(changes, message):
    with pytest.raises(ConfigError) as caught:
        Config(**changes).validate()
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_config_defaults_and_presets():
    Config().validate()
    Config(keepalive_disabled=True, keepalive_interval=0).validate()
    Config(version=None).validate()
    server = Config.tun2_server()
    assert (server.keepalive_interval, server.keepalive_timeout, server.version) == (1.0, 15.0, None)
    assert (server.accept_peer_streams, server.initial_receive_buffer, server.backlog_seconds) == (True, None, 30)
    assert Config().stream_backlog(1) == 1 << 20
    assert Config().stream_backlog(2) == 2 * 262144
