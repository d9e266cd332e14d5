from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class CharacterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHARACTER_STATUS_UNSPECIFIED: _ClassVar[CharacterStatus]
    CHARACTER_STATUS_READY: _ClassVar[CharacterStatus]
    CHARACTER_STATUS_FAILED: _ClassVar[CharacterStatus]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
CHARACTER_STATUS_UNSPECIFIED: CharacterStatus
CHARACTER_STATUS_READY: CharacterStatus
CHARACTER_STATUS_FAILED: CharacterStatus

class TalkRequest(_message.Message):
    __slots__ = ("character_id", "session_id", "player_line", "world", "options", "player_name", "entities", "allowed_actions")
    class WorldEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EntitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EntityList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EntityList, _Mapping]] = ...) -> None: ...
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_LINE_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    session_id: str
    player_line: str
    world: _containers.ScalarMap[str, str]
    options: GenerationOptions
    player_name: str
    entities: _containers.MessageMap[str, EntityList]
    allowed_actions: AllowedActions
    def __init__(self, character_id: _Optional[str] = ..., session_id: _Optional[str] = ..., player_line: _Optional[str] = ..., world: _Optional[_Mapping[str, str]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., player_name: _Optional[str] = ..., entities: _Optional[_Mapping[str, EntityList]] = ..., allowed_actions: _Optional[_Union[AllowedActions, _Mapping]] = ...) -> None: ...

class EntityList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class AllowedActions(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "repetition_penalty", "min_p")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    repetition_penalty: float
    min_p: float
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., min_p: _Optional[float] = ...) -> None: ...

class TalkEvent(_message.Message):
    __slots__ = ("started", "delta", "finished", "emotion", "action")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    started: Started
    delta: TextDelta
    finished: Finished
    emotion: Emotion
    action: Action
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., delta: _Optional[_Union[TextDelta, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., emotion: _Optional[_Union[Emotion, _Mapping]] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("request_id", "character_version", "prompt_tokens", "cached_prompt_tokens", "history_turns", "facts", "memories")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TURNS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    MEMORIES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    character_version: str
    prompt_tokens: int
    cached_prompt_tokens: int
    history_turns: int
    facts: _containers.RepeatedScalarFieldContainer[str]
    memories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., character_version: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., history_turns: _Optional[int] = ..., facts: _Optional[_Iterable[str]] = ..., memories: _Optional[_Iterable[str]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Emotion(_message.Message):
    __slots__ = ("label",)
    LABEL_FIELD_NUMBER: _ClassVar[int]
    label: str
    def __init__(self, label: _Optional[str] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("name", "arguments", "arguments_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    arguments: _containers.RepeatedCompositeFieldContainer[ActionArgument]
    arguments_json: str
    def __init__(self, name: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[ActionArgument, _Mapping]]] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class ActionArgument(_message.Message):
    __slots__ = ("name", "string_value", "int_value", "bool_value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    string_value: str
    int_value: int
    bool_value: bool
    def __init__(self, name: _Optional[str] = ..., string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "full_text", "usage", "timings", "emotion", "actions", "relationships")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FULL_TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    full_text: str
    usage: Usage
    timings: Timings
    emotion: str
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    relationships: _containers.RepeatedCompositeFieldContainer[Relationship]
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., full_text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., emotion: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., relationships: _Optional[_Iterable[_Union[Relationship, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "first_token_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    first_token_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ListCharactersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCharactersResponse(_message.Message):
    __slots__ = ("characters",)
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    characters: _containers.RepeatedCompositeFieldContainer[Character]
    def __init__(self, characters: _Optional[_Iterable[_Union[Character, _Mapping]]] = ...) -> None: ...

class Character(_message.Message):
    __slots__ = ("id", "name", "version", "status", "error", "has_adapter", "greeting", "emotions", "serving", "actions")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HAS_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    GREETING_FIELD_NUMBER: _ClassVar[int]
    EMOTIONS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    status: CharacterStatus
    error: str
    has_adapter: bool
    greeting: str
    emotions: _containers.RepeatedScalarFieldContainer[str]
    serving: bool
    actions: _containers.RepeatedCompositeFieldContainer[ActionSpec]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., status: _Optional[_Union[CharacterStatus, str]] = ..., error: _Optional[str] = ..., has_adapter: _Optional[bool] = ..., greeting: _Optional[str] = ..., emotions: _Optional[_Iterable[str]] = ..., serving: _Optional[bool] = ..., actions: _Optional[_Iterable[_Union[ActionSpec, _Mapping]]] = ...) -> None: ...

class ActionSpec(_message.Message):
    __slots__ = ("name", "description", "arguments", "effects")
    class EffectsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    EFFECTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    arguments: _containers.RepeatedCompositeFieldContainer[ArgumentSpec]
    effects: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[ArgumentSpec, _Mapping]]] = ..., effects: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ArgumentSpec(_message.Message):
    __slots__ = ("name", "type", "values", "values_from", "min_value", "max_value", "max_chars")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FROM_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    values: _containers.RepeatedScalarFieldContainer[str]
    values_from: str
    min_value: int
    max_value: int
    max_chars: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., values_from: _Optional[str] = ..., min_value: _Optional[int] = ..., max_value: _Optional[int] = ..., max_chars: _Optional[int] = ...) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id", "character_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    character_id: str
    def __init__(self, session_id: _Optional[str] = ..., character_id: _Optional[str] = ...) -> None: ...

class ResetSessionResponse(_message.Message):
    __slots__ = ("forgotten_turns",)
    FORGOTTEN_TURNS_FIELD_NUMBER: _ClassVar[int]
    forgotten_turns: int
    def __init__(self, forgotten_turns: _Optional[int] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "character_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    character_id: str
    def __init__(self, session_id: _Optional[str] = ..., character_id: _Optional[str] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("format_version", "session_id", "turns", "updated_unix_ms", "relationships", "scenes")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    SCENES_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    session_id: str
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    updated_unix_ms: int
    relationships: _containers.RepeatedCompositeFieldContainer[RelationshipState]
    scenes: _containers.RepeatedCompositeFieldContainer[SceneState]
    def __init__(self, format_version: _Optional[int] = ..., session_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., updated_unix_ms: _Optional[int] = ..., relationships: _Optional[_Iterable[_Union[RelationshipState, _Mapping]]] = ..., scenes: _Optional[_Iterable[_Union[SceneState, _Mapping]]] = ...) -> None: ...

class RelationshipState(_message.Message):
    __slots__ = ("character_id", "name", "value")
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    name: str
    value: int
    def __init__(self, character_id: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("character_id", "player_line", "npc_line", "player_name", "character_version", "emotion", "actions", "scene_id")
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_LINE_FIELD_NUMBER: _ClassVar[int]
    NPC_LINE_FIELD_NUMBER: _ClassVar[int]
    PLAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    SCENE_ID_FIELD_NUMBER: _ClassVar[int]
    character_id: str
    player_line: str
    npc_line: str
    player_name: str
    character_version: str
    emotion: str
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    scene_id: str
    def __init__(self, character_id: _Optional[str] = ..., player_line: _Optional[str] = ..., npc_line: _Optional[str] = ..., player_name: _Optional[str] = ..., character_version: _Optional[str] = ..., emotion: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., scene_id: _Optional[str] = ...) -> None: ...

class SceneState(_message.Message):
    __slots__ = ("scene_id", "situation", "character_ids")
    SCENE_ID_FIELD_NUMBER: _ClassVar[int]
    SITUATION_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_IDS_FIELD_NUMBER: _ClassVar[int]
    scene_id: str
    situation: str
    character_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, scene_id: _Optional[str] = ..., situation: _Optional[str] = ..., character_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRelationshipsRequest(_message.Message):
    __slots__ = ("session_id", "character_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    character_id: str
    def __init__(self, session_id: _Optional[str] = ..., character_id: _Optional[str] = ...) -> None: ...

class SetRelationshipRequest(_message.Message):
    __slots__ = ("session_id", "character_id", "name", "value", "delta")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    character_id: str
    name: str
    value: int
    delta: int
    def __init__(self, session_id: _Optional[str] = ..., character_id: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[int] = ..., delta: _Optional[int] = ...) -> None: ...

class RelationshipsResponse(_message.Message):
    __slots__ = ("relationships",)
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    relationships: _containers.RepeatedCompositeFieldContainer[Relationship]
    def __init__(self, relationships: _Optional[_Iterable[_Union[Relationship, _Mapping]]] = ...) -> None: ...

class Relationship(_message.Message):
    __slots__ = ("name", "value", "min_value", "max_value", "tier", "tier_text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: int
    min_value: int
    max_value: int
    tier: str
    tier_text: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[int] = ..., min_value: _Optional[int] = ..., max_value: _Optional[int] = ..., tier: _Optional[str] = ..., tier_text: _Optional[str] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("state", "overwrite")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    overwrite: bool
    def __init__(self, state: _Optional[_Union[SessionState, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("turns", "replaced")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    turns: int
    replaced: bool
    def __init__(self, turns: _Optional[int] = ..., replaced: _Optional[bool] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model", "weights", "backend", "max_batch", "active_sequences", "waiting_requests", "resident_adapters", "version", "max_resident_adapters", "max_waiting", "context_tokens", "max_tokens_limit", "sessions", "max_sessions", "device", "max_session_turns", "limits", "prefix_cache_bytes", "prefix_cache_capacity_bytes", "batch_rows_in_use", "kv_cache_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_TURNS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: str
    backend: str
    max_batch: int
    active_sequences: int
    waiting_requests: int
    resident_adapters: int
    version: str
    max_resident_adapters: int
    max_waiting: int
    context_tokens: int
    max_tokens_limit: int
    sessions: int
    max_sessions: int
    device: str
    max_session_turns: int
    limits: RequestLimits
    prefix_cache_bytes: int
    prefix_cache_capacity_bytes: int
    batch_rows_in_use: int
    kv_cache_bytes: int
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[str] = ..., backend: _Optional[str] = ..., max_batch: _Optional[int] = ..., active_sequences: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., resident_adapters: _Optional[int] = ..., version: _Optional[str] = ..., max_resident_adapters: _Optional[int] = ..., max_waiting: _Optional[int] = ..., context_tokens: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., device: _Optional[str] = ..., max_session_turns: _Optional[int] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_cache_capacity_bytes: _Optional[int] = ..., batch_rows_in_use: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_line_chars", "max_name_chars", "max_world_entries", "max_world_key_chars", "max_world_value_chars", "max_stop_strings", "max_stop_chars", "max_tokens", "max_entity_lists", "max_entity_values", "max_entity_chars", "max_scene_characters", "max_scene_lines")
    MAX_LINE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_NAME_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORLD_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_WORLD_KEY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORLD_VALUE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTITY_LISTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTITY_VALUES_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTITY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCENE_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCENE_LINES_FIELD_NUMBER: _ClassVar[int]
    max_line_chars: int
    max_name_chars: int
    max_world_entries: int
    max_world_key_chars: int
    max_world_value_chars: int
    max_stop_strings: int
    max_stop_chars: int
    max_tokens: int
    max_entity_lists: int
    max_entity_values: int
    max_entity_chars: int
    max_scene_characters: int
    max_scene_lines: int
    def __init__(self, max_line_chars: _Optional[int] = ..., max_name_chars: _Optional[int] = ..., max_world_entries: _Optional[int] = ..., max_world_key_chars: _Optional[int] = ..., max_world_value_chars: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_stop_chars: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_entity_lists: _Optional[int] = ..., max_entity_values: _Optional[int] = ..., max_entity_chars: _Optional[int] = ..., max_scene_characters: _Optional[int] = ..., max_scene_lines: _Optional[int] = ...) -> None: ...

class SceneRequest(_message.Message):
    __slots__ = ("character_ids", "situation", "session_id", "world", "max_lines", "options", "entities", "allowed_actions")
    class WorldEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EntitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EntityList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EntityList, _Mapping]] = ...) -> None: ...
    CHARACTER_IDS_FIELD_NUMBER: _ClassVar[int]
    SITUATION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    MAX_LINES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    character_ids: _containers.RepeatedScalarFieldContainer[str]
    situation: str
    session_id: str
    world: _containers.ScalarMap[str, str]
    max_lines: int
    options: GenerationOptions
    entities: _containers.MessageMap[str, EntityList]
    allowed_actions: AllowedActions
    def __init__(self, character_ids: _Optional[_Iterable[str]] = ..., situation: _Optional[str] = ..., session_id: _Optional[str] = ..., world: _Optional[_Mapping[str, str]] = ..., max_lines: _Optional[int] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., entities: _Optional[_Mapping[str, EntityList]] = ..., allowed_actions: _Optional[_Union[AllowedActions, _Mapping]] = ...) -> None: ...

class SceneEvent(_message.Message):
    __slots__ = ("started", "line", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: SceneStarted
    line: SceneLine
    finished: SceneFinished
    def __init__(self, started: _Optional[_Union[SceneStarted, _Mapping]] = ..., line: _Optional[_Union[SceneLine, _Mapping]] = ..., finished: _Optional[_Union[SceneFinished, _Mapping]] = ...) -> None: ...

class SceneStarted(_message.Message):
    __slots__ = ("scene_id", "character_ids", "names")
    SCENE_ID_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_IDS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    scene_id: str
    character_ids: _containers.RepeatedScalarFieldContainer[str]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, scene_id: _Optional[str] = ..., character_ids: _Optional[_Iterable[str]] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class SceneLine(_message.Message):
    __slots__ = ("index", "character_id", "event")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHARACTER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    character_id: str
    event: TalkEvent
    def __init__(self, index: _Optional[int] = ..., character_id: _Optional[str] = ..., event: _Optional[_Union[TalkEvent, _Mapping]] = ...) -> None: ...

class SceneFinished(_message.Message):
    __slots__ = ("reason", "lines")
    REASON_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    lines: int
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., lines: _Optional[int] = ...) -> None: ...
