"""Builds the gRPC stubs from the repository's .proto when the package is built.

The stubs (likeness/v1/likeness_pb2*.py) are generated, never committed. They come from
proto/likeness/v1/likeness.proto at the repository's root (two folders up), or, in an
sdist, from the copy that `sdist` puts beside this file. The protoc is the one inside
grpcio-tools, a build requirement (pyproject.toml). The stubs refuse to import under a
grpcio or protobuf older than the ones they were made for, so the build checks that
pyproject.toml's floors for both are at least those versions.
"""

import os
import re
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join("likeness", "v1", "likeness.proto")


def proto_root():
    for root in (os.path.join(HERE, "..", "..", "proto"), os.path.join(HERE, "proto")):
        if os.path.isfile(os.path.join(root, PROTO)):
            return os.path.normpath(root)
    raise FileNotFoundError(f"{PROTO} not found in ../../proto (a checkout) or ./proto (an sdist)")


def generate(out_dir):
    """Writes likeness/v1/{__init__,likeness_pb2,likeness_pb2_grpc}.py(i) under out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    # protoc maps the proto package likeness.v1 to the module path likeness/v1/, so the
    # stubs land inside this package and their own imports (`from likeness.v1 import
    # likeness_pb2`) resolve with no rewriting.
    os.makedirs(os.path.join(out_dir, "likeness", "v1"), exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(root, PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + os.path.join(root, PROTO))
    init = os.path.join(out_dir, "likeness", "v1", "__init__.py")
    with open(init, "w") as f:
        f.write('"""Generated from proto/likeness/v1/likeness.proto at build time."""\n')
    check_floors(os.path.join(out_dir, "likeness", "v1"))


def version(text):
    return tuple(int(x) for x in text.split("."))


def declared_floors():
    """pyproject.toml's lower bounds for grpcio and protobuf, as version tuples."""
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    found = dict(re.findall(r'"(grpcio|protobuf)>=([0-9.]+)', text))
    return {name: version(v) for name, v in found.items()}


def needed_versions(stubs):
    """The grpcio and protobuf versions the generated stubs check for at import."""
    needs = {}
    with open(os.path.join(stubs, "likeness_pb2_grpc.py"), encoding="utf-8") as f:
        m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", f.read())
    if m:
        needs["grpcio"] = version(m.group(1))
    check = r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),"
    with open(os.path.join(stubs, "likeness_pb2.py"), encoding="utf-8") as f:
        m = re.search(check, f.read())
    if m:
        needs["protobuf"] = tuple(int(x) for x in m.groups())
    return needs


def check_floors(stubs):
    floors = declared_floors()
    for name, needed in needed_versions(stubs).items():
        floor = floors.get(name, (0,))
        if floor < needed:
            raise RuntimeError(
                f"the stubs need {name}>={'.'.join(map(str, needed))} but pyproject.toml "
                f"promises {name}>={'.'.join(map(str, floor))}: build with the grpcio-tools "
                "that pyproject.toml pins, or raise the floor"
            )


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        # An editable install imports from src/, so the stubs go there (git ignores them).
        target = os.path.join(HERE, "src") if self.editable_mode else self.build_lib
        generate(target)

    def get_outputs(self, include_bytecode=True):
        # Lets editable and wheel builds know about the generated modules.
        outputs = super().get_outputs(include_bytecode)
        base = os.path.join(self.build_lib, "likeness", "v1")
        names = ["__init__.py", "likeness_pb2.py", "likeness_pb2.pyi", "likeness_pb2_grpc.py"]
        return outputs + [os.path.join(base, n) for n in names]


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        dest = os.path.join(base_dir, "proto", PROTO)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(proto_root(), PROTO), dest)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
