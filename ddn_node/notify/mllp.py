"""MLLP: the Minimal Lower Layer Protocol that carries HL7 v2 over TCP.

HL7 Transport Specification: MLLP, Release 1 (the lower layer protocol HL7 v2.x
implementation guides refer to): a message is framed as ``<VT> message <FS><CR>``
(0x0B ... 0x1C 0x0D); the receiver answers on the same connection with an ACK in the same
framing. (MLLP Release 2's single-byte commit ACK/NAK blocks are not used.)

One connection per message: the node sends rarely, and a fresh connection means a stale
one can never eat an ACK.

Timeouts: ``timeout_s`` bounds the TCP connect, and then, separately, the wait for the
complete framed reply after the message was sent.
"""

from __future__ import annotations

import socket
import time

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_REPLY_BYTES = 1 << 20  # an ACK is a few hundred bytes; refuse to buffer a flood


class MLLPError(Exception):
    """The exchange failed; the message says how, without any message content."""


def frame(message: bytes) -> bytes:
    """Wrap one HL7 message in MLLP framing."""
    return START_BLOCK + message + END_BLOCK


def unframe(buffer: bytes | bytearray) -> bytes | None:
    """The first complete framed message in ``buffer``, or None while it is incomplete.

    Bytes before the start block are ignored: anything outside a block is noise.
    """
    start = buffer.find(START_BLOCK)
    if start < 0:
        return None
    end = buffer.find(END_BLOCK, start + 1)
    if end < 0:
        return None
    return bytes(buffer[start + 1 : end])


def exchange(host: str, port: int, message: bytes, timeout_s: float) -> bytes:  # noqa: C901 - the MLLP framing states of one exchange
    """Send one message and return the framed reply's content (the ACK, unframed).

    Raises :class:`MLLPError` on refusal, timeout, a closed connection or an oversized reply.
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise MLLPError(f"timed out after {timeout_s:g} s connecting to {where}") from None
    except OSError as exc:
        raise MLLPError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    except UnicodeError:  # a host name that IDNA cannot encode
        raise MLLPError(f"cannot connect to {where}: invalid host name") from None
    with sock:
        try:
            sock.settimeout(timeout_s)
            sock.sendall(frame(message))
        except TimeoutError:
            raise MLLPError(f"timed out after {timeout_s:g} s sending to {where}") from None
        except OSError as exc:
            raise MLLPError(f"sending to {where} failed: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        buffer = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MLLPError(f"no ACK from {where} within {timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise MLLPError(f"no ACK from {where} within {timeout_s:g} s") from None
            except OSError as exc:
                raise MLLPError(
                    f"reading the ACK from {where} failed: {exc.strerror or exc}"
                ) from None
            if not chunk:
                partial = f" after {len(buffer)} bytes" if buffer else ""
                raise MLLPError(f"{where} closed the connection without a complete ACK{partial}")
            buffer += chunk
            reply = unframe(buffer)
            if reply is not None:
                return reply
            if len(buffer) > MAX_REPLY_BYTES:
                raise MLLPError(
                    f"reply from {where} exceeds {MAX_REPLY_BYTES} bytes without an end block"
                )
