"""The C# client in clients/csharp/ (Unity, Godot .NET).

What these tests can check without a C# compiler (none with the gRPC and protobuf assemblies is
reachable here, so nothing is compiled or run against a sidecar):
* Generated/Dialogue.cs is what the system `protoc --csharp_out` makes from the proto today, and
  Generated/DialogueGrpc.cs what clients/csharp/generate.py makes (grpc's C# plugin layout);
* every .cs file parses as C# (tree-sitter's C# grammar), in every #if configuration;
* DialogueGrpc.cs declares every RPC of the proto, with its method type and message types;
* the hand-written files use only generated members that Dialogue.cs / DialogueGrpc.cs declare.

tree-sitter cannot parse a preprocessor directive in the middle of a declaration (protoc puts an
`#if` inside the base list of every message class), so the files are first run through a small
C# preprocessor (#define/#undef/#if/#elif/#else/#endif, as the compiler's lexer does): each
combination of the symbols the file tests is parsed separately.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import shutil
from pathlib import Path

import pytest

from sidecar.pb.npc.v1 import dialogue_pb2

REPO = Path(__file__).resolve().parent.parent
CSHARP = REPO / "clients" / "csharp"
GENERATED = CSHARP / "Generated"
CS_FILES = sorted(CSHARP.rglob("*.cs"))
HAND_WRITTEN = [p for p in CS_FILES if GENERATED not in p.parents]
EXPECTED_FILES = [
    "Generated/Dialogue.cs",
    "Generated/DialogueGrpc.cs",
    "NpcDialogueClient.cs",
    "Unity/NpcSpeaker.cs",
    "Unity/NpcSidecarConnection.cs",
    "Godot/NpcSpeaker.cs",
]
SERVICE = dialogue_pb2.DESCRIPTOR.services_by_name["NpcDialogue"]
NAMESPACE = dialogue_pb2.DESCRIPTOR.GetOptions().csharp_namespace


def _load_generator():
    spec = importlib.util.spec_from_file_location("clients_csharp_generate", CSHARP / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# --------------------------------------------------------------------------------------------
# Generated code is up to date


def test_expected_files_exist():
    missing = [name for name in EXPECTED_FILES if not (CSHARP / name).is_file()]
    assert not missing, f"missing under clients/csharp: {missing}"


def test_messages_match_protoc():
    if shutil.which("protoc") is None:
        pytest.skip("no system `protoc` (Debian package protobuf-compiler); CI installs it")
    problems = generate.check_messages()
    assert not problems, "clients/csharp/Generated/Dialogue.cs is stale, run `python clients/csharp/generate.py`:\n" + (
        "\n".join(problems)
    )


def test_service_client_matches_generator():
    problems = generate.check_services()
    assert not problems, (
        "clients/csharp/Generated/DialogueGrpc.cs is stale, run `python clients/csharp/generate.py`:\n"
        + "\n".join(problems)
    )


def test_check_reports_a_stale_service_client(tmp_path: Path):
    assert generate.check_services(tmp_path) == [f"missing: {tmp_path / 'DialogueGrpc.cs'}"]
    edited = generate.render_services().replace('"Talk"', '"Chat"')
    (tmp_path / "DialogueGrpc.cs").write_text(edited, encoding="utf-8")
    [problem] = generate.check_services(tmp_path)
    assert problem.startswith(f"differs: {tmp_path / 'DialogueGrpc.cs'}") and '"Chat"' in problem


def test_readme_records_the_protoc_command():
    readme = (CSHARP / "README.md").read_text(encoding="utf-8")
    command = " ".join(generate.protoc_command("clients/csharp/Generated"))
    assert command in readme
    assert generate.PROTOC_VERSION in readme


# --------------------------------------------------------------------------------------------
# A C# preprocessor (conditional sections only) and the parser

_DIRECTIVE = re.compile(r"^\s*#\s*(if|elif|else|endif|define|undef)\b(.*)$")
_TOKEN = re.compile(r"\s*(&&|\|\||==|!=|!|\(|\)|[A-Za-z_][A-Za-z0-9_]*)")


def _condition(expression: str, symbols: set[str]) -> bool:
    """A #if expression: symbols, true, false, !, &&, ||, ==, !=, parentheses."""
    expression = expression.split("//", 1)[0].strip()
    python, pos = [], 0
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if not match:
            raise SyntaxError(f"cannot read #if expression {expression!r}")
        token, pos = match[1], match.end()
        mapped = {"&&": "and", "||": "or", "!": "not", "==": "==", "!=": "!=", "(": "(", ")": ")"}.get(token)
        if mapped is None:
            mapped = "True" if token == "true" else "False" if token == "false" else str(token in symbols)
        python.append(mapped)
    return bool(eval(" ".join(python), {"__builtins__": {}}))  # only True/False/and/or/not/==/!=/()


def preprocess(text: str, defined: frozenset[str] | set[str] = frozenset()) -> str:
    """The text the compiler parses with these symbols defined: conditional directives and
    skipped sections become empty lines (line numbers stay)."""
    symbols, stack, active, out = set(defined), [], True, []
    for number, line in enumerate(text.split("\n"), 1):
        match = _DIRECTIVE.match(line)
        if not match:
            out.append(line if active else "")
            continue
        kind, rest = match[1], match[2]
        if kind in ("define", "undef"):
            if active:
                name = rest.split("//", 1)[0].strip()
                symbols.add(name) if kind == "define" else symbols.discard(name)
        elif kind == "if":
            taken = active and _condition(rest, symbols)
            stack.append([active, taken])
            active = taken
        elif not stack:
            raise SyntaxError(f"line {number}: #{kind} without #if")
        elif kind == "elif":
            parent, done = stack[-1]
            active = parent and not done and _condition(rest, symbols)
            stack[-1][1] = done or active
        elif kind == "else":
            parent, done = stack[-1]
            active = parent and not done
            stack[-1][1] = True
        else:
            active = stack.pop()[0]
        out.append("")
    if stack:
        raise SyntaxError("#if without #endif")
    return "\n".join(out)


def conditional_symbols(text: str) -> list[str]:
    """The symbols a file's #if/#elif lines test."""
    names: set[str] = set()
    for line in text.split("\n"):
        match = _DIRECTIVE.match(line)
        if match and match[1] in ("if", "elif"):
            names |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", match[2].split("//", 1)[0])) - {"true", "false"}
    return sorted(names)


def configurations(text: str) -> list[frozenset[str]]:
    """Every combination of the tested symbols (up to 4 of them), else none and all."""
    names = conditional_symbols(text)
    if len(names) > 4:
        return [frozenset(), frozenset(names)]
    return [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


@functools.cache
def _parser():
    try:
        import tree_sitter
        import tree_sitter_c_sharp
    except ImportError as e:  # pragma: no cover - a setup problem, reported as a failure
        pytest.fail(f"the C# syntax check needs tree-sitter and tree-sitter-c-sharp (the dev extra): {e}")
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_c_sharp.language()))


def parse(text: str):
    return _parser().parse(text.encode("utf-8")).root_node


def syntax_errors(text: str) -> list[str]:
    """'line:column: ERROR near ...' for each ERROR or MISSING node of the parse."""
    errors: list[str] = []

    def walk(node) -> None:
        if node.type == "ERROR" or node.is_missing:
            row, column = node.start_point
            kind = f"MISSING {node.type}" if node.is_missing else "ERROR"
            near = text.encode("utf-8")[node.start_byte : node.start_byte + 60].decode("utf-8", "replace")
            errors.append(f"{row + 1}:{column + 1}: {kind} near {near!r}")
        if node.has_error:
            for child in node.children:
                walk(child)

    walk(parse(text))
    return errors


def test_preprocessor():
    text = "a\n#if X\nb\n#elif Y && !Z\nc\n#else\nd\n#endif\ne"
    assert preprocess(text) == "a\n\n\n\n\n\nd\n\ne"
    assert preprocess(text, {"X"}) == "a\n\nb\n\n\n\n\n\ne"
    assert preprocess(text, {"Y"}) == "a\n\n\n\nc\n\n\n\ne"
    assert preprocess("#define X\n#if (X || false) == true\nx\n#endif") == "\n\nx\n"
    assert conditional_symbols(text) == ["X", "Y", "Z"]
    assert len(configurations(text)) == 8
    with pytest.raises(SyntaxError):
        preprocess("#if X\nx")
    with pytest.raises(SyntaxError):
        preprocess("#endif")


def test_parser_reports_syntax_errors():
    assert syntax_errors("class A { void F() { } }") == []
    assert syntax_errors("class A { void F( { } }")
    assert syntax_errors("class A { void F() { var x = ; } }")
    assert syntax_errors("class A { int F() { return 1 } }")  # a MISSING ';'
    # What tree-sitter cannot read without the preprocessor: protoc's #if in a base list.
    protoc_style = "class A : I\n#if !X\n    , J\n#endif\n{\n}\n"
    assert syntax_errors(protoc_style)
    assert all(syntax_errors(preprocess(protoc_style, c)) == [] for c in configurations(protoc_style))


@pytest.mark.parametrize("path", CS_FILES, ids=lambda p: p.relative_to(CSHARP).as_posix())
def test_cs_file_parses(path: Path):
    text = path.read_text(encoding="utf-8")
    problems = []
    for defined in configurations(text):
        for error in syntax_errors(preprocess(text, defined))[:10]:
            problems.append(f"{path.relative_to(REPO)}:{error} (defined: {sorted(defined) or 'none'})")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# Declarations


def _children(node, *types: str):
    return [c for c in node.children if c.type in types]


def _text(node) -> str:
    return node.text.decode("utf-8")


def _classes(root) -> dict[str, object]:
    """Every class, struct and enum declaration by dotted name ('TalkEvent.Types.X' style nesting
    is kept as written: 'TalkEvent.EventOneofCase')."""
    found: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for child in node.children:
            if child.type in ("class_declaration", "struct_declaration", "enum_declaration", "interface_declaration"):
                name = prefix + _text(child.child_by_field_name("name"))
                found[name] = child
                body = child.child_by_field_name("body")
                if body is not None:
                    walk(body, name + ".")
            elif child.type in ("namespace_declaration", "file_scoped_namespace_declaration", "declaration_list"):
                walk(child, prefix)

    walk(root, "")
    return found


def _members(declaration) -> dict[str, str]:
    """Member name -> declared type text (methods: return type; nested types and enum members: '')."""
    body = declaration.child_by_field_name("body")
    members: dict[str, str] = {}
    for child in body.children if body is not None else []:
        if child.type == "enum_member_declaration":
            members[_text(child.child_by_field_name("name"))] = ""
        elif child.type == "property_declaration":
            members[_text(child.child_by_field_name("name"))] = _text(child.child_by_field_name("type"))
        elif child.type == "method_declaration":
            members[_text(child.child_by_field_name("name"))] = _text(child.child_by_field_name("returns"))
        elif child.type == "field_declaration":
            declaration_node = _children(child, "variable_declaration")[0]
            for declarator in _children(declaration_node, "variable_declarator"):
                members[_text(declarator.child_by_field_name("name"))] = _text(
                    declaration_node.child_by_field_name("type")
                )
        elif child.type in ("class_declaration", "struct_declaration", "enum_declaration"):
            members[_text(child.child_by_field_name("name"))] = ""
    return members


@functools.cache
def _generated() -> tuple[dict[str, object], dict[str, object]]:
    """Declarations of Dialogue.cs and DialogueGrpc.cs (no #if symbols defined)."""
    messages = _classes(parse(preprocess((GENERATED / "Dialogue.cs").read_text(encoding="utf-8"))))
    services = _classes(parse(preprocess((GENERATED / "DialogueGrpc.cs").read_text(encoding="utf-8"))))
    return messages, services


def _cs_type(message_descriptor) -> str:
    return f"global::{NAMESPACE}.{message_descriptor.name}"


def test_service_client_declares_every_rpc():
    _, services = _generated()
    service = services["NpcDialogue"]
    client = services["NpcDialogue.NpcDialogueClient"]
    assert _text(_children(service, "modifier")[0]) == "public"
    assert _text(_children(client, "base_list")[0]) == ": grpc::ClientBase<NpcDialogueClient>"

    fields = {}
    for field in _children(service.child_by_field_name("body"), "field_declaration"):
        declarator = _children(_children(field, "variable_declaration")[0], "variable_declarator")[0]
        fields[_text(declarator.child_by_field_name("name"))] = declarator
    service_name = _text(_children(fields["__ServiceName"], "string_literal")[0])
    assert service_name == f'"{SERVICE.full_name}"'

    declared = {name.removeprefix("__Method_") for name in fields if name.startswith("__Method_")}
    assert declared == {m.name for m in SERVICE.methods}, "RPCs in DialogueGrpc.cs differ from the proto's"

    client_methods: dict[str, list[tuple[str, str]]] = {}
    for method in _children(client.child_by_field_name("body"), "method_declaration"):
        name = _text(method.child_by_field_name("name"))
        params = _text(method.child_by_field_name("parameters"))
        client_methods.setdefault(name, []).append((_text(method.child_by_field_name("returns")), params))

    for rpc in SERVICE.methods:
        request, response = _cs_type(rpc.input_type), _cs_type(rpc.output_type)
        kind = {
            (False, False): "Unary",
            (False, True): "ServerStreaming",
            (True, False): "ClientStreaming",
            (True, True): "DuplexStreaming",
        }[(rpc.client_streaming, rpc.server_streaming)]
        request_marshaller = "__Marshaller_" + rpc.input_type.full_name.replace(".", "_")
        response_marshaller = "__Marshaller_" + rpc.output_type.full_name.replace(".", "_")
        creation = _children(fields[f"__Method_{rpc.name}"], "object_creation_expression")[0]
        assert _text(creation.child_by_field_name("type")) == f"grpc::Method<{request}, {response}>", rpc.name
        arguments = [_text(a) for a in _children(creation.child_by_field_name("arguments"), "argument")]
        assert arguments == [
            f"grpc::MethodType.{kind}",
            "__ServiceName",
            f'"{rpc.name}"',
            request_marshaller,
            response_marshaller,
        ], rpc.name
        assert request_marshaller in fields and response_marshaller in fields, rpc.name

        if kind == "Unary":
            expected = {
                rpc.name: [response, response],
                rpc.name + "Async": [f"grpc::AsyncUnaryCall<{response}>"] * 2,
            }
        elif kind == "ServerStreaming":
            expected = {rpc.name: [f"grpc::AsyncServerStreamingCall<{response}>"] * 2}
        else:  # not in npc.v1 today; the generator handles them, this test would need extending
            pytest.fail(f"{rpc.name}: {kind} RPCs are not checked yet")
        for name, returns in expected.items():
            overloads = client_methods.get(name, [])
            assert [r for r, _ in overloads] == returns, f"NpcDialogueClient.{name}"
            for _, params in overloads:
                assert params.startswith(f"({request} request, "), f"NpcDialogueClient.{name}{params}"
            assert any(p.endswith("grpc::CallOptions options)") for _, p in overloads), name
            assert any("global::System.Threading.CancellationToken cancellationToken" in p for _, p in overloads)


# --------------------------------------------------------------------------------------------
# The hand-written files against the generated code

# Members of every protobuf message that come from Google.Protobuf, not from Dialogue.cs.
_PROTOBUF_MESSAGE_MEMBERS = {"ToByteArray", "ToByteString", "WriteTo", "WriteDelimitedTo", "ToString", "Equals"}


# Nodes that open a scope for the names declared in them.
_SCOPES = {
    "block", "foreach_statement", "for_statement", "using_statement", "catch_clause", "method_declaration",
    "constructor_declaration", "local_function_statement", "lambda_expression", "accessor_declaration",
    "declaration_list", "compilation_unit",
}  # fmt: skip


def _simple(type_text: str) -> str:
    return re.split(r"::|\.", type_text.strip())[-1]


@functools.cache
def _extension_methods() -> dict[str, frozenset[str]]:
    """Generated type -> names of the extension methods the hand-written files declare for it
    (`static T AddEntities(this TalkRequest request, ...)`), which calls may use as members."""
    found: dict[str, set[str]] = {}

    def walk(node) -> None:
        if node.type == "method_declaration":
            parameters = _children(node.child_by_field_name("parameters"), "parameter")
            if parameters and "this" in [_text(m) for m in _children(parameters[0], "modifier")]:
                extended = _text(parameters[0].child_by_field_name("type")).removeprefix(f"{NAMESPACE}.")
                found.setdefault(extended, set()).add(_text(node.child_by_field_name("name")))
        for child in node.children:
            walk(child)

    for path in HAND_WRITTEN:
        walk(parse(preprocess(path.read_text(encoding="utf-8"))))
    return {name: frozenset(methods) for name, methods in found.items()}


def _generated_uses(path: Path) -> list[str]:
    """Checks every use of a generated type in a hand-written file that can be resolved without a
    compiler: `new T { A = ... }`, `T.Member`, and member chains from variables and parameters
    declared with a generated type (`TalkEvent e` ... `e.Delta.Text`). Returns the unknown ones.
    Extension methods the hand-written files declare count as members of the type they extend."""
    messages, services = _generated()
    types = {name: _members(node) for name, node in messages.items()}
    for extended, methods in _extension_methods().items():
        if extended in types:
            types[extended] = {**types[extended], **dict.fromkeys(methods, "")}
    root = parse(preprocess(path.read_text(encoding="utf-8")))
    variables: dict[tuple[int, str], set[str]] = {}  # (scope node id, name) -> generated types
    problems: list[str] = []

    def scope_of(node):
        node = node.parent
        while node is not None and node.type not in _SCOPES:
            node = node.parent
        return node

    def type_of(type_node) -> str | None:
        name = _text(type_node) if type_node is not None else ""
        # A generated type named in full (Npc.V1.Action, as a file using System must name it).
        name = name.removeprefix("global::").removeprefix(f"{NAMESPACE}.")
        return name if name in types else None

    def note(scope, name_node, type_name: str | None) -> None:
        if type_name and scope is not None:
            variables.setdefault((scope.id, _text(name_node)), set()).add(type_name)

    def collect(node) -> None:  # declarations first, so uses anywhere in their scope resolve
        if node.type == "parameter":
            note(scope_of(node), node.child_by_field_name("name"), type_of(node.child_by_field_name("type")))
        elif node.type == "variable_declaration":
            declared = type_of(node.child_by_field_name("type"))
            for declarator in _children(node, "variable_declarator"):
                created = [c for c in declarator.children if c.type == "object_creation_expression"]
                inferred = type_of(created[0].child_by_field_name("type")) if created else None
                note(scope_of(node), declarator.child_by_field_name("name"), declared or inferred)
        elif node.type == "foreach_statement":
            note(node, node.child_by_field_name("left"), type_of(node.child_by_field_name("type")))
        for child in node.children:
            collect(child)

    def lookup(identifier) -> set[str]:
        name, scope = _text(identifier), scope_of(identifier)
        while scope is not None:
            if (scope.id, name) in variables:
                return variables[(scope.id, name)]
            scope = scope_of(scope)
        return {name} if name in types else set()

    def resolve(expression) -> set[str]:
        """The generated types an expression may have."""
        if expression.type == "identifier":
            return lookup(expression)
        if expression.type == "member_access_expression":
            result = set()
            for owner in resolve(expression.child_by_field_name("expression")):
                member = _text(expression.child_by_field_name("name"))
                nested = f"{owner}.{member}"
                if nested in types:
                    result.add(nested)
                elif member in types[owner] and _simple(types[owner][member]) in types:
                    result.add(_simple(types[owner][member]))
            return result
        return set()

    def check(node) -> None:
        if node.type == "member_access_expression":
            member = _text(node.child_by_field_name("name"))
            for owner in resolve(node.child_by_field_name("expression")):
                if member not in types[owner] and member not in _PROTOBUF_MESSAGE_MEMBERS:
                    problems.append(f"{path.name}:{node.start_point[0] + 1}: {owner} has no member {member}")
        elif node.type == "object_creation_expression":
            owner = type_of(node.child_by_field_name("type"))
            initializer = node.child_by_field_name("initializer")
            if owner and initializer is not None:
                for assignment in _children(initializer, "assignment_expression"):
                    member = _text(assignment.child_by_field_name("left"))
                    if member not in types[owner]:
                        problems.append(f"{path.name}:{node.start_point[0] + 1}: {owner} has no member {member}")
        for child in node.children:
            check(child)

    collect(root)
    check(root)

    # Calls on the generated client (the wrapper's `_stub.X(...)`).
    client = _members(services["NpcDialogue.NpcDialogueClient"])
    for match in re.finditer(r"\b_stub\.(\w+)\s*\(", path.read_text(encoding="utf-8")):
        if match[1] not in client:
            problems.append(f"{path.name}: NpcDialogue.NpcDialogueClient has no method {match[1]}")
    return problems


def test_usage_checker_finds_unknown_members(tmp_path: Path):
    bad = tmp_path / "Bad.cs"
    bad.write_text(
        'class B { void F(TalkEvent e) { var r = new TalkRequest { CharacterID = "x" }; var t = e.Delta.Txt;'
        " var c = TalkEvent.EventOneofCase.Deltas; var ok = e.Finished.Emotion; _stub.Tlk(r); } }\n"
        'class C { void G(Npc.V1.Action a, TalkRequest r) { var n = a.Nme; r.AddEntities("s");'
        ' r.AddEntitys("s"); var j = a.ArgumentsJson; } }',
        encoding="utf-8",
    )
    assert sorted(_generated_uses(bad)) == [
        "Bad.cs: NpcDialogue.NpcDialogueClient has no method Tlk",
        "Bad.cs:1: TalkEvent.EventOneofCase has no member Deltas",
        "Bad.cs:1: TalkRequest has no member CharacterID",
        "Bad.cs:1: TextDelta has no member Txt",
        "Bad.cs:2: Action has no member Nme",
        "Bad.cs:2: TalkRequest has no member AddEntitys",
    ]


@pytest.mark.parametrize("path", HAND_WRITTEN, ids=lambda p: p.relative_to(CSHARP).as_posix())
def test_hand_written_code_uses_generated_members_that_exist(path: Path):
    problems = _generated_uses(path)
    assert not problems, "\n".join(problems)


def test_wrapper_api():
    """The surface the README documents: streaming with cancellation, and the unary helpers."""
    root = parse(preprocess((CSHARP / "NpcDialogueClient.cs").read_text(encoding="utf-8")))
    wrapper = _classes(root)["NpcDialogueClient"]
    public: dict[str, list[tuple[str, str]]] = {}
    for node in wrapper.child_by_field_name("body").children:
        if node.type in ("method_declaration", "constructor_declaration"):
            if "public" in [_text(m) for m in _children(node, "modifier")]:
                returns = node.child_by_field_name("returns")
                params = re.sub(
                    r"\( | \)", lambda m: m[0].strip(), " ".join(_text(node.child_by_field_name("parameters")).split())
                )
                public.setdefault(_text(node.child_by_field_name("name")), []).append(
                    (_text(returns) if returns is not None else "", params)
                )
    talk = public["TalkAsync"]
    assert {r for r, _ in talk} == {"IAsyncEnumerable<TalkEvent>"}
    assert all("[EnumeratorCancellation] CancellationToken cancellationToken = default" in p for _, p in talk)
    assert "(TalkRequest request, [EnumeratorCancellation] CancellationToken cancellationToken = default)" in [
        p for _, p in talk
    ]
    assert [r for r, _ in public["ListCharactersAsync"]] == ["Task<IReadOnlyList<Character>>"] * 2
    assert [r for r, _ in public["GetServerInfoAsync"]] == ["Task<ServerInfo>"] * 2
    assert [r for r, _ in public["ExportSessionBytesAsync"]] == ["Task<byte[]>"]
    assert [p.split(",")[0] for _, p in public["ImportSessionBytesAsync"]] == ["(byte[] saved"]
    constructors = [p for _, p in public["NpcDialogueClient"]]
    assert "(ChannelBase channel, string? authToken = null)" in constructors


def test_request_and_action_helpers():
    """The helpers for issue 15's fields: entities and allowed actions on a TalkRequest, an action's
    arguments and a one-line form of it; and the speakers surface the emotion and action events."""
    classes = _classes(parse(preprocess((CSHARP / "NpcDialogueClient.cs").read_text(encoding="utf-8"))))

    def public_methods(name: str) -> dict[str, list[str]]:
        methods: dict[str, list[str]] = {}
        for node in _children(classes[name].child_by_field_name("body"), "method_declaration"):
            if {"public", "static"} <= {_text(m) for m in _children(node, "modifier")}:
                params = " ".join(_text(node.child_by_field_name("parameters")).split())
                methods.setdefault(_text(node.child_by_field_name("name")), []).append(
                    f"{_text(node.child_by_field_name('returns'))} {params}")
        return methods

    assert public_methods("NpcTalkRequests") == {
        "AddEntities": ["TalkRequest (this TalkRequest request, string list, params string[] values)",
                        "TalkRequest (this TalkRequest request, string list, IEnumerable<string> values)"],
        "AllowActions": ["TalkRequest (this TalkRequest request, params string[] names)"],
    }
    assert public_methods("NpcActions") == {
        "Arguments": ["IReadOnlyDictionary<string, object?> (Npc.V1.Action action)"],
        "Format": ["string (Npc.V1.Action action)"],
    }
    for speaker in ("Unity/NpcSpeaker.cs", "Godot/NpcSpeaker.cs"):
        text = (CSHARP / speaker).read_text(encoding="utf-8")
        for case in ("Emotion", "Delta", "Action", "Finished"):
            assert f"case TalkEvent.EventOneofCase.{case}:" in text, (speaker, case)
        assert "request.AddEntities(" in text and "request.AllowActions(" in text, speaker
