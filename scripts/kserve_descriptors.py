"""Write Triton's KServe v2 protocol (``grpc_service.proto`` + ``model_config.proto``) as a
``FileDescriptorSet``, taken from the generated modules that ship in ``tritonclient``.

The native gRPC front (``server/``) feeds the set to ``protoc --descriptor_set_in`` to generate
its C++ code, so it speaks the exact wire format ``tritonclient`` and ``perf_analyzer`` use
without a copy of Triton's ``.proto`` sources. The set is checked in at
``proto/triton/kserve_descriptors.pb`` (a fresh clone builds without ``tritonclient``); run this
script to refresh it after upgrading ``tritonclient``::

    python scripts/kserve_descriptors.py proto/triton/kserve_descriptors.pb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["descriptor_set", "main"]


def descriptor_set() -> bytes:
    """The serialized ``FileDescriptorSet``: ``model_config.proto`` then ``grpc_service.proto``
    (dependencies first, as ``protoc --descriptor_set_in`` resolves imports by name)."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        # serialized_pb is the FileDescriptorProto exactly as Triton's protoc embedded it.
        fds.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    return fds.SerializeToString(deterministic=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="where to write the FileDescriptorSet")
    args = parser.parse_args(argv)
    data = descriptor_set()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Rewrite only on change, so build tools see an unchanged timestamp when nothing moved.
    if not args.output.exists() or args.output.read_bytes() != data:
        args.output.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
