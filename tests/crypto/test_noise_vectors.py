"""Known-answer tests: every vector of ``../shared/vectors/noise/`` byte for byte.

The vectors come from cacophony (an independent Haskell implementation), so
passing them is evidence of interoperability, not only of self-consistency.
A second test talks to the ``noiseprotocol`` package with fresh keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.crypto.noise import (
    MAX_NONCE,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
    NoiseProtocol,
)
from mesh.crypto.primitives import InvalidTag

# A copy of ../shared/vectors/noise/ (see vectors/SOURCE.txt), so that a fresh clone tests alone.
VECTORS = Path(__file__).resolve().parent / "vectors" / "cacophony_psk_subset.json"


def _load() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text())["vectors"]
    return vectors


ALL_VECTORS = _load()


def test_the_subset_holds_all_twelve_vectors() -> None:
    names = {v["protocol_name"] for v in ALL_VECTORS}
    assert len(names) == 12
    assert "Noise_NNpsk0_25519_ChaChaPoly_SHA256" in names


def _handshake_states(vector: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    protocol = NoiseProtocol.from_name(vector["protocol_name"])
    hexes = bytes.fromhex
    initiator = HandshakeState(
        protocol,
        initiator=True,
        prologue=hexes(vector["init_prologue"]),
        psks=[hexes(p) for p in vector["init_psks"]],
        s=KeyPair.from_private_bytes(hexes(vector["init_static"]))
        if "init_static" in vector
        else None,
        e=KeyPair.from_private_bytes(hexes(vector["init_ephemeral"])),
    )
    responder = HandshakeState(
        protocol,
        initiator=False,
        prologue=hexes(vector["resp_prologue"]),
        psks=[hexes(p) for p in vector["resp_psks"]],
        e=KeyPair.from_private_bytes(hexes(vector["resp_ephemeral"])),
        rs=hexes(vector["resp_remote_static"]) if "resp_remote_static" in vector else None,
    )
    return initiator, responder


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=lambda v: v["protocol_name"])
def test_vector(vector: dict[str, Any]) -> None:
    initiator, responder = _handshake_states(vector)
    messages = vector["messages"]
    handshake_length = len(NoiseProtocol.from_name(vector["protocol_name"]).messages)
    for index, message in enumerate(messages[:handshake_length]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        payload = bytes.fromhex(message["payload"])
        ciphertext = sender.write_message(payload)
        assert ciphertext.hex() == message["ciphertext"]
        assert receiver.read_message(ciphertext) == payload
    assert initiator.cipher_states is not None and responder.cipher_states is not None
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.handshake_hash is not None
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    i_send, i_recv = initiator.cipher_states
    r_recv, r_send = responder.cipher_states
    for index, message in enumerate(messages[handshake_length:], start=handshake_length):
        send, recv = (i_send, r_recv) if index % 2 == 0 else (r_send, i_recv)
        payload = bytes.fromhex(message["payload"])
        ciphertext = send.encrypt_with_ad(b"", payload)
        assert ciphertext.hex() == message["ciphertext"]
        assert recv.decrypt_with_ad(b"", ciphertext) == payload


@pytest.mark.parametrize("vector", ALL_VECTORS[:4], ids=lambda v: v["protocol_name"])
def test_vector_with_one_flipped_bit_is_refused(vector: dict[str, Any]) -> None:
    initiator, responder = _handshake_states(vector)
    message = bytearray(initiator.write_message(bytes.fromhex(vector["messages"][0]["payload"])))
    message[-1] ^= 0x01
    with pytest.raises(InvalidTag):
        responder.read_message(bytes(message))


def test_wrong_prologue_or_psk_does_not_authenticate() -> None:
    protocol = NoiseProtocol.from_name("Noise_NNpsk0_25519_ChaChaPoly_SHA256")
    psk = bytes(32)
    message = HandshakeState(protocol, initiator=True, prologue=b"a", psks=[psk]).write_message(b"")
    with pytest.raises(InvalidTag):
        HandshakeState(protocol, initiator=False, prologue=b"b", psks=[psk]).read_message(message)
    with pytest.raises(InvalidTag):
        HandshakeState(protocol, initiator=False, prologue=b"a", psks=[b"\x01" * 32]).read_message(
            message
        )


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_25519_ChaChaPoly_SHA256",
        "Noise_NN_448_ChaChaPoly_SHA256",
        "Noise_NNpsk3_25519_ChaChaPoly_SHA256",
        "Noise_NNpskx_25519_ChaChaPoly_SHA256",
        "Noise_NN_25519_ChaChaPoly",
        "Noise_NN_25519_ChaChaPoly_SHA512",
    ],
)
def test_unsupported_names_are_refused(name: str) -> None:
    with pytest.raises(NoiseError):
        NoiseProtocol.from_name(name)


def test_misuse_is_refused() -> None:
    protocol = NoiseProtocol.from_name("Noise_NNpsk0_25519_ChaChaPoly_SHA256")
    with pytest.raises(NoiseError):
        HandshakeState(protocol, initiator=True, prologue=b"", psks=[])
    with pytest.raises(NoiseError):
        HandshakeState(protocol, initiator=True, prologue=b"", psks=[b"short"])
    initiator = HandshakeState(protocol, initiator=True, prologue=b"", psks=[bytes(32)])
    with pytest.raises(NoiseError):
        initiator.read_message(bytes(48))  # the initiator writes first
    responder = HandshakeState(protocol, initiator=False, prologue=b"", psks=[bytes(32)])
    with pytest.raises(NoiseError):
        responder.read_message(bytes(40))  # too short for e + tag
    with pytest.raises(NoiseError):
        KeyPair.from_private_bytes(bytes(31))


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_the_last_nonce_is_reserved_and_a_failed_decryption_keeps_n(cipher: str) -> None:
    """Spec section 5.1: n = 2^64-1 is never used (EncryptWithAd and DecryptWithAd fail
    once n reaches it, and SetNonce cannot choose it); a decryption that fails its tag
    leaves n where it was."""
    functions = NoiseProtocol.from_name(f"Noise_NN_25519_{cipher}_SHA256").cipher
    sender, receiver = CipherState(functions, bytes(32)), CipherState(functions, bytes(32))
    with pytest.raises(InvalidTag):
        receiver.decrypt_with_ad(b"", bytes(20))
    assert receiver.n == 0
    sender.set_nonce(MAX_NONCE - 1)
    receiver.set_nonce(MAX_NONCE - 1)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"last")) == b"last"
    assert sender.n == receiver.n == MAX_NONCE
    with pytest.raises(NoiseError):
        sender.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError):
        receiver.decrypt_with_ad(b"", bytes(20))
    for state in (sender, receiver):
        with pytest.raises(NoiseError):
            state.set_nonce(MAX_NONCE)


def test_low_order_public_key_is_refused() -> None:
    protocol = NoiseProtocol.from_name("Noise_NNpsk0_25519_ChaChaPoly_SHA256")
    psk = bytes(32)
    initiator = HandshakeState(protocol, initiator=True, prologue=b"", psks=[psk])
    responder = HandshakeState(protocol, initiator=False, prologue=b"", psks=[psk])
    responder.read_message(initiator.write_message(b""))
    reply = responder.write_message(b"")
    forged = bytes(32) + reply[32:]  # the all-zero point has order 1
    with pytest.raises(NoiseError):
        initiator.read_message(forged)


@pytest.mark.parametrize("we_initiate", [True, False])
def test_interoperates_with_noiseprotocol_package(we_initiate: bool) -> None:
    from noise.connection import NoiseConnection

    name = "Noise_NNpsk0_25519_ChaChaPoly_SHA256"
    psk, prologue = bytes(range(32)), b"snrmesh interop"
    ours = HandshakeState(
        NoiseProtocol.from_name(name), initiator=we_initiate, prologue=prologue, psks=[psk]
    )
    theirs = NoiseConnection.from_name(name.encode())
    theirs.set_psks(psk)
    theirs.set_prologue(prologue)
    if we_initiate:
        theirs.set_as_responder()
        theirs.start_handshake()
        assert theirs.read_message(ours.write_message(b"hello")) == b"hello"
        assert ours.read_message(theirs.write_message(b"world")) == b"world"
    else:
        theirs.set_as_initiator()
        theirs.start_handshake()
        assert ours.read_message(theirs.write_message(b"hello")) == b"hello"
        assert theirs.read_message(ours.write_message(b"world")) == b"world"
    assert theirs.handshake_finished and ours.cipher_states is not None
    assert ours.handshake_hash == theirs.get_handshake_hash()
    send, recv = ours.cipher_states if we_initiate else ours.cipher_states[::-1]
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"ping")) == b"ping"
    assert recv.decrypt_with_ad(b"", theirs.encrypt(b"pong")) == b"pong"


def test_reading_from_a_copy_survives_a_forged_message() -> None:
    """A forged message 2 must not spoil the initiator: the genuine one still completes."""
    protocol = NoiseProtocol.from_name("Noise_NNpsk2_25519_ChaChaPoly_SHA256")
    psk = bytes(range(32))
    initiator = HandshakeState(protocol, initiator=True, prologue=b"p", psks=[psk])
    responder = HandshakeState(protocol, initiator=False, prologue=b"p", psks=[psk])
    responder.read_message(initiator.write_message(b"one"))
    reply = responder.write_message(b"two")
    forged = bytearray(reply)
    forged[40] ^= 0x80
    with pytest.raises(InvalidTag):
        initiator.copy().read_message(bytes(forged))
    with pytest.raises(NoiseError):
        initiator.copy().read_message(bytes(4))
    spoiled = initiator.copy()
    with pytest.raises(InvalidTag):
        spoiled.read_message(bytes(forged))
    with pytest.raises(NoiseError):  # a failed read leaves a state unusable...
        spoiled.read_message(reply)
    assert initiator.read_message(reply) == b"two"  # ...but not the one it was copied from
    assert initiator.handshake_hash == responder.handshake_hash


def test_copies_of_an_initialized_state_are_independent_handshakes() -> None:
    """What the session layer does: Initialize() once per CK, then one copy per handshake."""
    protocol = NoiseProtocol.from_name("Noise_NNpsk0_25519_ChaChaPoly_SHA256")
    psk = bytes(range(32))
    template = HandshakeState(protocol, initiator=True, prologue=b"p", psks=[psk])
    hashes = set()
    for _ in range(2):
        initiator = template.copy()
        responder = HandshakeState(protocol, initiator=False, prologue=b"p", psks=[psk])
        responder.read_message(initiator.write_message(b"one"))
        initiator.read_message(responder.write_message(b"two"))
        assert initiator.handshake_hash == responder.handshake_hash
        hashes.add(initiator.handshake_hash)
    assert len(hashes) == 2  # fresh ephemerals each time; the template was not consumed
