"""Python SDK for imgd: the gRPC code generated from proto/ (client/python/generate.sh) and two
helpers, connect() and error_info().

    import imgd_sdk
    from imgd_sdk import pb
    stub = imgd_sdk.connect()                       # $IMGD_ADDR, else the agent's Unix socket
    image = stub.GetImage(pb.GetImageRequest(image="python")).image
"""
import os

import grpc

from imgd_sdk.imgd.v1 import imgd_pb2 as pb
from imgd_sdk.imgd.v1 import imgd_pb2_grpc as pb_grpc
from imgd_sdk.google.rpc import error_details_pb2, status_pb2

__all__ = ["DEFAULT_ADDR", "connect", "error_info", "pb", "pb_grpc", "status_pb2", "error_details_pb2"]

DEFAULT_ADDR = "unix:/run/imgd/agent/imgd.sock"


def connect(address=None):
    """An ImageService stub for `address` (unix:/path or host:port), else $IMGD_ADDR, else
    DEFAULT_ADDR. TLS as imgctl's: any of $IMGD_CLIENT_TLS_CA/_CERT/_KEY set means TLS."""
    address = address or os.environ.get("IMGD_ADDR") or DEFAULT_ADDR
    tls = [os.environ.get("IMGD_CLIENT_TLS_" + k) for k in ("CA", "KEY", "CERT")]
    if any(tls):
        if bool(tls[1]) != bool(tls[2]):
            raise ValueError("a client certificate and its key go together (IMGD_CLIENT_TLS_CERT, IMGD_CLIENT_TLS_KEY)")
        ca, key, cert = (open(f, "rb").read() if f else None for f in tls)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.insecure_channel(address)
    return pb_grpc.ImageServiceStub(channel)


def error_info(rpc_error):
    """The google.rpc.ErrorInfo the agent put in a failed call's status details
    (grpc-status-details-bin trailer), or None when there is none."""
    trailers = rpc_error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None
