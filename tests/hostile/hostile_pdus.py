"""Raw DICOM Upper Layer PDUs (PS3.8 9.3), built by hand so that they can be broken.

A well-formed A-ASSOCIATE-RQ, P-DATA-TF (C-ECHO-RQ, C-STORE-RQ + data set fragments) and
the other PDU types, plus hypothesis strategies that mutate them: bit flips, truncation,
wrong PDU / item lengths, huge declared lengths, random item types, random bytes. And a
tiny raw client: connect, send bytes, read what comes back until the node closes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

from hostile_gen import seed
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1.999"
KNOWN_PDU_TYPES = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def item(item_type: int, body: bytes) -> bytes:
    """A variable item / sub-item: type, reserved, 2-byte length."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def associate_rq(
    calling: str = "TESTSCU",
    called: str = "DDN_NODE",
    contexts: list[tuple[int, str, list[str]]] | None = None,
    max_pdu: int = 16384,
) -> bytes:
    contexts = contexts or [
        (1, VERIFICATION, [ImplicitVRLittleEndian]),
        (3, CR_STORAGE, [ExplicitVRLittleEndian]),
    ]
    items = item(0x10, _uid(APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        sub = item(0x30, _uid(abstract)) + b"".join(item(0x40, _uid(ts)) for ts in syntaxes)
        items += item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = (
        item(0x51, struct.pack(">I", max_pdu))
        + item(0x52, _uid(IMPLEMENTATION_UID))
        + item(0x55, b"HOSTILE")
    )
    items += item(0x50, user)
    header = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    return pdu(0x01, header + items)


def encode_command(**values: object) -> bytes:
    from pydicom.filebase import DicomBytesIO

    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    body = fp.getvalue()
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def pdv(context_id: int, data: bytes, command: bool, last: bool = True) -> bytes:
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def echo_rq(message_id: int = 1, context_id: int = 1) -> bytes:
    command = encode_command(
        AffectedSOPClassUID=VERIFICATION,
        CommandField=0x0030,
        MessageID=message_id,
        CommandDataSetType=0x0101,
    )
    return pdu(0x04, pdv(context_id, command, command=True))


def store_rq(
    dataset: bytes,
    sop_instance: str,
    message_id: int = 2,
    context_id: int = 3,
    fragment: int = 4096,
) -> list[bytes]:
    """C-STORE-RQ: one command PDU and the data set in P-DATA-TF PDUs of ``fragment`` bytes."""
    command = encode_command(
        AffectedSOPClassUID=CR_STORAGE,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=sop_instance,
    )
    out = [pdu(0x04, pdv(context_id, command, command=True))]
    chunks = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    for n, chunk in enumerate(chunks):
        out.append(pdu(0x04, pdv(context_id, chunk, command=False, last=n == len(chunks) - 1)))
    return out


RELEASE_RQ = pdu(0x05, b"\0" * 4)
RELEASE_RP = pdu(0x06, b"\0" * 4)
ABORT = pdu(0x07, b"\0\0\0\0")


# -- a raw client -------------------------------------------------------------------------


@dataclass
class Exchange:
    """What came back on one connection."""

    received: bytes = b""
    closed_by_peer: bool = False
    seconds: float = 0.0
    pdu_types: list[int] = field(default_factory=list)


def split_pdus(data: bytes) -> list[int]:
    """PDU types in a byte stream (a trailing partial PDU counts too)."""
    types = []
    pos = 0
    while pos + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBI", data[pos : pos + 6])
        types.append(pdu_type)
        pos += 6 + length
    return types


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> Exchange:
    """Read until the peer closes (or ``timeout`` passes); never raises on a reset."""
    t0 = time.monotonic()
    out = bytearray()
    closed = False
    while time.monotonic() - t0 < timeout:
        sock.settimeout(max(timeout - (time.monotonic() - t0), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # ECONNRESET: closed hard, which is closed
            closed = True
            break
        if not chunk:
            closed = True
            break
        out += chunk
    data = bytes(out)
    return Exchange(data, closed, time.monotonic() - t0, split_pdus(data))


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """One whole PDU (type, body)."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            raise ConnectionError("closed while reading a PDU header")
        head += chunk
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            raise ConnectionError("closed inside a PDU")
        body += chunk
    return pdu_type, bytes(body)


def send_all(sock: socket.socket, chunks: list[bytes]) -> bool:
    """Send; False if the peer had already closed (which is an answer, not an error)."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
        return True
    except OSError:
        return False


def exchange(
    port: int, chunks: list[bytes], timeout: float = 15.0, half_close: bool = True
) -> Exchange:
    """Connect, send ``chunks``, optionally half-close our side, and read until closed."""
    with connect(port) as sock:
        sent = send_all(sock, chunks)
        if half_close and sent:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, timeout)


def associated(port: int, rq: bytes | None = None, patience: float = 20.0) -> socket.socket:
    """A raw socket with an established association (A-ASSOCIATE-AC received).

    A transient rejection (result 2: the node's association limit) is retried, as an SCU
    does: connections that earlier cases broke can hold a slot for up to the ACSE timeout.
    """
    deadline = time.monotonic() + patience
    while True:
        sock = connect(port)
        sock.sendall(rq or associate_rq())
        pdu_type, body = read_pdu(sock)
        if pdu_type == 0x02:
            return sock
        sock.close()
        if pdu_type == 0x03 and body[1] == 0x02 and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        raise ConnectionError(f"association not accepted: PDU type 0x{pdu_type:02X} {body[:16]!r}")


# -- mutations ----------------------------------------------------------------------------


def _set_u32(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack(">I", value & 0xFFFFFFFF) + data[at + 4 :]


def _set_u16(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack(">H", value & 0xFFFF) + data[at + 2 :]


def _item_offsets(data: bytes, start: int) -> list[int]:
    """Offsets of the variable items after a PDU's fixed fields (A-ASSOCIATE-RQ: 74)."""
    out = []
    pos = start
    while pos + 4 <= len(data):
        out.append(pos)
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 4 + length
    return out


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, item_start: int | None = None) -> tuple[str, bytes]:
    """One or two mutations of a PDU's bytes, described."""
    kinds = ["bitflip", "truncate", "overwrite", "insert", "pdu_length", "pdu_type"]
    if item_start is not None:
        kinds += ["item_length", "item_length", "item_type"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bitflip":
        flips = draw(
            st.lists(
                st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=6
            )
        )
        out = bytearray(data)
        for pos, bit in flips:
            out[pos] ^= 1 << bit
        return f"bitflip {flips}", bytes(out)
    if kind == "truncate":
        at = draw(st.integers(0, len(data) - 1))
        return f"truncate at {at}", data[:at]
    if kind == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        return f"overwrite {junk!r} at {at}", data[:at] + junk + data[at + len(junk) :]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.binary(min_size=1, max_size=32))
        return f"insert {junk!r} at {at}", data[:at] + junk + data[at:]
    if kind == "pdu_length":
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 5, 0xFFFFFFFF, 0x7FFFFFFF, len(data) - 5, len(data) - 7]),
                st.integers(0, 0xFFFFFFFF),
            )
        )
        return f"PDU length -> 0x{value:X}", _set_u32(data, 2, value)
    if kind == "pdu_type":
        value = draw(st.integers(0, 255))
        return f"PDU type -> 0x{value:02X}", bytes([value]) + data[1:]
    offsets = _item_offsets(data, item_start or 0) or [item_start or 0]
    at = draw(st.sampled_from(offsets))
    if kind == "item_length":
        value = draw(st.one_of(st.sampled_from([0, 1, 3, 0xFFFF]), st.integers(0, 0xFFFF)))
        return f"item at {at}: length -> 0x{value:X}", _set_u16(data, at + 2, value)
    value = draw(st.integers(0, 255))
    return f"item at {at}: type -> 0x{value:02X}", data[:at] + bytes([value]) + data[at + 1 :]


@st.composite
def hostile_connections(draw: st.DrawFn) -> tuple[str, str, list[bytes]]:
    """(kind, description, what to send after connecting). Kinds:

    - ``junk``: random bytes instead of any PDU;
    - ``rq``: a mutated A-ASSOCIATE-RQ;
    - ``pdata``: a good A-ASSOCIATE-RQ, then mutated P-DATA-TF PDUs (C-ECHO, C-STORE);
    - ``order``: a good A-ASSOCIATE-RQ, then PDUs out of order or of unknown type.
    """
    kind = draw(st.sampled_from(["junk", "rq", "rq", "pdata", "pdata", "order"]))
    if kind == "junk":
        data = draw(st.binary(min_size=1, max_size=512))
        return kind, f"{len(data)} random bytes {data[:24]!r}", [data]
    rq = associate_rq()
    if kind == "rq":
        desc, data = draw(mutated_bytes(rq, item_start=74))
        return kind, f"A-ASSOCIATE-RQ {desc}", [data]
    if kind == "pdata":
        which = draw(st.sampled_from(["echo", "store-command", "store-data"]))
        if which == "echo":
            desc, data = draw(mutated_bytes(echo_rq(), item_start=6))
            return kind, f"C-ECHO P-DATA {desc}", [rq, data]
        body = seed("explicit_le").body
        store = store_rq(body, "1.2.3.4", fragment=max(len(body) // 2, 1))
        index = 0 if which == "store-command" else 1
        desc, data = draw(mutated_bytes(store[index], item_start=6))
        chunks = [rq, *store]
        chunks[1 + index] = data
        return kind, f"C-STORE {which} {desc}", chunks
    extra = draw(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [rq, RELEASE_RP, ABORT, pdu(0x02, b"\0" * 68), pdu(0x03, b"\0\x01\x01\x01")]
                ),
                st.builds(lambda t, b: pdu(t, b), st.integers(0x08, 0xFF), st.binary(max_size=32)),
            ),
            min_size=1,
            max_size=3,
        )
    )
    return kind, f"PDUs out of order: {[c[:1].hex() for c in extra]}", [rq, *extra]
