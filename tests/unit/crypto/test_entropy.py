"""The request path's random bytes and HMACs keep the GIL (crypto/entropy.py, hpke.py).

A call that releases the GIL lets any runnable thread take the interpreter for up to the
switch interval: on a busy worker, every os.urandom or hmac.digest on the request path cost
a wait. These tests run the code beside a thread that spins and count its turns: with a
switch interval of seconds, the spinner only runs while the code under test lets go.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from bastion.crypto import entropy, hpke, ohttp
from bastion.wire import bhttp

pytestmark = pytest.mark.unit


@contextmanager
def _spinner() -> Iterator[Callable[[], int]]:
    """A thread that counts while it holds the GIL; yields a reader of its count."""
    count = [0]
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()
        while not stop.is_set():
            count[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=spin, daemon=True)
    try:
        thread.start()
        assert started.wait(30)
        yield lambda: count[0]
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join(30)


def _lets_go(step: Callable[[], object], times: int) -> bool:
    """Whether `step`, run up to `times` times, ever gave the GIL to a runnable thread (a
    release is not always noticed: the caller may take the GIL back first; it stops at
    the first one seen, each of which costs up to the switch interval)."""
    with _spinner() as turns:
        before = turns()
        for _ in range(times):
            step()
            if turns() != before:
                return True
        return False


def test_the_spinner_sees_a_call_that_lets_go() -> None:
    # The method works: os.urandom releases the GIL around getrandom.
    assert _lets_go(lambda: os.urandom(16), 100_000)


def test_random_bytes_keep_the_gil_between_refills() -> None:
    entropy.random_bytes(1)  # a fresh pool
    assert not _lets_go(lambda: entropy.random_bytes(16), 200)


def test_opening_and_sealing_an_ohttp_request_keeps_the_gil() -> None:
    private = hpke.PrivateKey.generate(hpke.KEM_X25519_SHA256)
    suite = hpke.Suite(hpke.KEM_X25519_SHA256, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
    config = ohttp.KeyConfig(
        key_id=1,
        kem_id=suite.kem_id,
        public_key=private.public_bytes(),
        suites=((suite.kdf_id, suite.aead_id),),
    )
    keys = {1: ohttp.GatewayKey(key_id=1, private_key=private, suites=config.suites)}
    inner = bhttp.Request(method="POST", scheme="https", authority="b", path="/v1/chat/completions")
    request = bhttp.encode_request(inner)
    sealed = [ohttp.encapsulate_request(config, request, suite=suite)[0] for _ in range(20)]
    entropy.random_bytes(1)

    requests = iter(sealed)

    def serve() -> None:
        _, context = ohttp.decapsulate_request(keys, next(requests))
        context.seal(b"answer")

    assert not _lets_go(serve, len(sealed))


def test_bytes_are_handed_out_once_across_threads() -> None:
    taken: list[bytes] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [entropy.random_bytes(16) for _ in range(500)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(taken) == 2000
    assert len(set(taken)) == 2000
    assert all(len(chunk) == 16 for chunk in taken)
    assert len(entropy.random_hex(12)) == 24
    assert len(entropy.random_bytes(entropy.POOL_BYTES)) == entropy.POOL_BYTES
    with pytest.raises(ValueError):
        entropy.random_bytes(-1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_repeats_its_parents_bytes() -> None:
    entropy.random_bytes(1)  # the pool holds bytes the child would otherwise inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write, entropy.random_bytes(32))
        finally:
            os._exit(0)
    os.close(write)
    child = b""
    while len(child) < 32:
        chunk = os.read(read, 32)
        if not chunk:
            break
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != entropy.random_bytes(32)
