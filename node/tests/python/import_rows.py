"""Streams an import of N rows to a Hufu node with grpcio, the way an
operator's own Python tooling would: one message per row, as grpcio sends
them (each in its own HTTP/2 DATA frame).

usage: import_rows.py STUBS_DIR ENDPOINT CA CERT KEY ROWS
Prints the summary as JSON: {"accepted": N, "rejected_count": N, "seconds": S}.
"""

import json
import sys
import time

stubs, endpoint, ca, cert, key, rows = sys.argv[1:7]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from hufu.v1 import admin_pb2, admin_pb2_grpc, status_pb2  # noqa: E402

WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def national_id(n):
    """A valid GB 11643 id, distinct for each n below 10^7: Guangdong
    (440000), a birth date stepping one day per thousand holders, and a
    sequence number."""
    day, seq = divmod(n, 1000)
    year, day = 1930 + day // 336, day % 336
    month, day = day // 28 + 1, day % 28 + 1
    body = "440106%04d%02d%02d%03d" % (year, month, day, seq)
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, WEIGHTS)) % 11]
    return body + check


def requests(count):
    for n in range(count):
        yield admin_pb2.ImportStatusesRequest(
            line=n + 1,
            status=admin_pb2.StatusInput(
                national_id=national_id(n), colour=status_pb2.COLOUR_GREEN
            ),
        )


def read(path):
    with open(path, "rb") as f:
        return f.read()


credentials = grpc.ssl_channel_credentials(
    root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
)
with grpc.secure_channel(endpoint, credentials) as channel:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    started = time.monotonic()
    summary = admin.ImportStatuses(requests(int(rows)), timeout=600)
    print(
        json.dumps(
            {
                "accepted": summary.accepted,
                "rejected_count": summary.rejected_count,
                "seconds": time.monotonic() - started,
            }
        )
    )
