"""Regenerates the C# code in clients/csharp/Generated/ from proto/npc/v1/dialogue.proto.

    .venv/bin/python clients/csharp/generate.py            # rewrite Generated/
    .venv/bin/python clients/csharp/generate.py --check    # exit 1 when Generated/ is stale

Two files, made two ways:

* Generated/Dialogue.cs, the message classes: the system `protoc` (Debian's protobuf-compiler) with
  its built-in C# generator, exactly
  `protoc --proto_path=proto --csharp_out=clients/csharp/Generated npc/v1/dialogue.proto`.
  grpcio-tools' bundled protoc has no C# generator, so this half needs the system one.
* Generated/DialogueGrpc.cs, the service client: grpc's C# plugin (grpc_csharp_plugin) is not
  packaged for Debian and not on PyPI, so this script writes what that plugin writes with the
  option `no_server` (the `GrpcServices="Client"` of Grpc.Tools). It follows grpc's
  src/compiler/csharp_generator.cc line for line: the same header, `#pragma`, helpers, marshallers,
  `__Method_*` fields, doc comments taken from the proto's comments, client constructors and the
  blocking/async overloads, with the same indentation. It reads the service from a descriptor set
  (with source info, for the comments) that grpcio-tools' protoc writes, so it needs no system tool.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"
PROTO = "npc/v1/dialogue.proto"
OUT_DIR = HERE / "Generated"
MESSAGES_FILE = "Dialogue.cs"
SERVICES_FILE = "DialogueGrpc.cs"
# The protoc that made the checked-in Dialogue.cs (other versions may lay the file out differently).
PROTOC_VERSION = "libprotoc 3.21.12"

# FileDescriptorProto.syntax, FileDescriptorProto.service and ServiceDescriptorProto.method: the
# field numbers that SourceCodeInfo paths use.
_SYNTAX, _SERVICE, _METHOD = 12, 6, 2


# --------------------------------------------------------------------------------------------
# Descriptors


def descriptor_set(proto_root: Path = PROTO_ROOT, proto: str = PROTO) -> descriptor_pb2.FileDescriptorSet:
    """The proto and its imports as a FileDescriptorSet with source info (comments), from
    grpcio-tools' bundled protoc."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            "--include_imports", "--include_source_info", f"--descriptor_set_out={out}", proto,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _pascal(name: str) -> str:
    """protobuf's UnderscoresToPascalCase for file names: 'npc_dialogue' -> 'NpcDialogue'."""
    out, upper = [], True
    for ch in name:
        if not ch.isalnum():
            upper = True
        elif upper:
            out.append(ch.upper())
            upper = False
        else:
            out.append(ch)
            upper = ch.isdigit()
    return "".join(out)


def _namespace(file: descriptor_pb2.FileDescriptorProto) -> str:
    if file.options.HasField("csharp_namespace"):
        return file.options.csharp_namespace
    return ".".join(_pascal(part) for part in file.package.split(".")) if file.package else ""


def reflection_class(file: descriptor_pb2.FileDescriptorProto) -> str:
    """protoc's C# umbrella class: global::<namespace>.<FileName>Reflection."""
    name = _pascal(Path(file.name).stem) + "Reflection"
    namespace = _namespace(file)
    return f"global::{namespace}.{name}" if namespace else f"global::{name}"


def _message_classes(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """'.npc.v1.TalkRequest' -> 'global::Npc.V1.TalkRequest' (nested: Outer.Types.Inner), as
    protoc's C# GetClassName."""
    classes: dict[str, str] = {}

    def walk(messages, proto_prefix: str, cs_prefix: str) -> None:
        for message in messages:
            full = f"{proto_prefix}.{message.name}"
            classes[full] = f"{cs_prefix}{message.name}"
            walk(message.nested_type, full, f"{cs_prefix}{message.name}.Types.")

    for file in files:
        namespace = _namespace(file)
        proto_prefix = f".{file.package}" if file.package else ""
        walk(file.message_type, proto_prefix, f"global::{namespace}." if namespace else "global::")
    return classes


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], object]:
    """SourceCodeInfo locations by path."""
    return {tuple(loc.path): loc for loc in file.source_code_info.location}


# --------------------------------------------------------------------------------------------
# A google::protobuf::io::Printer: two spaces per Indent(), written before the first character
# of every non-empty line.


class _Printer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.indent = 0
        self.at_line_start = True

    def print(self, text: str) -> None:
        for ch in text:
            if self.at_line_start and ch != "\n":
                self.parts.append("  " * self.indent)
            self.at_line_start = ch == "\n"
            self.parts.append(ch)

    def text(self) -> str:
        return "".join(self.parts)


GENERATED = '[global::System.CodeDom.Compiler.GeneratedCode("grpc_csharp_plugin", null)]\n'


def _getline_split(text: str) -> list[str]:
    """std::getline over the text: no empty last piece after a final newline."""
    return text.split("\n")[:-1] if text.endswith("\n") else (text.split("\n") if text else [])


def _doc_comment_body(out: _Printer, location) -> bool:
    """GenerateDocCommentBodyImpl: the leading (else trailing) comment as a <summary>."""
    if location is None:
        return False
    comments = location.leading_comments or location.trailing_comments
    if not comments:
        return False
    comments = comments.replace("&", "&amp;").replace("<", "&lt;")
    out.print("/// <summary>\n")
    last_was_empty = False
    for line in _getline_split(comments):
        if not line:
            last_was_empty = True
        else:
            if last_was_empty:
                out.print("///\n")
            last_was_empty = False
            out.print(f"///{line}\n")
    out.print("/// </summary>\n")
    return True


def _file_comments(file: descriptor_pb2.FileDescriptorProto) -> str:
    """GetCsharpComments(file, true): detached then attached comments above `syntax`, as // lines."""
    location = _comments(file).get((_SYNTAX,))
    if location is None:
        return ""
    lines: list[str] = []
    for detached in location.leading_detached_comments:
        lines += _getline_split(detached)
        lines.append("")
    lines += _getline_split(location.leading_comments)
    return "".join("//\n" if not ln else f"//{ln}\n" if ln[0] == " " else f"// {ln}\n" for ln in lines)


def _client_method_doc(out: _Printer, location, method, is_sync: bool, use_call_options: bool) -> None:
    if not _doc_comment_body(out, location):
        return
    if not method.client_streaming:
        out.print('/// <param name="request">The request to send to the server.</param>\n')
    if not use_call_options:
        out.print(
            '/// <param name="headers">The initial metadata to send with the call. This parameter is '
            "optional.</param>\n"
            '/// <param name="deadline">An optional deadline for the call. The call will be cancelled if deadline is '
            "hit.</param>\n"
            '/// <param name="cancellationToken">An optional token for canceling the call.</param>\n'
        )
    else:
        out.print('/// <param name="options">The options for the call.</param>\n')
    if is_sync:
        out.print("/// <returns>The response received from the server.</returns>\n")
    else:
        out.print("/// <returns>The call object.</returns>\n")


def method_type(method) -> str:
    """grpc::MethodType of a MethodDescriptorProto, as the C# plugin names it."""
    if method.client_streaming:
        return "DuplexStreaming" if method.server_streaming else "ClientStreaming"
    return "ServerStreaming" if method.server_streaming else "Unary"


def _obsolete(out: _Printer, deprecated: bool) -> None:
    if deprecated:
        out.print("[global::System.ObsoleteAttribute]\n")


def render_services(fds: descriptor_pb2.FileDescriptorSet | None = None, proto: str = PROTO) -> str:
    """What `protoc --grpc_out=no_server:DIR --plugin=protoc-gen-grpc=grpc_csharp_plugin` writes
    for `proto` (DialogueGrpc.cs)."""
    fds = fds or descriptor_set(proto=proto)
    files = list(fds.file)
    file = next(f for f in files if f.name == proto)
    if not file.service:
        return ""
    classes = _message_classes(files)
    locations = _comments(file)
    out = _Printer()

    out.print("// <auto-generated>\n")
    out.print("//     Generated by the protocol buffer compiler.  DO NOT EDIT!\n")
    out.print(f"//     source: {file.name}\n")
    out.print("// </auto-generated>\n")
    leading = _file_comments(file)
    if leading:
        out.print("// Original file comments:\n")
        out.print(leading)  # PrintRaw: no $ substitution, same indentation
    out.print("#pragma warning disable 0414, 1591, 8981, 0612\n")
    out.print("#region Designer generated code\n")
    out.print("\n")
    out.print("using grpc = global::Grpc.Core;\n")
    out.print("\n")
    namespace = _namespace(file)
    if namespace:
        out.print(f"namespace {namespace} {{\n")
        out.indent += 1
    for index, service in enumerate(file.service):
        _render_service(out, file, index, service, classes, locations)
    if namespace:
        out.indent -= 1
        out.print("}\n")
    out.print("#endregion\n")
    return out.text()


def _render_service(out: _Printer, file, index: int, service, classes, locations) -> None:
    name, client = service.name, service.name + "Client"
    _doc_comment_body(out, locations.get((_SERVICE, index)))
    _obsolete(out, service.options.deprecated)
    out.print(f"public static partial class {name}\n")
    out.print("{\n")
    out.indent += 1
    out.print(f'static readonly string __ServiceName = "{file.package + "." if file.package else ""}{name}";\n')
    out.print("\n")

    def marshaller(type_name: str) -> str:
        return "__Marshaller_" + type_name.lstrip(".").replace(".", "_")

    used: list[str] = []
    for method in service.method:
        for type_name in (method.input_type, method.output_type):
            if type_name not in used:
                used.append(type_name)
    if used:
        out.print(GENERATED)
        out.print(
            "static void __Helper_SerializeMessage(global::Google.Protobuf.IMessage message, "
            "grpc::SerializationContext context)\n{\n"
        )
        out.indent += 1
        out.print("#if !GRPC_DISABLE_PROTOBUF_BUFFER_SERIALIZATION\n")
        out.print("if (message is global::Google.Protobuf.IBufferMessage)\n{\n")
        out.indent += 1
        out.print(
            "context.SetPayloadLength(message.CalculateSize());\n"
            "global::Google.Protobuf.MessageExtensions.WriteTo(message, context.GetBufferWriter());\n"
            "context.Complete();\n"
            "return;\n"
        )
        out.indent -= 1
        out.print("}\n#endif\n")
        out.print("context.Complete(global::Google.Protobuf.MessageExtensions.ToByteArray(message));\n")
        out.indent -= 1
        out.print("}\n\n")

        out.print(GENERATED)
        out.print("static class __Helper_MessageCache<T>\n{\n")
        out.indent += 1
        out.print(
            "public static readonly bool IsBufferMessage = global::System.Reflection.IntrospectionExtensions"
            ".GetTypeInfo(typeof(global::Google.Protobuf.IBufferMessage)).IsAssignableFrom(typeof(T));\n"
        )
        out.indent -= 1
        out.print("}\n\n")

        out.print(GENERATED)
        out.print(
            "static T __Helper_DeserializeMessage<T>(grpc::DeserializationContext context, "
            "global::Google.Protobuf.MessageParser<T> parser) where T : global::Google.Protobuf.IMessage<T>\n{\n"
        )
        out.indent += 1
        out.print("#if !GRPC_DISABLE_PROTOBUF_BUFFER_SERIALIZATION\nif (__Helper_MessageCache<T>.IsBufferMessage)\n{\n")
        out.indent += 1
        out.print("return parser.ParseFrom(context.PayloadAsReadOnlySequence());\n")
        out.indent -= 1
        out.print("}\n#endif\n")
        out.print("return parser.ParseFrom(context.PayloadAsNewBuffer());\n")
        out.indent -= 1
        out.print("}\n\n")
    for type_name in used:
        cls = classes[type_name]
        out.print(GENERATED)
        out.print(
            f"static readonly grpc::Marshaller<{cls}> {marshaller(type_name)} = grpc::Marshallers.Create("
            f"__Helper_SerializeMessage, context => __Helper_DeserializeMessage(context, {cls}.Parser));\n"
        )
    out.print("\n")

    for method in service.method:
        request, response = classes[method.input_type], classes[method.output_type]
        out.print(GENERATED)
        out.print(
            f"static readonly grpc::Method<{request}, {response}> __Method_{method.name} = "
            f"new grpc::Method<{request}, {response}>(\n"
        )
        out.indent += 2
        out.print(f"grpc::MethodType.{method_type(method)},\n")
        out.print("__ServiceName,\n")
        out.print(f'"{method.name}",\n')
        out.print(f"{marshaller(method.input_type)},\n")
        out.print(f"{marshaller(method.output_type)});\n")
        out.print("\n")
        out.indent -= 2

    out.print("/// <summary>Service descriptor</summary>\n")
    out.print("public static global::Google.Protobuf.Reflection.ServiceDescriptor Descriptor\n")
    out.print("{\n")
    out.print(f"  get {{ return {reflection_class(file)}.Descriptor.Services[{index}]; }}\n")
    out.print("}\n")
    out.print("\n")

    # GenerateClientStub (no server parts: the plugin's `no_server` option).
    out.print(f"/// <summary>Client for {name}</summary>\n")
    _obsolete(out, service.options.deprecated)
    out.print(f"public partial class {client} : grpc::ClientBase<{client}>\n")
    out.print("{\n")
    out.indent += 1
    out.print(
        f"/// <summary>Creates a new client for {name}</summary>\n"
        '/// <param name="channel">The channel to use to make remote calls.</param>\n'
    )
    out.print(GENERATED)
    out.print(f"public {client}(grpc::ChannelBase channel) : base(channel)\n")
    out.print("{\n}\n")
    out.print(
        f"/// <summary>Creates a new client for {name} that uses a custom <c>CallInvoker</c>.</summary>\n"
        '/// <param name="callInvoker">The callInvoker to use to make remote calls.</param>\n'
    )
    out.print(GENERATED)
    out.print(f"public {client}(grpc::CallInvoker callInvoker) : base(callInvoker)\n")
    out.print("{\n}\n")
    out.print("/// <summary>Protected parameterless constructor to allow creation of test doubles.</summary>\n")
    out.print(GENERATED)
    out.print(f"protected {client}() : base()\n")
    out.print("{\n}\n")
    out.print(
        "/// <summary>Protected constructor to allow creation of configured clients.</summary>\n"
        '/// <param name="configuration">The client configuration.</param>\n'
    )
    out.print(GENERATED)
    out.print(f"protected {client}(ClientBaseConfiguration configuration) : base(configuration)\n")
    out.print("{\n}\n\n")

    call_args = (
        "grpc::Metadata headers = null, global::System.DateTime? deadline = null, "
        "global::System.Threading.CancellationToken cancellationToken = "
        "default(global::System.Threading.CancellationToken)"
    )
    for m_index, method in enumerate(service.method):
        location = locations.get((_SERVICE, index, _METHOD, m_index))
        deprecated = method.options.deprecated
        request, response = classes[method.input_type], classes[method.output_type]
        unary = not method.client_streaming and not method.server_streaming
        if unary:
            _client_method_doc(out, location, method, True, False)
            _obsolete(out, deprecated)
            out.print(GENERATED)
            out.print(f"public virtual {response} {method.name}({request} request, {call_args})\n")
            out.print("{\n")
            out.indent += 1
            out.print(f"return {method.name}(request, new grpc::CallOptions(headers, deadline, cancellationToken));\n")
            out.indent -= 1
            out.print("}\n")
            _client_method_doc(out, location, method, True, True)
            _obsolete(out, deprecated)
            out.print(GENERATED)
            out.print(f"public virtual {response} {method.name}({request} request, grpc::CallOptions options)\n")
            out.print("{\n")
            out.indent += 1
            out.print(f"return CallInvoker.BlockingUnaryCall(__Method_{method.name}, null, options, request);\n")
            out.indent -= 1
            out.print("}\n")

        method_name = method.name + ("Async" if unary else "")
        if method.client_streaming:
            returns = (
                f"grpc::AsyncDuplexStreamingCall<{request}, {response}>"
                if method.server_streaming
                else f"grpc::AsyncClientStreamingCall<{request}, {response}>"
            )
            request_param, request_arg = "", ""
        else:
            returns = (
                f"grpc::AsyncServerStreamingCall<{response}>"
                if method.server_streaming
                else f"grpc::AsyncUnaryCall<{response}>"
            )
            request_param, request_arg = f"{request} request, ", "request, "
        _client_method_doc(out, location, method, False, False)
        _obsolete(out, deprecated)
        out.print(GENERATED)
        out.print(f"public virtual {returns} {method_name}({request_param}{call_args})\n")
        out.print("{\n")
        out.indent += 1
        out.print(f"return {method_name}({request_arg}new grpc::CallOptions(headers, deadline, cancellationToken));\n")
        out.indent -= 1
        out.print("}\n")
        _client_method_doc(out, location, method, False, True)
        _obsolete(out, deprecated)
        out.print(GENERATED)
        out.print(f"public virtual {returns} {method_name}({request_param}grpc::CallOptions options)\n")
        out.print("{\n")
        out.indent += 1
        field = f"__Method_{method.name}"
        if unary:
            out.print(f"return CallInvoker.AsyncUnaryCall({field}, null, options, request);\n")
        elif method.client_streaming and not method.server_streaming:
            out.print(f"return CallInvoker.AsyncClientStreamingCall({field}, null, options);\n")
        elif method.server_streaming and not method.client_streaming:
            out.print(f"return CallInvoker.AsyncServerStreamingCall({field}, null, options, request);\n")
        else:
            out.print(f"return CallInvoker.AsyncDuplexStreamingCall({field}, null, options);\n")
        out.indent -= 1
        out.print("}\n")

    out.print("/// <summary>Creates a new instance of client from given <c>ClientBaseConfiguration</c>.</summary>\n")
    out.print(GENERATED)
    out.print(f"protected override {client} NewInstance(ClientBaseConfiguration configuration)\n")
    out.print("{\n")
    out.indent += 1
    out.print(f"return new {client}(configuration);\n")
    out.indent -= 1
    out.print("}\n")
    out.indent -= 1
    out.print("}\n")
    out.print("\n")

    out.indent -= 1
    out.print("}\n")


# --------------------------------------------------------------------------------------------
# Messages: the system protoc


def protoc_command(out_dir: Path | str, protoc: str = "protoc") -> list[str]:
    """The exact command that makes Dialogue.cs (run from the repository root)."""
    return [protoc, "--proto_path=proto", f"--csharp_out={out_dir}", PROTO]


def find_protoc() -> str | None:
    return shutil.which("protoc")


def protoc_version(protoc: str) -> str:
    return subprocess.run([protoc, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def render_messages(protoc: str | None = None) -> str:
    """Dialogue.cs as the system protoc writes it. FileNotFoundError when there is no protoc."""
    protoc = protoc or find_protoc()
    if protoc is None:
        raise FileNotFoundError("no `protoc` on PATH: install Debian's protobuf-compiler")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(protoc_command(tmp, protoc), cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
        return (Path(tmp) / MESSAGES_FILE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------


def _diff(name: str, current: Path, fresh: str) -> list[str]:
    if not current.is_file():
        return [f"missing: {current}"]
    text = current.read_text(encoding="utf-8")
    if text == fresh:
        return []
    old, new = text.splitlines(), fresh.splitlines()
    line = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
    was = old[line] if line < len(old) else "<end of file>"
    now = new[line] if line < len(new) else "<end of file>"
    return [f"differs: {current} ({name}): line {line + 1} is {was.strip()!r}, fresh: {now.strip()!r}"]


def check_services(out_dir: Path = OUT_DIR) -> list[str]:
    """Problems with the checked-in DialogueGrpc.cs; empty when up to date."""
    return _diff("service client", out_dir / SERVICES_FILE, render_services())


def check_messages(out_dir: Path = OUT_DIR, protoc: str | None = None) -> list[str]:
    """Problems with the checked-in Dialogue.cs; empty when up to date. Needs the system protoc."""
    problems = _diff("messages", out_dir / MESSAGES_FILE, render_messages(protoc))
    version = protoc_version(protoc or find_protoc() or "protoc")
    if problems and version != PROTOC_VERSION:
        problems.append(f"note: Dialogue.cs was made with {PROTOC_VERSION}, this protoc is {version}")
    return problems


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / SERVICES_FILE, out_dir / MESSAGES_FILE]
    written[0].write_text(render_services(), encoding="utf-8")
    written[1].write_text(render_messages(), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: clients/csharp/Generated)")
    parser.add_argument("--check", action="store_true", help="only report whether --out is up to date (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_services(args.out) + check_messages(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("C# code is stale: run `python clients/csharp/generate.py`", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
