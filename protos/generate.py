"""Regenerate the Python stubs for protos/pdserve.proto. Run from anywhere: ``python -m pdserve.protos.generate``.

The stubs import ``pdserve.protos``: protoc derives the import path from the .proto's path, so the .proto is
compiled from a scratch tree where it sits at ``pdserve/protos/pdserve.proto``.

Reproducible across grpcio versions: the generated files pin the grpcio / protobuf version that made them
and refuse to import under an older runtime. The stubs use nothing newer than the floors below (the
project's minimum grpcio and protobuf), so those pins are rewritten to the floors. That lets stubs made
here import on a machine with an older grpcio (1.84 on the GPU box) as long as it meets the floor.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRPC_FLOOR = "1.66.0"
PROTOBUF_FLOOR = (5, 28, 0)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pdserve" / "protos"
        src.mkdir(parents=True)
        shutil.copy(ROOT / "protos" / "pdserve.proto", src / "pdserve.proto")
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", "-I", tmp,
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}", "pdserve/protos/pdserve.proto",
        ]
        subprocess.run(cmd, check=True, cwd=tmp)
        for name in ("pdserve_pb2.py", "pdserve_pb2_grpc.py", "pdserve_pb2.pyi"):
            shutil.copy(src / name, ROOT / "protos" / name)
    pb2 = ROOT / "protos" / "pdserve_pb2.py"
    text = re.sub(
        r"(_runtime_version\.Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,",
        r"\g<1>{},\n    {},\n    {},".format(*PROTOBUF_FLOOR),
        pb2.read_text(),
    )
    text = re.sub(r"# Protobuf Python Version: .*\n", "", text)
    pb2.write_text(text)
    grpc_file = ROOT / "protos" / "pdserve_pb2_grpc.py"
    grpc_file.write_text(
        re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", grpc_file.read_text())
    )
    print(f"generated stubs in {pb2.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
